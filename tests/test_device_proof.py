"""benchmarks/device_proof.py: its dry run (CPU, tiny shapes, the GPU run's code paths) writes every section
with numeric figures; the batch search and the trace summary on made-up inputs."""
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import device_proof as dp

REPO = Path(__file__).resolve().parents[1]


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_proof")
    env = dict(os.environ)   # one CPU device, not conftest's 8; LLVM level 0 as every test compile
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_proof", "--out", str(out), "--dry_run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "device_proof.json").read_text())
    print(f"dry run: {wall:.1f} s wall (script's own count {doc['elapsed_s']:.1f} s)")
    return doc, out


def test_dry_run_writes_every_section_with_numeric_figures(dry_run):
    doc, out = dry_run
    assert doc["dry_run"] and "finished" in doc and "error" not in doc and "aborted" not in doc
    assert set(doc["sections"]) == set(dp.SECTIONS)
    env = doc["environment"]
    assert env["platform"] == "cpu" and _num(env["capacity_bytes"]) and _num(env["peak_flops"])
    assert env["modules"]["jax"] != "missing"
    log = (out / "device_proof.log").read_text()
    for name in dp.SECTIONS:
        assert f"== {name}" in log

    parity = doc["sections"]["parity"]
    assert "cudnn_skipped" in parity and parity["candidate"] == "xla"
    assert {r["dtype"] for r in parity["rows"]} == {"bfloat16", "float32"}
    for row in parity["rows"]:
        assert row["status"] == "ok", row
        for key in ("xla_vs_xla", "xla_vs_f32_reference"):
            assert set(row[key]) == {"fwd", "dq", "dk", "dv"}
            assert all(_num(v[m]) for v in row[key].values() for m in ("max_abs", "max_rel"))
        assert row["xla_vs_xla"]["fwd"]["max_abs"] == 0.0

    for key in ("train_l8", "train_g8"):
        sec = doc["sections"][key]
        ok = [r for r in sec["rows"] if r["status"] == "ok"]
        assert ok, sec["rows"]
        for r in ok:
            assert r["remat"] == "full" and r["dtype"] == "bfloat16" and r["param_dtype"] == "float32"
            for f in ("batch", "step_s", "crops_per_s", "tflops_per_device", "mfu", "compile_s", "loss"):
                assert _num(r[f]), (f, r)
            assert _num(r["memory"]["peak"]) and r["memory"]["peak"] <= r["capacity_bytes"]
            assert r["search"] and all(_num(t["compile_s"]) for t in r["search"])
            assert any(t["fits"] and t["batch"] == r["batch"] for t in r["search"])
        for r in sec["rows"]:
            if r["attention"] == "cudnn":   # no cuDNN on a CPU: skipped, with the reason
                assert r["status"] == "skipped" and "CUDA" in r["error"]
        assert _num(sec["best"]["mfu"])

    inf = doc["sections"]["inference"]
    ok = [r for r in inf["rows"] if r["status"] == "ok"]
    assert ok
    for f in ("crops_per_s", "tflops_per_device", "of_peak", "step_s", "end_to_end_crops_per_s"):
        assert _num(ok[0][f]), (f, ok[0])
    assert ok[0]["blocks_shape"][1] == 2 and ok[0]["blocks_finite"]   # mu/8: 2 blocks, every one returned

    sweep = doc["sections"]["map_sweep"]
    assert sweep["status"] == "ok" and sweep["pca_backend_used"] == "jax"
    assert sweep["blocks_measured"] == 2 and not sweep["extrapolated"]
    assert all(_num(b[k]) for b in sweep["per_block"] for k in ("pca", "tvn", "agg", "recall", "total_s"))
    assert _num(sweep["sweep_s"]) and _num(sweep["median_block_s"])
    assert len(sweep["recall_block0"]) == 5

    prof = doc["sections"]["profiles"]
    for name in ("train", "inference", "map_sweep"):   # a dry run profiles whatever the figures
        assert prof[name]["status"] == "ok", prof[name]
        assert prof[name]["top_ops"] and all(_num(o["total_ms"]) for o in prof[name]["top_ops"])


def test_batch_search_doubles_to_the_largest_fit_and_halves_when_the_start_does_not_fit():
    GiB = 2**30

    def fake(per_crop, fixed, fail_above=None):
        calls = []

        def compile_at(b):
            calls.append(b)
            if fail_above and b > fail_above:
                raise RuntimeError("RESOURCE_EXHAUSTED: compiler ran out of memory")
            return {"memory": {"peak": fixed + per_crop * b, "argument": fixed, "temp": per_crop * b}}
        return compile_at, calls

    compile_at, calls = fake(0.1 * GiB, 10 * GiB)       # fits up to 900 crops in 100 GiB
    best, tried = dp.search_batch(compile_at, 64, 4096, 100 * GiB, lambda: True)
    assert best["batch"] == 512 and calls == [64, 512]   # jumps by the memory model, one check
    compile_at, calls = fake(0.1 * GiB, 10 * GiB)
    best, _ = dp.search_batch(compile_at, 64, 256, 100 * GiB, lambda: True)
    assert best["batch"] == 256                          # capped
    compile_at, calls = fake(1.0 * GiB, 10 * GiB)       # 64 crops need 74 GiB of 40
    best, tried = dp.search_batch(compile_at, 64, 4096, 40 * GiB, lambda: True)
    assert best["batch"] == 16 and calls == [64, 32, 16] and [t["fits"] for t in tried] == [False, False, True]
    compile_at, calls = fake(0.01 * GiB, 1 * GiB, fail_above=128)   # the compiler itself refuses
    best, tried = dp.search_batch(compile_at, 64, 4096, 100 * GiB, lambda: True)
    assert best["batch"] == 128 and "RESOURCE_EXHAUSTED" in tried[1]["error"]
    compile_at, _ = fake(1.0 * GiB, 200 * GiB)           # nothing fits: None, every try recorded
    best, tried = dp.search_batch(compile_at, 4, 4096, 100 * GiB, lambda: True)
    assert best is None and [t["batch"] for t in tried] == [4, 2, 1]


def test_trace_summary_counts_device_ops(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "XLA Ops"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "XLA Modules"}},
              {"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}}]
    events += [{"ph": "X", "pid": 1, "tid": 2, "name": "fusion.1", "dur": 30.0}] * 3
    events += [{"ph": "X", "pid": 1, "tid": 2, "name": "custom-call.7", "dur": 10.0},
               {"ph": "X", "pid": 1, "tid": 3, "name": "jit_train_step", "dur": 100.0},
               {"ph": "X", "pid": 9, "tid": 1, "name": "host_thing", "dur": 1000.0}]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = dp.summarize_trace(tmp_path)
    assert s["where"] == "device: XLA Ops" and s["total_ms"] == pytest.approx(0.1)
    assert s["top_ops"][0] == {"name": "fusion.1", "total_ms": pytest.approx(0.09), "count": 3,
                               "share": pytest.approx(0.9)}
    assert [k["kind"] for k in s["by_kind"]] == ["fusion", "custom-call"]
