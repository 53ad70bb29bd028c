"""The oracle: the synthetic screen's true phenotype parameters of every well, as features.

Every crop gets its well's row of `<dataset>/oracle.parquet` (z units, no batch effect, no imaging
noise), so the oracle goes through exactly the same eval as a model's embeddings and shows the ceiling of
each table: what a perfect reader of the cells could reach given the biological variation between wells
and the noisy annotation tables. Only synthetic screens have an oracle.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from eval.tasks import WELL_KEYS
from maejax.records import LAYOUT


def oracle_screen(dataset_dir: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(N, P) float32 features (one row per crop, in record order) and the crops' metadata."""
    path = os.path.join(dataset_dir, "oracle.parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no oracle (only synthetic screens of version 2 write one)")
    oracle = pd.read_parquet(path)
    columns = [c for c in oracle.columns if c.startswith("z_")]
    meta = pd.read_parquet(os.path.join(dataset_dir, LAYOUT.metadata))
    merged = meta[WELL_KEYS].merge(oracle[WELL_KEYS + columns], on=WELL_KEYS, how="left", validate="many_to_one")
    if merged[columns].isna().any().any():
        missing = merged.loc[merged[columns].isna().any(axis=1), WELL_KEYS].iloc[0].tolist()
        raise ValueError(f"{path}: no row for well {missing} of {dataset_dir}")
    return merged[columns].to_numpy(np.float32), meta
