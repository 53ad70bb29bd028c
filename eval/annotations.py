"""Where the known-relationship tables come from (`<Source>.txt`, header `entity1,entity2`).

Both `eval.job` and `eval.map_benchmark` look them up the same way (`eval.annotations` in
`maejax.config.base()`, `--annotations DIR` on either command):
  1. the folder named (config key or flag), when one is;
  2. `<dataset>/annotations`, when the dataset has one (the synthetic screen writes its own tables);
  3. the `benchmark_annotations` folder of the installed `efaar_benchmarking` package: the EFAAR 1.0 tables
     (CORUM, HuMAP, Reactome, SIGNOR, StringDB; HGNC symbols), which real screens are scored against.
The package is located without importing it (its imports need torch and scvi-tools, which
requirements-nodeps.txt leaves out). Nothing found is one line naming every place looked in.
"""
from __future__ import annotations

import importlib.util
import os

from maejax.records import LAYOUT

PACKAGE = "efaar_benchmarking"
PACKAGE_FOLDER = "benchmark_annotations"
INSTALL = "pip install --no-deps efaar-benchmarking==1.0 (requirements-nodeps.txt)"


class AnnotationsNotFound(ValueError):
    """No relationship-table folder where one was looked for; the message names every place."""


def package_tables() -> str | None:
    """`<efaar_benchmarking>/benchmark_annotations` of the installed package (None: not installed)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FOLDER)


def find_annotations(configured: str = "", dataset_dir: str | None = None) -> str:
    """The relationship-table folder to score against (see the module docstring for the order).

    A `configured` folder is returned as it is: eval.recall checks it (a missing folder, a wrong header)
    with its own one-line errors."""
    if configured:
        return configured
    looked = []
    if dataset_dir:
        own = os.path.join(dataset_dir, LAYOUT.annotations)
        if os.path.isdir(own):
            return own
        looked.append(f"{own} (the dataset's own tables: none)")
    tables = package_tables()
    if tables is not None and os.path.isdir(tables):
        return tables
    looked.append(f"{tables} (missing from the installed {PACKAGE})" if tables
                  else f"the {PACKAGE} package's {PACKAGE_FOLDER} (package not installed)")
    raise AnnotationsNotFound(f"no relationship tables: looked in {'; '.join(looked)}; pass --annotations DIR "
                              f"(a folder of <Source>.txt tables with header entity1,entity2) or {INSTALL}")
