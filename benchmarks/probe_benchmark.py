"""Block-wise linear probe benchmark: every block of a ViT-G/8 probed at once.

  python -m benchmarks.probe_benchmark        # 48 blocks x 20k samples x 1664 dims, 1,138 classes
  python -m benchmarks.probe_benchmark --blocks 4 --samples 4000 --num_features 256 --classes 100

Synthetic features whose class signal grows with depth until block 3/4 of the stack, then fades
(so the best block is not the last). 60/20/20 split by held-out wells (4 samples per well).
`eval.probe.ridge_probes` (one eigendecomposition per block serves the whole L2 grid) against
a plain NumPy ridge classifier that solves one linear system per L2 value (sklearn
RidgeClassifier's Cholesky path), run in the same process on `--baseline_blocks` blocks.
Optionally times `logistic_probes` on the first `--logistic_blocks` blocks. Prints figures; asserts
nothing about time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from benchmarks.measure import reset_peak_rss, rss_mib, write_json
from eval import probe
from maejax import flags


def make_stack(blocks: int, samples: int, features: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    peak = max(1, (3 * blocks) // 4)
    stack = np.empty((blocks, samples, features), np.float32)
    for b in range(blocks):
        strength = 0.35 * (1 - abs(b - peak) / max(peak, blocks - peak))
        centers = rng.standard_normal((classes, features), dtype=np.float32)
        rng.standard_normal(out=stack[b], dtype=np.float32)
        stack[b] += strength * centers[labels]
    wells = pd.DataFrame({"well": np.arange(samples) // 4})
    return stack, labels, probe.split_by_group(wells, "well", seed=seed), peak


def baseline_ridge(x, labels, train, val, test, l2_grid, classes):
    """Standardise on train, then per L2 value solve (Z^T Z + l2 n I) W = Z^T (Y - mean Y)."""
    z = (x - x[train].mean(0)) / x[train].std(0)
    zt = z[train]
    onehot = np.eye(classes, dtype=np.float32)[labels[train]]
    prior = onehot.mean(0)
    gram, rhs = zt.T @ zt, zt.T @ (onehot - prior)
    def score(idx, w):   # balanced accuracy
        pred, true = np.argmax(z[idx] @ w + prior, 1), labels[idx]
        return np.mean([np.mean(pred[true == c] == c) for c in np.unique(true)])

    weights = [np.linalg.solve(gram + l2 * len(zt) * np.eye(len(gram)), rhs) for l2 in l2_grid]
    val_scores = [score(val, w) for w in weights]
    best = int(np.argmax(val_scores))
    return val_scores, score(test, weights[best])


def main(argv=None) -> dict:
    p = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--num_features", deprecated="--features", type=int, default=1664)
    p.add_argument("--classes", type=int, default=1138)
    p.add_argument("--baseline_blocks", type=int, default=1)
    p.add_argument("--logistic_blocks", type=int, default=0)
    p.add_argument("--logistic_steps", type=int, default=100)
    p.add_argument("--json", deprecated="--out", default=None, metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)

    t = time.perf_counter()
    stack, labels, (train, val, test), peak = make_stack(args.blocks, args.samples, args.num_features,
                                                         args.classes)
    print(f"stack {stack.shape} float32 ({stack.nbytes / 2**30:.2f} GiB), {args.classes} classes, "
          f"train/val/test {train.sum()}/{val.sum()}/{test.sum()}, signal peaks at block {peak}; "
          f"generated in {time.perf_counter() - t:.1f} s", flush=True)

    reset_peak_rss()
    rss_in = rss_mib("VmRSS")
    t = time.perf_counter()
    report = probe.ridge_probes(stack, labels, train, val, test)
    ridge_s = time.perf_counter() - t
    ridge_peak = rss_mib("VmHWM")
    print(f"ridge_probes: {args.blocks} blocks x {len(probe.RIDGE_L2)} L2 values in {ridge_s:.1f} s "
          f"({ridge_s / args.blocks:.2f} s/block incl. compilation); peak RSS {ridge_peak:,.0f} MiB "
          f"(stack loaded: {rss_in:,.0f} MiB); best block {report.best_block} "
          f"val {report.val[report.best_block]:.3f} test {report.test[report.best_block]:.3f}", flush=True)
    summary = {"config": vars(args), "ridge_s": ridge_s, "ridge_s_per_block": ridge_s / args.blocks,
               "ridge_peak_rss_mib": ridge_peak, "rss_with_stack_mib": rss_in, "report": report.to_dict()}

    if args.baseline_blocks:
        t = time.perf_counter()
        agree = []
        for b in range(args.baseline_blocks):
            val_scores, test_score = baseline_ridge(stack[b].astype(np.float64), labels, train, val, test,
                                                    probe.RIDGE_L2, args.classes)
            agree.append(float(np.max(np.abs(np.asarray(val_scores) - report.val_by_l2[b]))))
        base_s = (time.perf_counter() - t) / args.baseline_blocks
        summary.update(baseline_s_per_block=base_s, speedup=base_s / (ridge_s / args.blocks),
                       baseline_max_val_diff=max(agree))
        print(f"baseline (NumPy solve per L2, float64): {base_s:.2f} s/block on {args.baseline_blocks} "
              f"block(s) -> {base_s * args.blocks:.0f} s for {args.blocks}; speed-up "
              f"{summary['speedup']:.1f}x; max |val accuracy difference| {max(agree):.2e}", flush=True)

    if args.logistic_blocks:
        t = time.perf_counter()
        logit = probe.logistic_probes(stack[:args.logistic_blocks], labels, train, val, test,
                                      steps=args.logistic_steps)
        logit_s = time.perf_counter() - t
        summary.update(logistic_s=logit_s, logistic_test=logit.test.tolist())
        print(f"logistic_probes: {args.logistic_blocks} blocks x {len(probe.LOGISTIC_L2)} L2 values x "
              f"{args.logistic_steps} full-batch Adam steps in {logit_s:.1f} s; test "
              f"{np.round(logit.test.astype(float), 3).tolist()} (ridge "
              f"{np.round(report.test[:args.logistic_blocks].astype(float), 3).tolist()})")
    return write_json(args.json, summary)


if __name__ == "__main__":
    main()
