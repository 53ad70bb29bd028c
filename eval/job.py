"""Eval job: restore a checkpoint onto the devices that exist, embed every crop of a screen, and evaluate
every block (recall of known relationships after batch correction, linear probes).

  python -m eval.job --workdir runs/demo [--dataset DIR] [--out DIR] [--features {mae,random_init,handcrafted}]

`mae` evaluates the trained checkpoint in `<workdir>/checkpoints`; `random_init` the same architecture with
fresh weights (the untrained control); `handcrafted` CellProfiler-style features, no model. Outputs go to
`<out>` (default `<workdir>/eval/<features>`): report.json, embeddings.parquet, blocks.png.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import ml_collections
import numpy as np
import pandas as pd
from flax import nnx

from eval import screen
from eval.embed import Embedder
from maejax import sharding as shd, state as state_lib
from maejax.checkpoint import Checkpoints
from maejax.input_pipeline import iterate_records
from maejax.records import LAYOUT

FEATURES = ("mae", "random_init", "handcrafted")


def embed_screen(model, dataset_dir: str, batch_size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Every crop of the dataset -> (N, blocks, D) mean-pooled block features, plus crop metadata."""
    mesh = shd.make_mesh({"data": -1})
    embedder = Embedder(model, mesh, batch_size, keys=("blocks",))
    feats, meta = embedder.embed_batches(iterate_records(dataset_dir, embedder.batch_size))
    return feats["blocks"], meta


def handcrafted_screen(dataset_dir: str, batch_size: int = 256) -> tuple[np.ndarray, pd.DataFrame]:
    from eval.handcrafted import handcrafted_features
    feats, metas = [], []
    for images, meta in iterate_records(dataset_dir, batch_size):
        feats.append(handcrafted_features(images)[0])
        metas.append(meta)
    return np.concatenate(feats), pd.concat(metas, ignore_index=True)


def features_for(kind: str, workdir: str, dataset_dir: str | None, batch_size: int | None):
    """(features, metadata, config, dataset_dir, step) for one of FEATURES."""
    if kind not in FEATURES:
        raise ValueError(f"features={kind!r}: choose one of {FEATURES}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpts = Checkpoints(ckpt_dir)
    step = ckpts.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    config = ml_collections.ConfigDict(ckpts.meta(step)["config"])
    ckpts.close()
    dataset_dir = dataset_dir or config.data.dir
    batch_size = batch_size or config.eval.batch_size
    if kind == "handcrafted":
        feats, meta = handcrafted_screen(dataset_dir)
        return feats, meta, config, dataset_dir, step
    if kind == "mae":
        model, _, _ = state_lib.load_model(ckpt_dir, step=step)
    else:  # the same architecture, untrained
        mesh = shd.make_mesh({"data": -1})
        rules = shd.rules_from_config(config.sharding_rules)
        sharded = state_lib.abstract(config.model, mesh, rules, seed=config.seed + 1)
        fresh = state_lib.initialize(config.model, mesh, rules, sharded, seed=config.seed + 1)
        with shd.activate(mesh, rules):
            model = nnx.merge(sharded.model_def, fresh)
    feats, meta = embed_screen(model, dataset_dir, batch_size)
    return feats, meta, config, dataset_dir, step


def evaluate(kind: str, workdir: str, *, dataset_dir: str | None = None, out_dir: str | None = None,
             batch_size: int | None = None) -> dict[str, Any]:
    t0 = time.time()
    feats, meta, config, dataset_dir, step = features_for(kind, workdir, dataset_dir, batch_size)
    t_embed = time.time() - t0
    e = config.eval
    report = screen.evaluate_blocks(
        feats, meta, os.path.join(dataset_dir, LAYOUT.annotations), control=e.control,
        pca_components=e.pca_components, correction=e.correction,
        thresholds=[tuple(t) for t in e.thresholds], run_probe=e.probe, seed=config.seed)
    report.update(features=kind, checkpoint_step=step if kind == "mae" else None, dataset=dataset_dir,
                  embed_seconds=t_embed, eval_seconds=time.time() - t0 - t_embed)
    out_dir = out_dir or os.path.join(workdir, "eval", kind)
    report["outputs"] = screen.write_outputs(report, out_dir, title=f"{kind} ({config.model.variant})")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="training run directory (holds checkpoints/)")
    ap.add_argument("--dataset", default=None, help="dataset directory (default: the one it was trained on)")
    ap.add_argument("--out", default=None, help="output directory (default: <workdir>/eval/<features>)")
    ap.add_argument("--features", default="mae", choices=FEATURES)
    ap.add_argument("--batch_size", type=int, default=None)
    a = ap.parse_args()
    if not os.path.isdir(os.path.join(a.workdir, "checkpoints")):
        raise SystemExit(f"{a.workdir}: no checkpoints/ directory (train first: python -m maejax.train ...)")
    report = evaluate(a.features, a.workdir, dataset_dir=a.dataset, out_dir=a.out, batch_size=a.batch_size)
    best = report["best"]
    print(f"{a.features}: best block {report['best_block']} recall {best['recall_mean']} "
          f"probe test {best.get('probe_test')}; outputs in {os.path.dirname(report['outputs']['report'])}")


if __name__ == "__main__":
    main()
