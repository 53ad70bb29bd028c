"""Scaling curves from run directories: FLOPs and parameters from each run's config, scores from its eval
report, and the table / plot outputs; the sweep configs."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from eval import scaling
from maejax import config as config_lib
from maejax.models.flops import abstract_model, count_params

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "scaling.py")
DATA_CROPS = {"small": 3456, "large": 13824}


def _report(depth: int, recall: float, probe: float, step: int) -> dict:
    blocks = []
    for k in range(depth):
        scale = (k + 1) / depth
        rec = [{"source": s, "recall_0.05_0.95": recall * scale} for s in ("SyntheticComplex", "SyntheticPathway")]
        blocks.append({"block": k + 1, "recall": rec, "recall_mean": {"recall_0.05_0.95": recall * scale},
                       "consistency": {"replicate_consistency": {"ks_statistic": 0.5 * scale, "cvm_statistic": 9.0}},
                       "probes": {"perturbation": {"val": probe * scale, "test": probe * scale},
                                  "experiment": {"val": 0.4, "test": 0.4}}})
    return {"best_block": depth, "best": blocks[-1], "blocks": blocks, "checkpoint_step": step}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three fake runs: mu/8 and Ti/8 (depth 2) on `small`, mu/8 on `large` for half the steps."""
    root = tmp_path_factory.mktemp("scaling")
    for name, crops in DATA_CROPS.items():
        os.makedirs(root / "datasets" / name)
        (root / "datasets" / name / "manifest.json").write_text(json.dumps({"num_records": crops}))
    specs = {"mu8-small": ("mu/8", 0, "small", 300, 0.2, 0.3), "Ti8d2-small": ("Ti/8", 2, "small", 300, 0.3, 0.5),
             "mu8-large": ("mu/8", 0, "large", 150, 0.25, 0.35)}
    for run, (variant, depth, data, steps, recall, probe) in specs.items():
        config = config_lib.load(f"{CONFIG}:variant={variant},depth={depth},data={data},root={root},steps={steps}")
        os.makedirs(root / "runs" / run / "eval" / "mae")
        (root / "runs" / run / "config.json").write_text(config.to_json())
        report = _report(2, recall, probe, steps)
        (root / "runs" / run / "eval" / "mae" / "report.json").write_text(json.dumps(report))
    baseline = root / "handcrafted.json"
    baseline.write_text(json.dumps(_report(1, 0.22, 0.4, None)))
    return root, scaling.summarize([str(root / "runs")], str(root / "summary"),
                                   baselines=[("handcrafted", str(baseline))])


def test_flops_and_params_come_from_the_configs(runs):
    root, result = runs
    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == {"mu8-small", "Ti8d2-small", "mu8-large"}
    mu, ti, large = rows["mu8-small"], rows["Ti8d2-small"], rows["mu8-large"]
    assert mu["train_flops"] == pytest.approx(2 * large["train_flops"])     # same model, half the steps
    assert ti["train_flops"] > mu["train_flops"] and ti["encoder_params"] > 3 * mu["encoder_params"]
    config = config_lib.load(f"{CONFIG}:variant=Ti/8,depth=2,root={root}")
    assert ti["params"] == count_params(config.model) and 0 < ti["encoder_params"] < ti["params"]
    per_crop = abstract_model(config.model).flops_per_crop(64, 64)["train"]
    assert ti["train_flops"] == pytest.approx(per_crop * 300 * 32)
    assert (mu["crops_seen"], mu["data"], mu["data_crops"]) == (300 * 32, "small", 3456)
    assert large["epochs"] == pytest.approx(150 * 32 / 13824)


def test_scores_are_the_chosen_blocks(runs):
    _, result = runs
    ti = next(r for r in result["rows"] if r["run"] == "Ti8d2-small")
    assert ti["best_block"] == 2 and ti["depth"] == 2
    assert ti["recall"] == pytest.approx(0.3) and ti["recall_SyntheticComplex"] == pytest.approx(0.3)
    assert ti["probe_perturbation"] == pytest.approx(0.5) and ti["probe_experiment"] == pytest.approx(0.4)
    assert ti["ks"] == pytest.approx(0.5) and ti["cvm"] == pytest.approx(9.0)
    (base,) = result["baselines"]
    assert base["run"] == "handcrafted" and base["recall"] == pytest.approx(0.22)


def test_outputs(runs):
    root, result = runs
    paths = result["paths"]
    table = pd.read_csv(paths["csv"])
    assert len(table) == 4 and set(table.run) == {"mu8-small", "Ti8d2-small", "mu8-large", "handcrafted"}
    md = open(paths["md"]).read()
    assert md.count("\n") == 2 + 4 and "| Ti8d2-small |" in md and "small (3,456)" in md
    assert json.load(open(paths["json"]))["runs"] == result["rows"]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_report_and_bad_config(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "config.json").write_text((root / "runs" / "mu8-small" / "config.json").read_text())
    with pytest.raises(ValueError, match="eval/mae/report.json does not exist: evaluate the run first"):
        scaling.summarize([str(run)], str(tmp_path / "out"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no run directory"):
        scaling.find_runs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="data='huge'"):
        config_lib.load(f"{CONFIG}:data=huge")
