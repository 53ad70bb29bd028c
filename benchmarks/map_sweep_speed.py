"""Genome-scale map benchmark: the whole per-block EFAAR sweep of a ViT-G/8 (48 blocks).

  python -m benchmarks.map_sweep_speed                       # 20k perts x 4 reps x 4 batches, 1664-d, 48 blocks
  python -m benchmarks.map_sweep_speed --perturbations 2000 --num_features 256 --blocks 3   # quick run

Each block's well embeddings (synthetic: a rank-64 perturbation effect, per-batch gain and offset,
uniform noise; 500 controls per batch, as peer_baselines.md section 1) go through
PCA(128, centerscale by batch) -> TVN on controls by batch -> mean aggregation -> recall on the
annotation tables, with `eval.efaar` / `eval.recall`. Blocks are generated one at a time into one
reused buffer, so a full run needs ~2.2 GB for the input plus the pipeline's working memory.

The baseline is the same algorithm written plainly with NumPy/SciPy the way sklearn and EFAAR do
it (StandardScaler-style copies per batch, covariance PCA on the standardised copy, per-group
means, the full N x N cosine matrix with int64 triu_indices, a row-by-row table parse, a re-sort of
the null per source), run in the same process on `--baseline_blocks` blocks. Its outputs are
compared with ours. The script prints figures; it asserts nothing about time.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from scipy import linalg

from benchmarks.measure import reset_peak_rss, rss_mib, write_json
from eval import efaar, recall
from maejax import flags

CONTROL = "non-targeting"
DEFAULT_ANNOTATIONS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "efaar_annotations"


# --- synthetic screen ---------------------------------------------------------------------------

def gene_names(n: int, annotation_dir: Path, seed: int = 0) -> np.ndarray:
    """n perturbation names: annotated genes first (a random subset when there are more), then
    FAKEGENE##### fillers, so the recall queries have the real tables' sizes at 20k."""
    genes = set()
    for source in recall.BENCHMARK_SOURCES:
        e1, e2 = recall.load_relationships(annotation_dir, source)
        genes.update(e1.tolist())
        genes.update(e2.tolist())
    genes = np.array(sorted(genes))
    if n <= len(genes):
        return np.sort(np.random.default_rng(seed).choice(genes, n, replace=False))
    return np.concatenate([genes, [f"FAKEGENE{i:05d}" for i in range(n - len(genes))]])


def screen_layout(genes: np.ndarray, replicates: int, batches: int, controls: int):
    """Row labels, batch-sorted: per batch, every gene `replicates` times, then the controls."""
    per_batch = np.concatenate([np.repeat(genes, replicates), np.full(controls, CONTROL)])
    perts = np.tile(per_batch, batches)
    batch = np.repeat(np.arange(batches), len(per_batch))
    return perts, batch


def fill_block(out: np.ndarray, perts_code: np.ndarray, batch: np.ndarray, block: int,
               rank: int = 64, chunk: int = 32768) -> None:
    """Writes one block's synthetic embeddings into `out` in place (no full-size temporaries)."""
    rng = np.random.default_rng(1000 + block)
    n_genes = perts_code.max() + 1
    effect = rng.standard_normal((n_genes, rank), dtype=np.float32)
    effect[-1] = 0.0                                             # the control code is the last one
    basis = rng.standard_normal((rank, out.shape[1]), dtype=np.float32) / np.sqrt(rank)
    rng.random(out=out, dtype=np.float32)
    for start in range(0, len(out), chunk):
        sl = slice(start, start + chunk)
        out[sl] -= 0.5
        out[sl] *= 3.0
        out[sl] += effect[perts_code[sl]] @ basis
    for b in np.unique(batch):                  # rows are sorted by batch
        rows = slice(*np.searchsorted(batch, [b, b + 1]))
        out[rows] *= rng.uniform(0.8, 1.2, out.shape[1]).astype(np.float32)
        out[rows] += rng.standard_normal(out.shape[1], dtype=np.float32)


# --- ours ---------------------------------------------------------------------------------------

def run_ours(x, perts, batch, is_control, annotations, n_components, thresholds, backend="auto"):
    times = {}
    t = time.perf_counter()
    emb = efaar.embed_by_pca(x, batch, n_components, backend=backend)
    times["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = efaar.tvn_on_controls(emb, is_control, batch)
    times["tvn"] = time.perf_counter() - t
    t = time.perf_counter()
    feats, labels = efaar.aggregate(emb, perts, "mean", drop=[CONTROL])
    times["agg"] = time.perf_counter() - t
    t = time.perf_counter()
    records = recall.known_relationship_benchmark(feats, labels, annotations, recall.BENCHMARK_SOURCES,
                                                  thresholds)
    times["recall"] = time.perf_counter() - t
    return times, records, emb


# --- plain NumPy/SciPy baseline -----------------------------------------------------------------

def baseline_pca(x, batch, n_components):
    z = x.copy()
    for b in np.unique(batch):
        rows = batch == b
        part = z[rows]
        mean, std = part.mean(0, dtype=np.float64), part.std(0, dtype=np.float64)
        z[rows] = (part - mean) / np.where(std > 0, std, 1.0)
    z -= z.mean(0)
    evals, evecs = np.linalg.eigh(z.T @ z / (len(z) - 1))
    comps = evecs[:, ::-1][:, :n_components].T
    comps *= np.sign(comps[np.arange(n_components), np.abs(comps).argmax(1)])[:, None]
    return z @ comps.T.astype(z.dtype)


def _scale_on(x, fit):
    std = fit.std(0)
    return (x - fit.mean(0)) / np.where(std > 0, std, 1.0)


def baseline_tvn(x, is_control, batch):
    x = _scale_on(x, x[is_control])
    ctrl = x[is_control]
    evals, evecs = np.linalg.eigh(np.cov(ctrl, rowvar=False))
    x = (x - ctrl.mean(0)) @ evecs[:, ::-1]
    x = _scale_on(x, x[is_control])
    for b in np.unique(batch):
        rows = batch == b
        cov = np.cov(x[rows & is_control], rowvar=False) + 0.5 * np.eye(x.shape[1])
        x[rows] = x[rows] @ linalg.fractional_matrix_power(cov, -0.5).real.astype(x.dtype)
    return x


def baseline_aggregate(x, perts):
    groups = {}   # row indices per perturbation, as pandas groupby collects them
    for i, p in enumerate(perts.tolist()):
        groups.setdefault(p, []).append(i)
    labels = sorted(set(groups) - {CONTROL})
    return np.stack([x[groups[p]].mean(0) for p in labels]), np.array(labels)


def baseline_recall(feats, labels, annotations, thresholds):
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = unit @ unit.T
    null = cos[np.triu_indices(len(cos), k=1)]
    index = {g: i for i, g in enumerate(labels)}
    out = []
    for source in recall.BENCHMARK_SOURCES:
        with open(Path(annotations) / f"{source}.txt", newline="") as f:
            rows = list(csv.reader(f))[1:]
        pairs = {tuple(sorted(r)) for r in rows if r[0] != r[1]}
        query = np.array([cos[index[a], index[b]] for a, b in pairs if a in index and b in index])
        if len(query) == 0:
            continue
        sorted_null = np.sort(null)
        left = np.searchsorted(sorted_null, query, "left") / len(null)
        right = np.searchsorted(sorted_null, query, "right") / len(null)
        rec = {"source": source, "null_distribution_size": len(null), "query_distribution_size": len(query)}
        for lo, hi in thresholds:
            rec[f"recall_{lo}_{hi}"] = float(np.mean((right <= lo) | (left >= hi)))
        out.append(rec)
    return out


def run_baseline(x, perts, batch, is_control, annotations, n_components, thresholds):
    times = {}
    t = time.perf_counter()
    emb = baseline_pca(x, batch, n_components)
    times["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = baseline_tvn(emb, is_control, batch)
    times["tvn"] = time.perf_counter() - t
    t = time.perf_counter()
    feats, labels = baseline_aggregate(emb, perts)
    times["agg"] = time.perf_counter() - t
    t = time.perf_counter()
    records = baseline_recall(feats, labels, annotations, thresholds)
    times["recall"] = time.perf_counter() - t
    return times, records, emb


# --- driver -------------------------------------------------------------------------------------

STAGES = ("pca", "tvn", "agg", "recall")


def _fmt(times: dict) -> str:
    return "  ".join(f"{k} {times[k]:6.2f}" for k in STAGES) + f"  | total {sum(times.values()):6.2f} s"


def main(argv=None) -> dict:
    p = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--perturbations", type=int, default=20000)
    p.add_argument("--replicates", type=int, default=4, help="wells per perturbation per batch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--controls_per_batch", type=int, default=500)
    p.add_argument("--num_features", deprecated="--features", type=int, default=1664)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--pca_components", type=int, default=128)
    p.add_argument("--baseline_blocks", type=int, default=1, help="blocks also run by the baseline")
    p.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    p.add_argument("--backend", choices=("auto", "numpy", "jax"), default="auto",
                   help="streaming PCA backend (auto: numpy on CPU, jax on accelerators)")
    p.add_argument("--json", deprecated="--out", default=None, metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    thresholds = list(recall.RECALL_THRESHOLDS)
    annotations = Path(args.annotations)
    if not annotations.is_dir():
        raise SystemExit(f"annotation folder {annotations} not found (pass --annotations)")

    genes = gene_names(args.perturbations, annotations)
    perts, batch = screen_layout(genes, args.replicates, args.batches, args.controls_per_batch)
    is_control = perts == CONTROL
    codes = pd.Index(genes).get_indexer(perts)
    codes[is_control] = len(genes)               # the control gets the last (zero) effect
    x = np.empty((len(perts), args.num_features), np.float32)
    print(f"map: {args.perturbations:,} perturbations x {args.replicates} replicates x {args.batches} "
          f"batches + {args.controls_per_batch} controls/batch = {len(x):,} rows x {args.num_features} "
          f"features ({x.nbytes / 2**30:.2f} GiB float32 per block), {args.blocks} blocks, "
          f"PCA {args.pca_components}; jax device {jax.devices()[0].platform}, PCA backend "
          f"{'jax' if efaar._use_jax(args.backend) else 'numpy'}")

    ours, base, agreement = [], [], {}
    results, gen_s, base_s, sweep_peak = None, 0.0, 0.0, 0.0
    sweep_start = time.perf_counter()
    for block in range(args.blocks):
        t = time.perf_counter()
        fill_block(x, codes, batch, block)
        gen_s += time.perf_counter() - t
        rss_in, load = rss_mib("VmRSS"), os.getloadavg()[0]
        reset_peak_rss()
        times, records, _ = run_ours(x, perts, batch, is_control, annotations, args.pca_components,
                                     thresholds, args.backend)
        sweep_peak = max(sweep_peak, rss_mib("VmHWM"))
        ours.append({**times, "load": load})
        results = results or records
        print(f"block {block:2d}  ours  {_fmt(times)}   rss {rss_in:,.0f} MiB  load {load:.1f}", flush=True)
        if block < args.baseline_blocks:   # paired with ours on the same block, under similar load
            t = time.perf_counter()
            reset_peak_rss()
            btimes, brecords, _ = run_baseline(x, perts, batch, is_control, annotations,
                                               args.pca_components, thresholds)
            base.append({**btimes, "peak_rss_mib": rss_mib("VmHWM"), "load": os.getloadavg()[0]})
            base_s += time.perf_counter() - t
            agreement[block] = {
                "max_abs_recall_diff": max(abs(b[k] - o[k]) for b, o in zip(brecords, records)
                                           for k in b if k.startswith("recall")),
                "sizes_equal": [(b["null_distribution_size"], b["query_distribution_size"]) for b in brecords]
                == [(o["null_distribution_size"], o["query_distribution_size"]) for o in records]}
            print(f"block {block:2d}  base  {_fmt(btimes)}   peak rss {base[-1]['peak_rss_mib']:,.0f} MiB"
                  f"  load {base[-1]['load']:.1f}", flush=True)
    sweep_wall = time.perf_counter() - sweep_start - gen_s - base_s

    steady = ours[1:] or ours
    per_block = {k: float(np.median([t[k] for t in steady])) for k in STAGES}
    block_total = lambda t: sum(t[k] for k in STAGES)
    summary = {
        "config": vars(args),
        "rows": int(len(x)),
        "null_size": results[0]["null_distribution_size"],
        "query_sizes": {r["source"]: r["query_distribution_size"] for r in results},
        "ours": {"sweep_s": sweep_wall, "blocks": args.blocks, "first_block_s": block_total(ours[0]),
                 "median_block_s": float(np.median([block_total(t) for t in steady])),
                 "min_block_s": float(min(block_total(t) for t in steady)),
                 "median_stage_s": per_block, "peak_rss_mib": sweep_peak,
                 "input_mib": x.nbytes / 2**20, "per_block": ours},
        "generation_s": gen_s,
        "recall_block0": results,
    }
    print(f"\nours: {args.blocks} blocks in {sweep_wall:.1f} s (excluding {gen_s:.1f} s of data "
          f"generation{' and the baseline' if base else ''}); first block {block_total(ours[0]):.2f} s "
          f"(includes warm-up: first touch of fresh memory, jit), median block "
          f"{summary['ours']['median_block_s']:.2f} s [{', '.join(f'{k} {v:.2f}' for k, v in per_block.items())}], "
          f"fastest {summary['ours']['min_block_s']:.2f} s; peak RSS {sweep_peak:,.0f} MiB (input block "
          f"{x.nbytes / 2**20:,.0f} MiB); load average {np.mean([t['load'] for t in ours]):.1f} on "
          f"{os.cpu_count()} cores")
    if base:
        # pairs after the first block, whose numbers include one-off warm-up, when there are any
        pairs = list(range(1, len(base))) or [0]
        ratio = [block_total(base[i]) / block_total(ours[i]) for i in pairs]
        stage_ratio = {k: float(np.median([base[i][k] / max(ours[i][k], 1e-9) for i in pairs]))
                       for k in STAGES}
        base_block = float(np.median([block_total(base[i]) for i in pairs]))
        summary["baseline"] = {"blocks_run": len(base), "pairs_used": pairs, "median_block_s": base_block,
                               "median_stage_s": {k: float(np.median([base[i][k] for i in pairs]))
                                                  for k in STAGES},
                               "peak_rss_mib": max(t["peak_rss_mib"] for t in base),
                               "sweep_s_extrapolated": base_block * args.blocks, "per_block": base,
                               "agreement": agreement}
        summary["speedup_paired_median"] = float(np.median(ratio))
        summary["speedup_stage"] = stage_ratio
        print(f"baseline: median block {base_block:.2f} s "
              f"[{', '.join(f'{k} {v:.2f}' for k, v in summary['baseline']['median_stage_s'].items())}] "
              f"on block(s) {pairs}; {args.blocks} blocks extrapolated {base_block * args.blocks:.0f} s; "
              f"peak RSS {summary['baseline']['peak_rss_mib']:,.0f} MiB")
        print(f"speed-up, same block back to back: {np.round(ratio, 2).tolist()} (median "
              f"{summary['speedup_paired_median']:.1f}x); per stage "
              + ", ".join(f"{k} {v:.1f}x" for k, v in stage_ratio.items()))
        print(f"recall agreement with the baseline: {agreement}")
    print("recall block 0: " + "; ".join(
        f"{r['source']} {r['query_distribution_size']} pairs {r['recall_0.05_0.95']:.3f}" for r in results))
    return write_json(args.json, summary)


if __name__ == "__main__":
    main()
