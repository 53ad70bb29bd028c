"""The main job end to end at the tiny preset: synthetic screen -> MAE training with checkpoints -> eval of
the trained MAE, the untrained architecture and hand-crafted features -> the table and report.json."""
from __future__ import annotations

import json
import math

import pytest

from eval import job
from launch import demo
from maejax.checkpoint import Checkpoints


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, demo.run(str(workdir), preset="tiny")


def test_report_json_holds_the_three_feature_kinds(main_job):
    workdir, reports = main_job
    saved = json.loads((workdir / "report.json").read_text())
    assert set(saved) == {"mae", "random_init", "handcrafted", "timings"}
    assert saved == json.loads(json.dumps(reports))
    for kind in job.FEATURES:
        report = saved[kind]
        blocks = report["blocks"]
        assert report["best"] == blocks[report["best_block"] - 1]
        for row in blocks:
            for record in row["recall"]:
                assert 0.0 <= record["recall_0.05_0.95"] <= 1.0
            for probe in row["probes"].values():
                assert 0.0 <= probe["test"] <= 1.0
    # the MAE and its untrained twin have one row per transformer block (tiny preset: mu/8, 2 blocks)
    assert len(saved["mae"]["blocks"]) == len(saved["random_init"]["blocks"]) == 2
    assert all(t >= 0 for t in saved["timings"].values())


def test_training_left_its_checkpoint_and_metrics(main_job):
    workdir, _ = main_job
    ckpts = Checkpoints(str(workdir / "checkpoints"))
    try:
        assert ckpts.latest_step() == 6                      # the tiny preset's total_steps
    finally:
        ckpts.close()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    table = (workdir / "parameters.txt").read_text()             # clu's parameter overview
    assert "encoder/" in table and "decoder/" in table and "Total:" in table
    for kind in job.FEATURES:
        out = workdir / "eval" / kind
        assert (out / "report.json").exists() and (out / "embeddings.parquet").exists()
        assert (out / "blocks.png").stat().st_size > 0


def test_the_table_lists_every_model_and_its_chance_levels(main_job):
    _, reports = main_job
    text = demo.table(reports)
    for kind in job.FEATURES:
        assert kind in text
    assert "chance: " in text and "experiment 0.500" in text       # tiny screen: 2 experiments
