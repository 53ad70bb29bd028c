"""Whole-process speed and memory of `eval.map_benchmark` against EFAAR 1.0's functions, one parquet.

  python -m benchmarks.map_speed_vs_efaar                    # 10,000 genes: 162,000 rows x 1,664 features
  python -m benchmarks.map_speed_vs_efaar --perturbations 1000 --num_features 256 --runs 1   # quick check

The parquet (written once, reused while its parameters match) is peer_baselines.md section 1's screen:
N real gene symbols (a random subset of the union of the five EFAAR tables, so recall has queries)
x 4 replicate wells in each of 4 batches + 500 `non-targeting` controls per batch, float32
`feature_*` columns (a rank-64 gene effect, per-batch gain and offset, uniform noise) and `gene`, `batch`.

Each round runs, as separate processes one after the other (alternating, so a busy machine hits both):
  ours   python -m eval.map_benchmark --embeddings F --perturbation_col gene --batch_col batch
         --control non-targeting --pca_components 128 --correction tvn --aggregate mean
         --annotations A --no_mean_average_precision --out DIR      (writes DIR/report.json)
         (recall on the five tables plus the replicate consistency it always reports; the copairs mAP is a
         newer addition to the report, not part of EFAAR's pipeline, so it is left out here)
  efaar  this file's `_efaar_child`: pandas.read_parquet, then efaar_benchmarking 1.0 unmodified:
         embed_by_pca(X, md, 128, batch_col) -> tvn_on_controls -> aggregate(mean) ->
         known_relationship_benchmark(five tables, (0.05, 0.95), (0.1, 0.9)); scvi, torch and geomloss
         (imported at its module level, used by none of these functions) are stubbed. It needs
         scikit-learn and joblib (requirements-bench.txt).
Wall time and peak RSS (ru_maxrss) come from os.wait4 on each child: whole processes, imports and I/O
included. The script prints every run, the medians, the ratio, the peaks against the size of the
feature matrix, and whether both give the same recall.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANNOTATIONS = ROOT.parent / "shared" / "reference" / "efaar_annotations"
CONTROL = "non-targeting"
SOURCES = ["CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB"]
THRESHOLDS = [(0.05, 0.95), (0.1, 0.9)]


# --- the screen ---------------------------------------------------------------------------------

def write_screen(path: Path, perturbations: int, features: int, annotations: Path, replicates: int = 4,
                 batches: int = 4, controls: int = 500) -> dict:
    """Writes the parquet unless one with the same parameters is there; returns its parameters."""
    params = {"perturbations": perturbations, "features": features, "replicates": replicates,
              "batches": batches, "controls_per_batch": controls, "annotations": str(annotations), "seed": 0}
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return params
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.map_sweep_speed import fill_block, gene_names, screen_layout
    genes = gene_names(perturbations, annotations)
    perts, batch = screen_layout(genes, replicates, batches, controls)
    codes = pd.Index(genes).get_indexer(perts)
    codes[perts == CONTROL] = len(genes)            # the control gets the last (zero) effect
    x = np.empty((len(perts), features), np.float32)
    fill_block(x, codes, batch, 0)
    columns = np.ascontiguousarray(x.T)              # one contiguous array per column (zero-copy into arrow)
    del x
    table = pa.table({**{f"feature_{j}": columns[j] for j in range(features)},
                      "gene": pa.array(perts.astype(str)), "batch": pa.array([f"b{b}" for b in batch])})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    stamp.write_text(json.dumps(params))
    return params


# --- EFAAR 1.0 as one process -------------------------------------------------------------------

def _efaar_child(features: str, annotations: str, out: str, pca_solver: str = "auto") -> None:
    import types
    # scipy's array-API checks look for torch.Tensor once a `torch` module is present
    stubs = (("scvi", {}), ("scvi.model", {"SCVI": None}), ("geomloss", {"SamplesLoss": None}),
             ("torch", {"from_numpy": None, "Tensor": type("Tensor", (), {})}))
    for name, attrs in stubs:
        if name not in sys.modules:   # not installed here and not used by the functions called
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attrs)
    t0 = time.perf_counter()
    import pandas as pd
    from efaar_benchmarking import benchmarking, efaar
    if pca_solver != "auto":   # the correctness check only: sklearn's exact solver instead of its choice
        import functools

        from sklearn.decomposition import PCA
        efaar.PCA = functools.partial(PCA, svd_solver=pca_solver)
    times = {"imports": time.perf_counter() - t0}
    t = time.perf_counter()
    df = pd.read_parquet(features)
    cols = [c for c in df.columns if str(c).startswith("feature_")]
    x, md = df[cols].to_numpy(), df.drop(columns=cols)
    del df
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = efaar.embed_by_pca(x, md, 128, batch_col="batch")
    del x
    times["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = efaar.tvn_on_controls(emb, md, "gene", CONTROL, batch_col="batch")
    times["tvn"] = time.perf_counter() - t
    t = time.perf_counter()
    agg = efaar.aggregate(emb, md, "gene", keys_to_remove=[CONTROL], method="mean")
    times["aggregate"] = time.perf_counter() - t
    t = time.perf_counter()
    table = benchmarking.known_relationship_benchmark(agg, "gene", benchmark_sources=SOURCES,
                                                      recall_thr_pairs=THRESHOLDS, benchmark_data_dir=annotations)
    times["recall"] = time.perf_counter() - t
    records = [{k: getattr(v, "item", lambda: v)() for k, v in r.items()} for r in table.to_dict("records")]
    with open(out, "w") as f:
        json.dump({"recall": records, "timings_s": times}, f, indent=1)


# --- running and measuring ----------------------------------------------------------------------

def measure(cmd: list[str], log: Path) -> dict:
    """Runs cmd as a child; wall seconds and the child's peak RSS (os.wait4's ru_maxrss)."""
    load_before = os.getloadavg()[0]
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load_before, "load_after": os.getloadavg()[0]}


def ours_cmd(features: Path, annotations: Path, out: Path) -> list[str]:
    """eval.map_benchmark, writing out/report.json."""
    return [sys.executable, "-m", "eval.map_benchmark", "--embeddings", str(features), "--perturbation_col", "gene",
            "--batch_col", "batch", "--control", CONTROL, "--annotations", str(annotations), "--out", str(out),
            "--pca_components", "128", "--correction", "tvn", "--aggregate", "mean",
            "--thresholds", *[f"{lo},{hi}" for lo, hi in THRESHOLDS], "--sources", *SOURCES,
            "--no_mean_average_precision"]


def efaar_cmd(features: Path, annotations: Path, out: Path, pca_solver: str = "auto") -> list[str]:
    """EFAAR 1.0's functions (_efaar_child), writing out/report.json."""
    from eval.map_benchmark import REPORT
    return [sys.executable, str(Path(__file__).resolve()), "--efaar_child", str(features), str(annotations),
            str(out / REPORT), pca_solver]


def compare_recall(ours: list[dict], theirs: list[dict]) -> tuple[float, list[str]]:
    """(largest |difference| of a recall value, mismatches of sources or sizes)."""
    problems, worst = [], 0.0
    a, b = {r["source"]: r for r in ours}, {r["source"]: r for r in theirs}
    if list(a) != list(b):
        problems.append(f"sources differ: {list(a)} vs {list(b)}")
    for s in set(a) & set(b):
        for key in b[s]:
            if key == "source":
                continue
            if key.endswith("_size"):
                if int(a[s][key]) != int(b[s][key]):
                    problems.append(f"{s} {key}: {a[s][key]} vs {b[s][key]}")
            else:
                worst = max(worst, abs(float(a[s][key]) - float(b[s][key])))
    return worst, problems


def main(argv=None) -> int:
    from eval.map_benchmark import REPORT
    from maejax import flags
    p = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--perturbations", type=int, default=10000)
    p.add_argument("--num_features", deprecated="--features", type=int, default=1664)
    p.add_argument("--runs", type=int, default=3, help="alternating rounds (ours, EFAAR)")
    p.add_argument("--only", choices=("both", "ours", "efaar"), default="both")
    p.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    p.add_argument("--out", deprecated="--workdir", default="/tmp/map_speed_vs_efaar", metavar="DIR",
                   help="the parquet (reused while its parameters match), each run's report and log")
    p.add_argument("--exact_check", action="store_true",
                   help="also run EFAAR once (not timed) with sklearn's exact PCA solver (covariance_eigh) and "
                        "compare its recall with ours: EFAAR's PCA(128) picks sklearn's randomized solver for more "
                        "than 1,000 features, so its timed runs give a slightly different, seed-dependent map")
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args(argv)
    annotations, work = Path(args.annotations), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    features = work / f"screen_{args.perturbations}x{args.num_features}.parquet"
    t = time.perf_counter()
    params = write_screen(features, args.perturbations, args.num_features, annotations)
    rows = params["perturbations"] * params["replicates"] * params["batches"] + \
        params["controls_per_batch"] * params["batches"]
    matrix_gib = rows * args.num_features * 4 / 2**30
    print(f"screen {features} ({features.stat().st_size / 2**30:.2f} GiB, ready in {time.perf_counter() - t:.1f} s): "
          f"{rows:,} rows x {args.num_features} float32 features = {matrix_gib:.2f} GiB "
          f"({rows * args.num_features * 4 / 1e9:.2f} GB) feature matrix")
    print("ours: eval.map_benchmark, PCA 128, TVN, mean, recall on the five tables + replicate consistency; "
          "copairs mAP off (--no_mean_average_precision: not part of this case)")
    kinds = ["ours", "efaar"] if args.only == "both" else [args.only]
    runs = {k: [] for k in kinds}
    for i in range(args.runs):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            out = work / f"{kind}_{i}"
            out.mkdir(exist_ok=True)
            cmd = (ours_cmd if kind == "ours" else efaar_cmd)(features, annotations, out)
            r = measure(cmd, work / f"{kind}_{i}.log")
            r["report"] = json.loads((out / REPORT).read_text())
            runs[kind].append(r)
            print(f"round {i + 1} {kind:5s}: {r['wall_s']:6.2f} s wall, {r['cpu_s']:6.1f} s CPU, "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB ({r['peak_rss_gib'] / matrix_gib:.2f}x the matrix), "
                  f"load average {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
    summary = {"rows": rows, "features": args.num_features, "matrix_gib": matrix_gib, "load_avg_end": os.getloadavg()}
    for kind, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        summary[kind] = {"wall_s": walls, "median_s": statistics.median(walls),
                         "peak_rss_gib": [r["peak_rss_gib"] for r in rs],
                         "max_peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                         "stages_s": [r["report"].get("timings_s") for r in rs]}
        print(f"{kind:5s}: median {summary[kind]['median_s']:6.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}); "
              f"peak RSS max {summary[kind]['max_peak_rss_gib']:.2f} GiB = "
              f"{summary[kind]['max_peak_rss_gib'] / matrix_gib:.2f}x the feature matrix")
    if len(kinds) == 2:
        ratio = summary["efaar"]["median_s"] / summary["ours"]["median_s"]
        worst, problems = compare_recall(runs["ours"][0]["report"]["recall"], runs["efaar"][0]["report"]["recall"])
        summary.update(ratio=ratio, recall_max_abs_diff=worst, recall_problems=problems)
        print(f"ratio EFAAR / ours (median to median): {ratio:.2f}x")
        print(f"recall, ours vs EFAAR: largest |difference| {worst:.2e} over "
              f"{len(runs['ours'][0]['report']['recall'])} sources x {len(THRESHOLDS)} thresholds"
              + (f"; MISMATCH: {problems}" if problems else "; same sources and null/query sizes"))
        for rec in runs["ours"][0]["report"]["recall"]:
            print("  ours ", json.dumps(rec))
        for rec in runs["efaar"][0]["report"]["recall"]:
            print("  efaar", json.dumps(rec))
        if args.num_features > 1000:
            print("  (EFAAR's PCA(128) uses sklearn's randomized solver above 1,000 features, unseeded, so its map "
                  "differs slightly from the exact one; --exact_check compares against its exact solver)")
    if args.exact_check and "ours" in runs:
        out = work / "efaar_exact"
        out.mkdir(exist_ok=True)
        r = measure(efaar_cmd(features, annotations, out, "covariance_eigh"), work / "efaar_exact.log")
        exact = json.loads((out / REPORT).read_text())["recall"]
        ours = runs["ours"][0]["report"]["recall"]
        worst, problems = compare_recall(ours, exact)
        queries = min(rec["query_distribution_size"] for rec in ours)
        summary.update(exact_recall_max_abs_diff=worst, exact_recall_problems=problems)
        print(f"recall, ours vs EFAAR with sklearn's exact PCA (covariance_eigh; {r['wall_s']:.1f} s, not timed): "
              f"largest |difference| {worst:.2e} (one query of the smallest table is {1 / queries:.1e})"
              + (f"; MISMATCH: {problems}" if problems else "; same sources and null/query sizes"))
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        for rs in runs.values():
            for r in rs:
                r.pop("report")
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--efaar_child":
        _efaar_child(*sys.argv[2:])
    else:
        sys.path.insert(0, str(ROOT))
        sys.exit(main())
