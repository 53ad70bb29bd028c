"""The command-line flag style of every maejax command, and the old spellings kept for one release.

Every flag is spelled as absl spells it (`--batch_size`, big_vision and MaxText style), with one name per
concept across the commands:

  --workdir DIR      a training run directory (config.json, checkpoints/, metrics)
  --dataset DIR      a crop dataset directory (manifest.json)
  --out DIR          where a command writes; always a directory (a single file goes to a fixed name inside)
  --embeddings FILE  a table (parquet/CSV) of feature_* columns (--num_features N: a count, in benchmarks)
  --batch_size N     crops per batch (--crop_size N: a crop's side)
  --perturbation_col the metadata column naming the perturbation (every column flag is --*_col)
  --json FILE        the figures a benchmark also writes

`ArgumentParser` is argparse's, with one addition: `add_argument(..., deprecated="--old-name")` (or a list)
keeps old spellings working. They are left out of --help, and each use prints one line on stderr naming the
new spelling (`deprecated_flag`). Groups and subcommands of the parser take `deprecated=` too. The absl
commands (maejax.train, maejax.aot) need no aliases: their flags were already spelled this way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REGISTRY = "deprecated spelling"   # argparse registry (shared by a parser and its groups): old -> new


def deprecated_flag(old: str, new: str) -> None:
    """Says on stderr that a flag kept for one release is deprecated, and what replaces it."""
    print(f"{old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr, flush=True)


class _Spellings:
    """add_argument(..., deprecated=OLD or [OLD, ...]) for a parser and for its groups."""

    def add_argument(self, *args, deprecated: str | list[str] | tuple[str, ...] = (), **kwargs):
        action = super().add_argument(*args, **kwargs)
        new = next((s for s in action.option_strings if s.startswith("--")), None)
        for old in [deprecated] if isinstance(deprecated, str) else deprecated:
            if new is None or not old.startswith("--"):
                raise ValueError(f"deprecated={old!r}: only --long spellings of an optional flag")
            if old in self._option_string_actions or old in aliases(self):
                raise ValueError(f"deprecated spelling {old} is already a flag of this parser")
            self.register(REGISTRY, old, new)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    def add_mutually_exclusive_group(self, **kwargs):
        group = _ExclusiveGroup(self, **kwargs)
        self._mutually_exclusive_groups.append(group)
        return group


class _Group(_Spellings, argparse._ArgumentGroup):
    pass


class _ExclusiveGroup(_Spellings, argparse._MutuallyExclusiveGroup):
    pass


class ArgumentParser(_Spellings, argparse.ArgumentParser):
    """argparse.ArgumentParser whose add_argument takes `deprecated=` spellings (hidden, with a notice)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(respell(args, aliases(self)), namespace)


def aliases(container) -> dict[str, str]:
    """The deprecated spellings of a parser (or group): {old: new}."""
    return container._registries.get(REGISTRY, {})


def respell(args: list[str], renamed: dict[str, str]) -> list[str]:
    """args with each old flag spelling (`--old` or `--old=value`, up to a bare `--`) replaced by the new one,
    saying so on stderr."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name in renamed:
            deprecated_flag(name, renamed[name])
            out[i] = renamed[name] + eq + value
    return out


def output_file(out: str | Path, name: str) -> Path:
    """The file a command writes into its `--out DIR`: DIR/name (the directory is created). Before this
    release such commands took `--out FILE`; a path ending in name's suffix that is not a directory is still
    read that way, with a notice."""
    path = Path(out)
    suffix = Path(name).suffix
    if suffix and path.suffix == suffix and not path.is_dir():
        deprecated_flag(f"--out FILE{suffix}", f"--out DIR (writes DIR/{name})")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    return path / name
