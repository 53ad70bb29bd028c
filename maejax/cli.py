"""Console commands of `pip install` (pyproject.toml [project.scripts]) that need more than a module's main().

  maejax-train ARGS                   python -m maejax.train ARGS
  maejax-build-dataset SOURCE ARGS    python -m data.sources.SOURCE ARGS (rxrx1, rxrx3_core, jump_cp, generic),
                                      or python -m data.synthetic_screen ARGS (SOURCE synthetic)

maejax-eval, maejax-map-benchmark and maejax-convert call their modules' main() directly.
"""
from __future__ import annotations

import importlib
import runpy
import sys

# Dataset builders, by the name `maejax-build-dataset` takes: each module's main(argv) parses the rest.
DATASET_BUILDERS = {
    "rxrx1": "data.sources.rxrx1",
    "rxrx3_core": "data.sources.rxrx3_core",
    "jump_cp": "data.sources.jump_cp",
    "generic": "data.sources.generic",
    "synthetic": "data.synthetic_screen",
}


def train() -> None:
    """The trainer defines its absl flags where it runs as __main__, so it runs as `python -m` runs it."""
    runpy.run_module("maejax.train", run_name="__main__", alter_sys=True)


def build_dataset(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(DATASET_BUILDERS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: maejax-build-dataset SOURCE [options]   (SOURCE: {names})\n"
              f"Builds a crop dataset; `maejax-build-dataset SOURCE --help` lists the options of SOURCE "
              f"(docs/real_data.md, docs/data.md).")
        return 0 if argv else 2
    source, rest = argv[0], argv[1:]
    if source not in DATASET_BUILDERS:
        print(f"maejax-build-dataset: unknown source {source!r} (known: {names})", file=sys.stderr)
        return 2
    sys.argv[0] = f"maejax-build-dataset {source}"   # the builder's argparse names itself after argv[0]
    return importlib.import_module(DATASET_BUILDERS[source]).main(rest) or 0
