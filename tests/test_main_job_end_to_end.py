"""The main job end to end at the tiny preset: synthetic screen -> MAE training with checkpoints -> masked
loss against interpolation -> eval of the oracle, the trained MAE, the untrained architecture and both
hand-crafted baselines -> the table with intervals, report.json in its documented schema, the figure."""
from __future__ import annotations

import json
import math

import pytest

from launch import demo
from maejax.checkpoint import Checkpoints
from tests.tiny_training import jsonl_rows


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, demo.run(str(workdir), preset="tiny", seed=3)


def _is_record(rec):
    lo, hi = rec["ci95"]
    return set(rec) == {"value", "ci95"} and math.isfinite(rec["value"]) and lo <= rec["value"] + 1e-9 \
        and rec["value"] <= hi + 1e-9


def test_report_schema(main_job):
    workdir, reports = main_job
    saved = json.loads((workdir / "report.json").read_text())
    assert saved == json.loads(json.dumps(reports))
    assert set(saved) == set(demo.ROWS) | {"loss", "screen", "timings"}
    assert saved["screen"]["seed"] == 3 and saved["screen"]["genes"] > 0
    assert len(saved["screen"]["families"]) == 6
    for kind in demo.ROWS:
        r = saved[kind]
        assert isinstance(r["block"], int) and 1 <= r["block"] <= r["num_blocks"]
        assert set(r["recall"]) == set(demo.RECALL) and all(_is_record(v) for v in r["recall"].values())
        assert r["probe"] and set(r["probe"]) <= set(demo.PROBES)    # tiny: 2 wells per gene, no perturbation test wells
        assert all(_is_record(v) for v in r["probe"].values())
        assert set(r["by_family"]) <= set(saved["screen"]["families"]) and r["by_family"]
        for fam in r["by_family"].values():
            assert set(fam) == {"recall", "probe"}
            assert all(_is_record(v) for part in fam.values() for v in part.values())
        assert r["blocks"][r["block"] - 1]["recall"] == r["recall"]
    # the MAE and its untrained twin have one row per transformer block (tiny preset: mu/8, 2 blocks)
    assert saved["mae"]["num_blocks"] == saved["random_init"]["num_blocks"] == 2
    assert saved["oracle"]["num_blocks"] == 1
    loss = saved["loss"]
    assert math.isfinite(loss["mae"]) and math.isfinite(loss["interpolation"]) and loss["num_crops"] > 0
    assert all(t >= 0 for t in saved["timings"].values())
    assert (workdir / "report.png").stat().st_size > 0


def test_training_left_its_checkpoint_and_metrics(main_job):
    workdir, _ = main_job
    ckpts = Checkpoints(str(workdir / "checkpoints"))
    try:
        assert ckpts.latest_step() == 6                      # the tiny preset's total_steps
    finally:
        ckpts.close()
    losses = [r["loss"] for r in jsonl_rows(workdir / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    table = (workdir / "parameters.txt").read_text()             # clu's parameter overview
    assert "encoder/" in table and "decoder/" in table and "Total:" in table
    for kind in demo.ROWS:
        out = workdir / "eval" / kind
        assert (out / "report.json").exists() and (out / "embeddings.parquet").exists()
        # the eval's numbers in the run's writers at the checkpoint's step; the models' reconstructions too
        assert [r["step"] for r in jsonl_rows(out / "metrics.jsonl")] == [6]
        assert list((out / "tensorboard").glob("events.*"))
        pictures = sorted(p.name for p in (out / "images").glob("*.png")) if (out / "images").exists() else []
        assert pictures == (["eval_reconstruction.6.png"] if kind in ("mae", "random_init") else [])


def test_the_table_shows_intervals_families_and_the_loss(main_job):
    _, reports = main_job
    text = demo.table(reports)
    for kind in demo.ROWS:
        assert kind in text
    assert text.count("[") >= 4 * len(demo.ROWS)               # an interval per figure
    assert "by phenotype family" in text and "colocalisation" in text
    assert "interpolation of the visible pixels" in text


def test_a_workdir_with_another_seeds_screen_is_refused(tmp_path, monkeypatch, capsys):
    """`launch.demo --seed 1` into a workdir whose screen has seed 0 would silently reuse it: one line, exit 2,
    nothing trained."""
    import sys
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps({"params": {"preset": "tiny", "seed": 0}}))
    monkeypatch.setattr(sys, "argv", ["launch.demo", f"--workdir={tmp_path}", "--preset=tiny", "--seed=1"])
    with pytest.raises(SystemExit) as exit_:
        demo.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"DemoError: {tmp_path}/dataset holds the screen of preset 'tiny', seed 0, not of --preset tiny "
                   f"--seed 1: use a new --workdir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
