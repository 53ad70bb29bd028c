"""Real screens end to end (issue 10): fake RxRx3-core, RxRx1 and JUMP-CP screens in their published
layouts, with real gene symbols from the EFAAR tables, go raw files -> `data.sources.*` build -> a model
-> `eval.job` against the real relationship tables -> recall (and probes) for every block:
- RxRx3-core: a tiny training run, tables found by the default lookup (efaar_benchmarking's), probes;
- the OpenPhenom-layout model, converted from a Hugging Face snapshot folder with --workdir, on RxRx1
  (6 channels, tables named with --annotations, probes) and on JUMP-CP built with 4 of its channels.
One training run and three evaluations: the train step's compile and each evaluation's embedding compile
are most of the time.
Also: the map settings come from the manifest (controls, other controls left out) and the shared defaults,
and what cannot work is one line before anything is embedded."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.crop_builder import BuildOptions, build_dataset
from data.cropping import CropSpec
from data.sources.jump_cp import JumpCP
from data.sources.rxrx1 import RxRx1
from data.sources.rxrx3_core import RxRx3Core
from eval import annotations as annotations_lib, job, map_benchmark
from maejax import config as config_lib, convert
from tests import fake_screens, tiny_training
from tests.reference_data import ANNOTATIONS, OPENPHENOM, require

# Every one of the five EFAAR tables has pairs among these (CORUM PSMA1-PSMA2, SMAD3-SMAD4, CDKN1A-TP53;
# HuMAP PSMA1-PSMB1; Reactome and SIGNOR MDM2-TP53, AKT1-MTOR; StringDB many), so each source gives a recall.
GENES = ["TP53", "MDM2", "CDKN1A", "PSMA1", "PSMA2", "PSMB1", "SMAD3", "SMAD4", "AKT1", "MTOR"]
EXPERIMENTS = 3            # one plate each: 3 wells per gene, so every perturbation probe class has a test well
CONTROL_WELLS = 4          # per plate: TVN on each experiment's controls needs at least 2
EFAAR_MAP = {"eval.pca_components": 128, "eval.correction": "tvn", "eval.thresholds": [[0.05, 0.95], [0.1, 0.9]],
             "eval.n_boot": 20}


def _wells(i: int) -> list[str]:
    return [f"{'ABCDEFGH'[k // 8]}{k % 8 + 2:02d}" for k in range(i)]


def fake_rxrx3_core(root: Path, seed: int = 0) -> Path:
    """The Hugging Face layout (parquet shards of JPEG-2000 channel images + metadata CSV): CRISPR wells of
    GENES, EMPTY_control wells and one compound well per plate."""
    rng = np.random.default_rng(seed)
    keys, cells, rows = [], [], []
    for e in range(EXPERIMENTS):
        layout = [(g, f"{g}_guide_1", "CRISPR") for g in GENES] + [("", "RXCMPD-17", "COMPOUND")] \
            + [("EMPTY_control", "EMPTY_control", "CRISPR")] * CONTROL_WELLS
        for address, (gene, treatment, kind) in zip(_wells(len(layout)), layout):
            rows.append({"well_id": f"gene-00{e}_1_{address}", "experiment_name": f"gene-00{e}", "plate": 1,
                         "address": address, "gene": gene, "treatment": treatment, "SMILES": "",
                         "concentration": "0.25" if kind == "COMPOUND" else "", "perturbation_type": kind,
                         "cell_type": "HUVEC"})
            for c in range(1, 7):
                keys.append(f"gene-00{e}/Plate1/{address}_s1_{c}")
                cells.append({"bytes": fake_screens.jp2_bytes(fake_screens.image(rng)),
                              "path": f"{address}_s1_{c}.jp2"})
    (root / "data").mkdir(parents=True)
    pd.DataFrame({"__key__": keys, "jp2": cells}).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows).to_csv(root / "metadata_rxrx3_core.csv", index=False)
    return root


def fake_rxrx1(root: Path, seed: int = 1) -> Path:
    """metadata.csv + images/{experiment}/Plate1/{well}_s1_w{1..6}.png: GENES, a positive control and EMPTY
    negative controls. The `sirna` column holds gene symbols here (real RxRx1 names siRNAs, e.g. s21721:
    docs/real_data.md says what recall then needs)."""
    rng = np.random.default_rng(seed)
    rows = []
    for experiment in ("HUVEC-01", "HUVEC-02", "RPE-01")[:EXPERIMENTS]:
        layout = [(g, "treatment") for g in GENES] + [("s502431", "positive_control")] \
            + [("EMPTY", "negative_control")] * CONTROL_WELLS
        for i, (well, (sirna, well_type)) in enumerate(zip(_wells(len(layout)), layout)):
            rows.append({"site_id": f"{experiment}_1_{well}_1", "well_id": f"{experiment}_1_{well}",
                         "cell_type": experiment[:-3], "dataset": "train", "experiment": experiment, "plate": 1,
                         "well": well, "site": 1, "well_type": well_type, "sirna": sirna, "sirna_id": i})
            for c in range(1, 7):
                fake_screens.save(fake_screens.image(rng), fake_screens.rxrx1_file(root, experiment, 1, well, 1, c))
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def fake_jump(root: Path, seed: int = 2) -> Path:
    """cpg0016 layout: per-plate load_data.csv (6 channels, 16-bit TIFF), well.csv.gz and crispr.csv.gz with
    GENES, non-targeting and no-guide controls, one plate in each of two batches."""
    rng = np.random.default_rng(seed)
    jcp = {g: f"JCP2022_9{i:05d}" for i, g in enumerate(GENES + ["non-targeting", "no-guide"])}
    wells = []
    for b in range(2):
        batch, plate = f"2021_0{b + 4}_01_Batch{b + 1}", f"BR0000{b + 1}"
        layout = GENES + ["non-targeting"] * 3 + ["no-guide"] * 2
        rows = []
        for well, name in zip(_wells(len(layout)), layout):
            wells.append({"Metadata_Source": "source_4", "Metadata_Plate": plate, "Metadata_Well": well,
                          "Metadata_JCP2022": jcp[name]})
            row = {"Metadata_Source": "source_4", "Metadata_Batch": batch, "Metadata_Plate": plate,
                   "Metadata_Well": well, "Metadata_Site": 1}
            for k, channel in enumerate(fake_screens.JUMP_CHANNELS):
                name_k = f"r{well}f01p01-ch{k + 1}sk1fk1fl1.tiff"
                fake_screens.save(fake_screens.image(rng, np.uint16), root / "images" / plate / name_k)
                row |= {f"FileName_Orig{channel}": name_k, f"PathName_Orig{channel}": str(root / "images" / plate)}
            rows.append(row)
        folder = root / "workspace" / "load_data_csv" / batch / plate
        folder.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(folder / "load_data.csv", index=False)
    pd.DataFrame(wells).to_csv(root / "well.csv.gz", index=False)
    pd.DataFrame({"Metadata_JCP2022": list(jcp.values()), "Metadata_Symbol": list(jcp)}).to_csv(
        root / "crispr.csv.gz", index=False)
    return root


def build(source, out: Path, crop: int) -> Path:
    return build_dataset(source, out, BuildOptions(crop=CropSpec(size=crop), image_size=(64, 64), progress=False)).path


def run_eval(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["eval.job", *map(str, args)])
    try:
        job.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def check_report(report: dict, blocks: int, probes: tuple[str, ...] = ()) -> None:
    """Recall of every EFAAR source at both threshold pairs, and consistency, for every block; the probe
    tasks ran on every block."""
    assert len(report["blocks"]) == blocks
    for row in report["blocks"]:
        sources = {r["source"] for r in row["recall"]}
        assert sources == {"CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB"}, sources
        for r in row["recall"]:
            assert r["query_distribution_size"] > 0
            assert 0 <= r["recall_0.05_0.95"] <= 1 and 0 <= r["recall_0.1_0.9"] <= 1
        assert np.isfinite(row["consistency"]["replicate_consistency"]["ks_statistic"])
    for name in probes:
        task = report["tasks"][name]
        assert "skipped" not in task, task
        assert len(task["test"]) == blocks and all(np.isfinite(task["test"]))


# --------------------------------------------------------------------------------------------------------
# Trained on a real layout, evaluated against the real tables
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rxrx3_run(tmp_path_factory):
    """Fake RxRx3-core -> dataset (32 px tiles) -> a tiny training run (EFAAR map settings in its config)."""
    root = tmp_path_factory.mktemp("rxrx3")
    dataset = build(RxRx3Core(fake_rxrx3_core(root / "raw")), root / "crops", 32)
    from maejax.train import train
    config = tiny_training.tiny_config(dataset, total_steps=3, ckpt_every=3, **EFAAR_MAP)
    train(config, str(root / "run"))
    return root / "run", dataset


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The report's PNGs as empty files (matplotlib takes seconds per figure on this machine;
    tests/test_eval_job_outputs.py draws them)."""
    from eval import plots, screen
    monkeypatch.setattr(screen, "plot_blocks", lambda report, path, title="": Path(path).write_bytes(b""))
    monkeypatch.setattr(plots, "plot_similarity_distribution",
                        lambda sims, path, *a, **k: (Path(path).write_bytes(b""), path)[1])


def test_rxrx3_core_trained_run_evaluates_every_block_on_the_efaar_tables(rxrx3_run, monkeypatch, capsys):
    """No --annotations: the tables come from the installed efaar_benchmarking package (the dataset has
    none); the control is the manifest's (EMPTY_control), the map settings EFAAR's."""
    if annotations_lib.package_tables() is None:
        pytest.skip("efaar_benchmarking is not installed (requirements-nodeps.txt)")
    workdir, dataset = rxrx3_run
    code, out, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", "--tasks", "perturbation", "qc")
    assert code == 0, err
    report = json.loads((workdir / "eval" / "mae" / "report.json").read_text())
    check_report(report, blocks=2, probes=("perturbation",))
    settings = report["map_settings"]
    assert settings == {"control": "EMPTY_control", "drop": [], "batch_col": "experiment", "pca_batch_col": None,
                        "annotations": annotations_lib.package_tables(),
                        "channels": ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"],
                        "channel_index": [0, 1, 2, 3, 4, 5], "channel_ids": [0, 1, 2, 3, 4, 5]}
    assert report["correction"] == "tvn" and report["pca_components"] == 128
    assert report["tasks"]["qc"]["skipped"]           # a real screen has no qc labels
    assert "control EMPTY_control" in out and "tvn" in out
    assert {"report", "embeddings", "plot", "similarity_plot"} <= set(report["outputs"])
    print(f"rxrx3-core recall per block: {[b['recall_mean'] for b in report['blocks']]}")


# --------------------------------------------------------------------------------------------------------
# OpenPhenom: snapshot folder -> run directory -> every block, 6 and 4 channels
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openphenom_run(tmp_path_factory):
    """The OpenPhenom-layout encoder as a Hugging Face snapshot folder (model.safetensors + config.json),
    converted with --workdir."""
    ref = require(OPENPHENOM)
    root = tmp_path_factory.mktemp("openphenom")
    snapshot = root / "snapshot"
    snapshot.mkdir()
    shutil.copy(ref / "encoder_random_init.safetensors", snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "MAE", "mask_ratio": 0.75,
                                                      "decoder": {"num_heads": 16, "depth": 8}}))
    assert convert.main(["openphenom", "--weights", str(snapshot), "--workdir", str(root / "run")]) == 0
    return root / "run"


def test_converted_openphenom_is_a_run_directory(openphenom_run):
    assert (openphenom_run / "config.json").is_file()
    from maejax.checkpoint import Checkpoints, run_checkpoint_dir
    assert run_checkpoint_dir(str(openphenom_run)) == str(openphenom_run / "checkpoints")
    ckpts = Checkpoints(str(openphenom_run / "checkpoints"))
    try:
        meta = ckpts.meta(ckpts.latest_step())
    finally:
        ckpts.close()
    assert meta["converted_from"]["snapshot_config"].endswith("snapshot/config.json")
    assert meta["converted_from"]["from_snapshot_config"] == {"decoder_heads": 16, "mask_ratio": 0.75}
    assert meta["config"]["eval"]["correction"] == "tvn"          # base()'s EFAAR map settings


@pytest.mark.parametrize("channels", [6, 4])
def test_openphenom_every_block_on_6_and_4_channels(openphenom_run, tmp_path, monkeypatch, capsys, channels):
    """6 channels: a fake RxRx1 built at the model's 64 px, against the tables named with --annotations, with
    the perturbation probe; 4: a fake JUMP-CP built with --channels of 4 of its 6 (controls non-targeting and
    no-guide: the map's control is non-targeting, no-guide is left out of the map)."""
    tables = require(ANNOTATIONS)
    if channels == 6:
        dataset = build(RxRx1(fake_rxrx1(tmp_path / "raw")), tmp_path / "crops", 64)
        tasks = ["--tasks", "perturbation"]
    else:
        raw = fake_jump(tmp_path / "raw")
        source = JumpCP(JumpCP.find_load_data(raw), channels=["DNA", "ER", "RNA", "AGP"], wells=raw / "well.csv.gz",
                        perturbations=[raw / "crispr.csv.gz"])
        dataset = build(source, tmp_path / "crops", 64)
        tasks = ["--config.eval.probe=False"]
    code, out, err = run_eval(monkeypatch, capsys, f"--workdir={openphenom_run}", f"--dataset={dataset}",
                              f"--annotations={tables}", f"--out={tmp_path / 'eval'}", *tasks, "--config.eval.n_boot=0")
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    check_report(report, blocks=3, probes=("perturbation",) if channels == 6 else ())   # openphenom_small: 3 blocks
    settings = report["map_settings"]
    assert len(settings["channels"]) == channels and settings["annotations"] == str(tables)
    expected = ("EMPTY", []) if channels == 6 else ("non-targeting", ["no-guide"])
    assert (settings["control"], settings["drop"]) == expected
    print(f"openphenom {channels} channels, recall per block: {[b['recall_mean'] for b in report['blocks']]}")


# --------------------------------------------------------------------------------------------------------
# Settings and one-line errors before any embedding
# --------------------------------------------------------------------------------------------------------

def test_shared_map_defaults():
    """eval.job and eval.map_benchmark share base().eval's EFAAR defaults; the synthetic presets keep theirs."""
    e = config_lib.base().eval
    assert (e.pca_components, e.correction, e.thresholds, e.control, e.batch_col, e.annotations) == \
        (128, "tvn", [[0.05, 0.95], [0.1, 0.9]], "", "experiment", "")
    args = map_benchmark.parser().parse_args(["--embeddings", "f", "--perturbation_col", "g", "--control", "c",
                                              "--out", "o"])
    assert (args.pca_components, args.correction, args.thresholds, args.batch_col, args.pca_batch_col) == \
        (128, "tvn", ["0.05,0.95", "0.1,0.9"], "experiment", None)
    assert map_benchmark.pca_components_for(128, rows=30, features=16) == 16
    assert map_benchmark.pca_components_for(128, rows=12, features=384) == 11
    assert map_benchmark.pca_components_for(0, rows=12, features=384) == 0
    from configs import mae_synthetic
    for preset, pca in (("demo", 64), ("fast", 64), ("tiny", 8)):      # as measured in the README
        s = mae_synthetic.get_config(f"preset={preset}").eval
        assert (s.pca_components, s.correction, s.thresholds) == (pca, "centerscale", [[0.05, 0.95]]), preset
    assert mae_synthetic.get_config("preset=paper").eval.correction == "tvn"     # the papers' recipe: EFAAR's


def test_controls_come_from_the_manifest():
    rxrx3 = {"perturbations": ["EMPTY_control", "TP53"], "controls": ["EMPTY_control"],
             "sources": [{"control_labels": ["EMPTY_control"]}]}
    jump = {"perturbations": ["JCP2022_033924", "TP53", "no-guide", "non-targeting"],
            "controls": ["JCP2022_033924", "no-guide", "non-targeting"],
            "sources": [{"control_labels": ["non-targeting", "no-guide", "JCP2022_033924"]}]}
    synthetic = {"perturbations": ["G1", "non-targeting"], "controls": ["non-targeting"],
                 "control_label": "non-targeting"}
    assert job.dataset_controls(rxrx3, "", "d") == ("EMPTY_control", ())
    assert job.dataset_controls(jump, "", "d") == ("non-targeting", ("no-guide", "JCP2022_033924"))
    assert job.dataset_controls(jump, "no-guide", "d") == ("no-guide", ("JCP2022_033924", "non-targeting"))
    assert job.dataset_controls(synthetic, "", "d") == ("non-targeting", ())
    with pytest.raises(job.EvalSetupError, match=r"eval.control='non-targeting' is not a perturbation of d "
                                                 r"\(its manifest's controls: \['EMPTY_control'\]\)"):
        job.dataset_controls(rxrx3, "non-targeting", "d")
    with pytest.raises(job.EvalSetupError, match=r"d/manifest.json lists no controls"):
        job.dataset_controls({"perturbations": ["a"], "controls": []}, "", "d")


def test_annotation_lookup(tmp_path, monkeypatch):
    own = tmp_path / "dataset" / "annotations"
    own.mkdir(parents=True)
    assert annotations_lib.find_annotations("", str(tmp_path / "dataset")) == str(own)
    assert annotations_lib.find_annotations("/x/tables", str(tmp_path / "dataset")) == "/x/tables"
    monkeypatch.setattr(annotations_lib, "package_tables", lambda: None)
    with pytest.raises(annotations_lib.AnnotationsNotFound) as err:
        annotations_lib.find_annotations("", str(tmp_path / "other"))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "other" / "annotations") in message
    assert "efaar_benchmarking" in message and "--annotations DIR" in message


def test_errors_before_embedding(openphenom_run, rxrx3_run, tmp_path, monkeypatch, capsys):
    """One line, exit 2: a converted run without --dataset, a control the dataset does not have, a batch
    column wells do not have, too many channels for the model, a plain MAE on a 4-channel dataset, no tables."""
    workdir = rxrx3_run[0]
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={openphenom_run}")
    assert code == 2 and err.strip() == (f"EvalSetupError: {openphenom_run}: its config names no dataset "
                                         f"(a converted model); pass --dataset DIR")
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", "--config.eval.control=non-targeting")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("EvalSetupError: eval.control='non-targeting' is not a perturbation of")
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", "--config.eval.batch_col=cell_type")
    assert code == 2 and "eval.batch_col='cell_type': a map batch is one of ['experiment', 'plate']" in err
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", f"--annotations={tmp_path / 'none'}")
    assert code == 2 and err.startswith(f"AnnotationError: annotation folder {tmp_path / 'none'} does not exist")
    model = config_lib.base().model
    model.update(name="ca_mae", in_channels=6, max_channels=8)
    with pytest.raises(job.EvalSetupError, match=r"d has 9 channels \(c0, .*\); the channel-agnostic model of w "
                                                 r"takes 1 to 8 \(model.max_channels\)"):
        job.check_channels(model, None, [f"c{i}" for i in range(9)], "", "d", "w")
    model.update(name="mae")
    with pytest.raises(job.EvalSetupError, match=r"the mae model of w takes exactly 6 \(model.in_channels\)"):
        job.check_channels(model, None, ["DNA", "ER", "RNA", "AGP"], "", "d", "w")
    assert job.check_channels(model, None, list("abcdef"), "", "d", "w") == ([0, 1, 2, 3, 4, 5],) * 2


def test_convert_refuses_a_used_workdir_and_keeps_out(openphenom_run, tmp_path, capsys):
    ref = require(OPENPHENOM)
    weights = str(ref / "encoder_random_init.safetensors")
    assert convert.main(["openphenom", "--weights", weights, "--workdir", str(openphenom_run)]) == 2
    assert "already holds a run (config.json)" in capsys.readouterr().err
    # the deprecated --out still writes the bare checkpoint directory, and says what to use instead
    assert convert.main(["openphenom", "--weights", weights, "--out", str(tmp_path / "ckpt")]) == 0
    assert "--out is deprecated" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "0").is_dir()
    bad = tmp_path / "snapshot"
    bad.mkdir()
    shutil.copy(weights, bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert convert.main(["openphenom", "--weights", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    assert "model_type 'bert', not maes_microscopy's 'MAE'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


RECALL_KEYS = ("recall_0.05_0.95", "recall_0.1_0.9")


def test_embeddings_parquet_gives_map_benchmark_the_same_recall(rxrx3_run, tmp_path, monkeypatch, capsys):
    """Every block's well embeddings written by eval.embed_job, fed to eval.map_benchmark with the
    dataset's control and the shared defaults, give the recall eval.job reports for that block. Without
    batch correction on both sides: this 45-well screen has too few control wells for TVN's whitening to
    be well conditioned, and the two paths' features differ in the 7th digit (float32 sums in another
    order), which is enough to move a pair across a threshold there."""
    if annotations_lib.package_tables() is None:
        pytest.skip("efaar_benchmarking is not installed (requirements-nodeps.txt)")
    from eval import embed_job
    workdir, dataset = rxrx3_run
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", "--tasks", "perturbation",
                            "--out", str(tmp_path / "job"), "--config.eval.correction=none")
    assert code == 0, err
    blocks = json.loads((tmp_path / "job" / "report.json").read_text())["blocks"]
    assert embed_job.main([f"--workdir={workdir}", f"--dataset={dataset}", f"--out={tmp_path / 'emb'}"]) == 0
    for k, row in enumerate(blocks, start=1):
        out = tmp_path / f"map_{k}" / "report.json"
        assert map_benchmark.main([
            "--embeddings", str(tmp_path / "emb" / "wells" / f"block_{k:02d}.parquet"),
            "--perturbation_col", "perturbation", "--control", "EMPTY_control", "--out", str(out.parent),
            "--correction", "none", "--no_mean_average_precision"]) == 0
        ours = {(r["source"], t): r[t] for r in json.loads(out.read_text())["recall"] for t in RECALL_KEYS}
        theirs = {(r["source"], t): r[t] for r in row["recall"] for t in RECALL_KEYS}
        assert ours == pytest.approx(theirs), (k, ours, theirs)
