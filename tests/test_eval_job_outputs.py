"""The eval job end to end on a small synthetic screen with image artefacts (the fast hand-crafted features,
so no model has to train): every block gets recall and consistency, every probe task runs, the outputs are
written, the report keeps the keys the demo reads, and a run saved before the probe tasks existed still
evaluates. The CellProfiler-grade kind gives one finite row per well."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pytest

from data.synthetic_screen import generate_screen
from eval import job, screen
from maejax import config as config_lib
from maejax.checkpoint import Checkpoints
from tests.tiny_training import jsonl_rows

SCREEN = dict(preset="tiny", seed=1, num_experiments=3, plates_per_experiment=2, artifact_fraction=0.3)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A fake run (a checkpoint holding only an old-style config) evaluated with the fast hand-crafted
    features."""
    root = tmp_path_factory.mktemp("evaljob")
    dataset = generate_screen(root / "screen", **SCREEN)
    config = config_lib.base()
    config.data.dir = str(dataset)
    config.eval.pca_components = 8
    stored = json.loads(config.to_json())
    for key in ("tasks", "select_by", "probe_model", "split_fractions", "groups", "negative_controls"):
        del stored["eval"][key]                       # as saved before the probe tasks existed
    ckpts = Checkpoints(str(root / "run" / "checkpoints"))
    ckpts.save(1, model_state={"w": np.zeros(2)}, optimizer_state={"w": np.zeros(2)},
               meta={"step": 1, "config": stored}, force=True)
    ckpts.close()
    report = job.evaluate("handcrafted_fast", str(root / "run"))
    return report, dataset


def test_report_has_what_the_demo_reads(evaluated):
    report, _ = evaluated
    assert report["best_block"] == 1 and len(report["blocks"]) == 1       # hand-crafted: one "block"
    best = report["best"]
    assert best is report["blocks"][0] and best["block"] == 1
    assert {r["source"] for r in best["recall"]} == {"SyntheticComplex", "SyntheticPathway"}
    assert all("recall_0.05_0.95" in r for r in best["recall"]) and "recall_0.05_0.95" in best["recall_mean"]
    assert best["probe_test"] == report["tasks"]["perturbation"]["test"][0]
    assert report["selected_by"].startswith("perturbation")


def test_every_block_has_consistency_and_every_task_ran(evaluated):
    report, _ = evaluated
    cons = report["best"]["consistency"]
    assert cons["perturbation_consistency"]["null"] == "negative_controls"   # the screen's null genes
    assert cons["replicate_consistency"]["replicates"] == "experiment"
    # replicates agree beyond chance (screen v2, tiny: 0.135; a null of random groups gives about 0)
    assert cons["replicate_consistency"]["ks_statistic"] > 0.08
    assert set(report["tasks"]) == {"perturbation", "functional_group", "qc", "experiment"}
    for name, task in report["tasks"].items():
        assert "skipped" not in task, (name, task)
        assert task["best_block_test"] > task["chance"] or not task["higher_is_better"], (name, task)
    assert report["tasks"]["qc"]["num_classes"] == 5
    assert report["tasks"]["functional_group"]["level"] == "well"
    assert report["eval_config"]["tasks"] == ["perturbation", "functional_group", "qc", "experiment"]


def test_outputs(evaluated):
    report, dataset = evaluated
    paths = report["outputs"]
    saved = json.loads(open(paths["report"]).read())
    assert saved["best_block"] == report["best_block"] and saved["tasks"].keys() == report["tasks"].keys()
    assert not [k for k in saved if k.startswith("_")]
    assert {"activity", "consistency"} <= set(saved["best"]["mean_average_precision"])   # JUMP-CP's mAP
    table = pd.read_parquet(paths["embeddings"])
    assert len(table) == report["num_wells"] == len(pd.read_parquet(dataset / "metadata.parquet")
                                                    .drop_duplicates(["experiment", "plate", "well"]))
    assert sum(c.startswith("feature_") for c in table.columns) == report["_well_features"].shape[1]
    for key in ("plot", "similarity_plot"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics_go_to_the_runs_writers(evaluated):
    """The run's log.writers (base()'s default for a run saved before the key existed) but the console:
    one row at the checkpoint's step in <out>/metrics.jsonl, the same scalars in <out>/tensorboard."""
    report, _ = evaluated
    out = pathlib.Path(report["outputs"]["report"]).parent
    rows = jsonl_rows(out / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert rows[0]["eval/best_block"] == report["best_block"]
    assert rows[0]["eval/recall_0.05_0.95"] == pytest.approx(report["best"]["recall_mean"]["recall_0.05_0.95"])
    assert rows[0]["eval/perturbation_test"] == pytest.approx(report["tasks"]["perturbation"]["best_block_test"])
    assert {"eval/replicate_ks", "eval/map_activity"} <= set(rows[0])
    assert list((out / "tensorboard").glob("events.*"))
    assert not (out / "images").exists()      # hand-crafted features: no model, no reconstructions


def test_eval_config_overrides(evaluated):
    stored = config_lib.base().eval
    e = job.eval_config(stored, {"tasks": ["qc"], "probe_model": "logistic", "split_fractions": "[0.6, 0.2, 0.2]"})
    assert list(e.tasks) == ["qc"] and e.probe_model == "logistic" and list(e.split_fractions) == [0.6, 0.2, 0.2]
    with pytest.raises(KeyError, match="'eval_tasks'"):
        job.eval_config(stored, {"eval_tasks": ["qc"]})
    _, dataset = evaluated
    truth = json.loads((dataset / "ground_truth.json").read_text())
    assert job.negative_controls("ground_truth", str(dataset)) == truth["null_genes"]
    assert job.negative_controls("random", str(dataset)) is None
    with pytest.raises(ValueError, match="eval.negative_controls='nulls.txt'"):
        job.negative_controls("nulls.txt", str(dataset))


def test_summary_names_lower_is_better(evaluated):
    report, _ = evaluated
    text = job.summary(report)
    assert "experiment: test balanced accuracy" in text and "lower is better" in text
    assert screen.public(report).keys() == {k for k in report if not k.startswith("_")}


def test_cellprofiler_kind_gives_one_finite_row_per_well(evaluated):
    _, dataset = evaluated
    feats, meta, _, dataset_dir, step = job.features_for("handcrafted", str(dataset.parent / "run"), None, None)
    wells = pd.read_parquet(dataset / "metadata.parquet").groupby(["experiment", "plate", "well"]).ngroups
    assert step == 1 and dataset_dir == str(dataset)
    assert feats.ndim == 2 and len(feats) == len(meta) == wells and np.isfinite(feats).all()
    assert meta.groupby(["experiment", "plate", "well"]).size().max() == 1
