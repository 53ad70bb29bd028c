"""Bad input to the trainer and the eval job never passes silently (issue 11): one line naming the key,
parameter or checkpoint and what to do, a non-zero exit, nothing written that looks like a result.

1. A resume whose config changes the model, optimiser, schedule or data is refused, listing every
   differing key; `accept_config_change` resumes and keeps both configs; resume-safe keys just pass.
2. A checkpoint of another architecture or optimiser (on resume, or in eval.job) is one line naming the
   checkpoint, the step and the first differing array with both shapes.
3. A NaN stop names the last good checkpoint, or says none was written yet.
4. A resume drops the metrics rows (and TensorBoard steps) a killed run wrote after its last checkpoint.

The runs here are the real trainer (config checks, data streams, checkpoints, metrics, resume) around a
stand-in for the compiled step (`StandInStep`: the state unchanged, a NaN from a chosen step on) and for the
compiled initialisation (zeros), so nothing is compiled: seconds, not minutes. One run, NaN at step 3 after
the checkpoint of step 2, serves every test as a run to resume (copied per test). The real step's NaN and a
real SIGKILL are tests/test_trainer_processes.py's.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import struct
import sys

import jax
import numpy as np
import pytest

from maejax import resume, state as state_lib, step as step_lib, train as train_lib
from maejax.checkpoint import CheckpointMismatchError, Checkpoints, NoCheckpointError
from maejax.metrics import truncate_jsonl
from maejax.train import ConfigChangeError, NonFiniteError, train
from tests.tiny_training import jsonl_rows, steps_saved, tiny_config, write_tiny_dataset

RUN = {"total_steps": 6, "ckpt_every": 2, "optim.lr": 1e30, "data.streams": 1}


class StandInStep:
    """Stands in for the compiled train step: the state unchanged, a loss of 1/step, NaN from `nan_at` on."""

    def __init__(self, nan_at: int | None):
        self.nan_at = nan_at

    def __call__(self, model_state, opt_state, batch, step):
        done = int(step) + 1
        finite = self.nan_at is None or done < self.nan_at
        loss = np.float32(1 / done if finite else np.nan)
        return model_state, opt_state, {"loss": loss, "grad_norm": loss, "lr": np.float32(0), "finite": finite}

    def memory_analysis(self):
        return None


def stand_in_programs(mp: pytest.MonkeyPatch, nan_at: int | None = None) -> None:
    def zeros(model_cfg, mesh, rules, layout, **_):
        put = lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)  # noqa: E731
        return jax.tree.map(put, layout.model_abstract), jax.tree.map(put, layout.opt_abstract)
    mp.setattr(state_lib, "initialize", zeros)
    mp.setattr(step_lib.TrainSetup, "compile", lambda self: StandInStep(nan_at))


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """(root, workdir, dataset, error) of a run stopped by a NaN at step 3, with the checkpoint of step 2."""
    root = tmp_path_factory.mktemp("bad-input")
    dataset = write_tiny_dataset(root / "dataset", num_records=32)
    workdir = root / "run"
    with pytest.MonkeyPatch.context() as mp, pytest.raises(NonFiniteError) as err:
        stand_in_programs(mp, nan_at=3)
        train(tiny_config(dataset, **RUN), str(workdir))
    return root, workdir, dataset, err.value


def exits_with_one_line(main, capsys, code=2):
    """Runs a CLI's main(); it must exit with `code` after one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def copy_run(nan_run, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(nan_run[1], workdir)
    return workdir


def config(nan_run, **overrides):
    return tiny_config(nan_run[2], **{**RUN, **overrides})


def snapshot(workdir):
    """Every file under the workdir with its content (event files and checkpoints by size): what a refused
    run must leave exactly as it was."""
    out = {}
    for path in sorted(glob.glob(f"{workdir}/**", recursive=True)):
        if os.path.isfile(path):
            rel = os.path.relpath(path, workdir)
            out[rel] = open(path, "rb").read() if path.endswith((".json", ".jsonl", ".txt")) else os.path.getsize(path)
    return out


# --------------------------------------------------------------------------------------------------------
# 1. A resume with a changed config
# --------------------------------------------------------------------------------------------------------
CHANGES = {   # override -> the text the message must hold
    "data.dir": None,   # another dataset (filled in by the test)
    "model.depth": "model.depth 0 -> 1",
    "model.variant": "model.variant 'mu/8' -> 'mu/16'",
    "optim.lr": "optim.lr 1e+30 -> 0.001",
    "optim.name": "optim.name 'adamw' -> 'lion'",
    "data.batch_size": "data.batch_size 8 -> 16",
    "total_steps": "total_steps 6 -> 8",
    "seed": "seed 0 -> 1",
    "data.workers": "data.workers 0 -> 2",
}
VALUES = {"model.depth": 1, "model.variant": "mu/16", "optim.lr": 1e-3, "optim.name": "lion",
          "data.batch_size": 16, "total_steps": 8, "seed": 1, "data.workers": 2}


def test_a_resume_that_changes_the_model_optimiser_schedule_or_data_is_refused_naming_each_key(nan_run, tmp_path):
    workdir = copy_run(nan_run, tmp_path)
    other = shutil.copytree(nan_run[2], tmp_path / "other-dataset")
    before = snapshot(workdir)
    for key in CHANGES:
        value = str(other) if key == "data.dir" else VALUES[key]
        want = f"data.dir '{nan_run[2]}' -> '{other}'" if key == "data.dir" else CHANGES[key]
        with pytest.raises(ConfigChangeError) as err:
            train(config(nan_run, **{key: value}), str(workdir))
        msg = str(err.value)
        assert "\n" not in msg and want in msg, msg
        assert f"checkpoint step 2 in {workdir / 'checkpoints'}" in msg and "--accept_config_change" in msg
    # Several at once: every one in the one line, the resume-safe ones apart.
    with pytest.raises(ConfigChangeError) as err:
        train(config(nan_run, **{"optim.lr": 1e-3, "total_steps": 8, "model.depth": 1, "log_every": 3}),
              str(workdir))
    msg = str(err.value)
    assert "model.depth 0 -> 1, optim.lr 1e+30 -> 0.001, total_steps 6 -> 8 (allowed changes: log_every 1 -> 3)" \
        in msg, msg
    assert snapshot(workdir) == before   # no config, checkpoint, metrics row or event file written


def test_the_cli_prints_the_refusal_as_one_line_and_exits_2(nan_run, tmp_path, capsys):
    workdir = copy_run(nan_run, tmp_path)
    before = snapshot(workdir)
    assert train_lib.run(config(nan_run, **{"optim.name": "lion"}), str(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ConfigChangeError: ") and "optim.name 'adamw' -> 'lion'" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert snapshot(workdir) == before


def test_accepting_a_change_resumes_and_keeps_both_configs(nan_run, tmp_path, monkeypatch, caplog):
    stand_in_programs(monkeypatch)
    workdir = copy_run(nan_run, tmp_path)
    new = config(nan_run, **{"optim.lr": 1e-3, "total_steps": 8})
    caplog.set_level(logging.INFO, logger="absl")   # the trainer's messages are absl INFO lines
    train(new, str(workdir), stop_after=4, accept_config_change=True)
    out = caplog.text
    assert ("Config changed at step 2 (accepted with --accept_config_change): optim.lr 1e+30 -> 0.001, "
            "total_steps 6 -> 8; config.json holds the new config, config.2.json the previous one") in out
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 1e-3
    old = json.loads((workdir / "config.2.json").read_text())
    assert old["optim"]["lr"] == 1e30 and old["total_steps"] == 6
    ckpts = Checkpoints(str(workdir / "checkpoints"))
    try:
        meta = ckpts.meta(4)
    finally:
        ckpts.close()
    assert meta["config"]["optim"]["lr"] == 1e-3
    assert meta["config_history"] == [{"step": 2, "changes": {"optim.lr": [1e30, 1e-3], "total_steps": [6, 8]},
                                       "accepted_with_flag": ["optim.lr", "total_steps"]}]
    assert [r["step"] for r in jsonl_rows(workdir / "metrics.jsonl")] == [1, 2, 3, 4]
    # The next resume compares with the checkpoint of step 4, written with the accepted config.
    assert train(new, str(workdir), stop_after=4) == {}


def test_accepting_new_data_settings_starts_the_input_streams_afresh(nan_run, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    stand_in_programs(monkeypatch)
    workdir = copy_run(nan_run, tmp_path)
    other = shutil.copytree(nan_run[2], tmp_path / "other-dataset")
    # The saved positions are of one stream of another dataset: restoring them would fail (2 streams) or
    # mean nothing (another dataset).
    train(config(nan_run, **{"data.dir": str(other), "data.streams": 2}), str(workdir), stop_after=4,
          accept_config_change=True)
    assert "at step 2 (input streams start afresh: the data settings changed)" in caplog.text
    assert [r["step"] for r in jsonl_rows(workdir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_safe_changes_pass_and_are_recorded(nan_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    workdir = copy_run(nan_run, tmp_path)
    safe = {"log_every": 2, "ckpt_every": 4, "keep_ckpts": 5, "mesh.data": 4, "mesh.fsdp": 2, "eval.n_boot": 10}
    assert train(config(nan_run, **safe), str(workdir), stop_after=2) == {}
    assert "(all resume-safe): ckpt_every 2 -> 4, eval.n_boot 200 -> 10" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["mesh"]["fsdp"] == 2
    assert json.loads((workdir / "config.2.json").read_text())["mesh"]["fsdp"] == 1


def test_moving_the_checkpoint_dir_away_from_the_runs_checkpoints_is_refused(nan_run, tmp_path):
    workdir = copy_run(nan_run, tmp_path)
    before = snapshot(workdir)
    with pytest.raises(ConfigChangeError, match=r"run/config.json \(whose checkpoints are in .*/run/checkpoints; "
                       r"none in .*/elsewhere: it would start from step 0\): ckpt_dir '' -> '.*/elsewhere'; "):
        train(config(nan_run, **{"ckpt_dir": str(tmp_path / "elsewhere")}), str(workdir))
    assert snapshot(workdir) == before


def test_config_changes_ignore_keys_older_runs_lack_at_their_default():
    new = json.loads(tiny_config("/data").to_json())
    saved = json.loads(json.dumps(new))
    del saved["model"]["pool"], saved["eval"]["n_boot"]        # keys added since, at non-default values
    del saved["model"]["qk_norm"]                              # a key added since, at its default
    saved["data"]["dir"] = "/data/../data"
    assert resume.config_changes(saved, new) == [("eval.n_boot", "<absent>", 200),
                                                    ("model.pool", "<absent>", "mean_std")]
    assert resume.resume_safe("eval.n_boot") and resume.resume_safe("mesh.fsdp")
    assert not resume.resume_safe("model.pool") and not resume.resume_safe("total_steps")


# --------------------------------------------------------------------------------------------------------
# 2. A checkpoint of another architecture or optimiser
# --------------------------------------------------------------------------------------------------------
ARCHITECTURES = {   # accepted config change -> the first differing array, saved vs expected
    "depth": ({"model.depth": 1},
              "parameter encoder/transformer/blocks/attn/out is (2, 2, 32, 64) in the checkpoint but (1, 2, 32, 64) "
              "here (first of 12 differing arrays: 12 reshaped, 0 only in the checkpoint, 0 only here; 36 saved, "
              "36 expected)"),
    "patch": ({"model.variant": "mu/16"}, "parameter decoder_pred/bias is (384,) in the checkpoint but (1536,) here"),
    "width": ({"model.decoder_width": 48}, "parameter decoder/blocks/attn/out is (1, 2, 16, 32) in the "
                                           "checkpoint but (1, 2, 24, 48) here"),
    "kind": ({"model.name": "munet", "model.mask_ratio": 0.5},
             "parameter decoder/blocks/attn/out is (1, 2, 16, 32) in the checkpoint but absent here"),
    "optimiser": ({"optim.name": "lion"}, "optimiser state opt_state/1/0/nu/decoder/blocks/attn/out is "
                                          "(1, 2, 16, 32) in the checkpoint but absent here"),
}


@pytest.mark.parametrize("case", sorted(ARCHITECTURES))
def test_a_checkpoint_of_another_architecture_is_one_line_naming_the_array(nan_run, tmp_path, case, capsys):
    workdir = copy_run(nan_run, tmp_path)
    before = snapshot(workdir)
    overrides, want = ARCHITECTURES[case]
    with pytest.raises(CheckpointMismatchError) as err:
        train(config(nan_run, **overrides), str(workdir), accept_config_change=True)
    msg = str(err.value)
    assert "\n" not in msg and want in msg, msg
    assert f"checkpoint {workdir / 'checkpoints'} step 2 does not fit" in msg and "differing arrays" in msg
    assert snapshot(workdir) == before   # config.json not replaced, no config.2.json, no rows
    if case == "depth":   # and the CLI: the one line, status 2
        assert train_lib.run(config(nan_run, **overrides), str(workdir), accept_config_change=True) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"CheckpointMismatchError: {msg}"


def tamper_meta(workdir, step, **model):
    """Rewrites the model section of a checkpoint's stored config, as if another model had written it."""
    path = workdir / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["config"]["model"].update(model)
    path.write_text(json.dumps(meta))


def test_eval_job_on_a_checkpoint_of_another_model_kind_is_one_line(nan_run, tmp_path, monkeypatch, capsys):
    from eval import job
    workdir = copy_run(nan_run, tmp_path)
    tamper_meta(workdir, 2, name="munet", mask_ratio=0.5)
    dataset = tmp_path / "dataset"   # with a good relationship table, which eval.job checks first
    shutil.copytree(nan_run[2], dataset)
    (dataset / "annotations").mkdir()
    (dataset / "annotations" / "Complexes.txt").write_text("entity1,entity2\ng1,g2\n")
    monkeypatch.setattr(sys, "argv", ["eval.job", f"--workdir={workdir}", f"--dataset={dataset}"])
    err = [exits_with_one_line(job.main, capsys)]
    assert err[0].startswith("CheckpointMismatchError: "), err
    assert (f"checkpoint {workdir / 'checkpoints'} step 2 does not fit the munet mu/8 model its stored config "
            f"describes: parameter ") in err[0]
    assert ("top-level groups: checkpoint ['decoder', 'decoder_embed', 'decoder_norm', 'decoder_pred', 'encoder', "
            "'mask_token'], here ['decoder', 'encoder']") in err[0]
    assert not (workdir / "eval").exists()


def test_load_model_names_the_first_differing_parameter_of_the_same_kind(nan_run, tmp_path):
    from maejax.state import load_model
    workdir = copy_run(nan_run, tmp_path)
    tamper_meta(workdir, 2, depth=1)
    with pytest.raises(CheckpointMismatchError, match=r"step 2 does not fit the mae mu/8 model .*: parameter "
                       r"encoder/transformer/blocks/attn/out is \(2, 2, 32, 64\) in the checkpoint but "
                       r"\(1, 2, 32, 64\) here"):
        load_model(str(workdir / "checkpoints"))


def test_a_run_without_a_checkpoint_is_one_error_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    """A run stopped before its first save, or a workdir without checkpoints: eval.job, the embedding job and
    load_model all raise NoCheckpointError with the one message, naming the directory."""
    from eval import embed_job, job
    from maejax.state import load_model
    workdir = tmp_path / "run"
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    message = (f"no checkpoint in {ckpt_dir} (train first: python -m maejax.train ..., or convert one: "
               f"python -m maejax.convert ...)")
    for load in (load_model, embed_job.checkpoint_config):
        with pytest.raises(NoCheckpointError) as error:
            load(str(ckpt_dir))
        assert str(error.value) == message
    monkeypatch.setattr(sys, "argv", ["eval.job", f"--workdir={workdir}"])
    assert exits_with_one_line(job.main, capsys) == f"NoCheckpointError: {message}"
    ckpt_dir.rmdir()
    with pytest.raises(SystemExit, match=re.escape(f"NoCheckpointError: {message}")):
        job.main()
    with pytest.raises(NoCheckpointError, match=re.escape(f"no checkpoint in {ckpt_dir} or {workdir} (train")):
        embed_job.checkpoint_dir(str(workdir))
    assert not (workdir / "eval").exists()


# --------------------------------------------------------------------------------------------------------
# 3. The NaN stop says what there is to resume from
# --------------------------------------------------------------------------------------------------------
def test_a_nan_stop_names_the_last_good_checkpoint(nan_run):
    _, workdir, _, error = nan_run
    msg = str(error)
    assert "\n" not in msg
    assert msg.startswith("non-finite loss or gradient at step 3 (loss=nan")
    assert f"the last good checkpoint is step 2 in {workdir / 'checkpoints'}: resume from it with a lower " \
           f"optim.lr (now 1e+30)" in msg
    assert steps_saved(workdir) == [2]
    assert [r["step"] for r in jsonl_rows(workdir / "metrics.jsonl")] == [1, 2]


def test_a_nan_stop_before_any_checkpoint_says_there_is_none(nan_run, tmp_path, monkeypatch, capsys):
    stand_in_programs(monkeypatch, nan_at=3)
    workdir = tmp_path / "run"
    assert train_lib.run(config(nan_run, ckpt_every=100), str(workdir)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "NonFiniteError: non-finite loss or gradient at step 3 (loss=nan, grad_norm=nan); stopped without saving; "
        "no checkpoint was written yet (the first was due at step 6), so there is nothing to resume: start again "
        "with a lower optim.lr (now 1e+30) or longer optim.warmup_steps (now 2)"]
    assert steps_saved(workdir) == []


# --------------------------------------------------------------------------------------------------------
# 4. Each step once in metrics.jsonl and TensorBoard after any number of resumes
# --------------------------------------------------------------------------------------------------------
def tb_events(path):
    """(step, tag or 'START') of every event of a TensorBoard event file."""
    from tensorboardX.proto import event_pb2
    out, data = [], open(path, "rb").read()
    while data:
        (n,) = struct.unpack("Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + n])
        data = data[12 + n + 4:]
        if event.HasField("session_log"):
            out.append((event.step, "START"))
        out.extend((event.step, v.tag) for v in event.summary.value)
    return out


def test_a_killed_run_resumed_logs_each_step_once(nan_run, tmp_path, monkeypatch):
    stand_in_programs(monkeypatch)
    workdir = copy_run(nan_run, tmp_path)
    # What a run killed after step 4 (its last checkpoint being step 2) leaves: rows and events of 3 and 4,
    # the last row cut off half-way.
    from tensorboardX import SummaryWriter
    killed = SummaryWriter(str(workdir / "tensorboard"), filename_suffix=".killed")
    for step in (3, 4):
        killed.add_scalar("loss", 1.0, step)
    killed.close()
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    train(config(nan_run), str(workdir), stop_after=4)    # resumed from step 2: steps 3 and 4 run again
    rows = jsonl_rows(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == pytest.approx(1 / 4)
    # TensorBoard: the resumed run's event file starts by purging the steps after its checkpoint.
    newest = max(glob.glob(f"{workdir}/tensorboard/events.*"), key=os.path.getmtime)
    assert [e for e in tb_events(newest) if e[1] in ("START", "loss")] == [(3, "START"), (3, "loss"), (4, "loss")]
    # A second resume from the checkpoint of step 4 drops nothing: each step is there once.
    train(config(nan_run), str(workdir), stop_after=4)
    assert [r["step"] for r in jsonl_rows(workdir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_truncate_jsonl_keeps_one_row_per_step_up_to_the_step(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [(1, "a"), (2, "a"), (3, "a"), (2, "b"), (3, "b")]   # run b resumed from step 1 before this fix
    path.write_text("".join(json.dumps({"step": s, "run": r}) + "\n" for s, r in rows) + '{"step": 4')
    assert truncate_jsonl(str(path), 2) == 4
    assert [(r["step"], r["run"]) for r in jsonl_rows(str(path))] == [(1, "a"), (2, "b")]   # the last row wins
    assert truncate_jsonl(str(path), 2) == 0
    assert truncate_jsonl(str(tmp_path / "missing.jsonl"), 2) == 0


@pytest.mark.parametrize("tables, message", [
    # no <dataset>/annotations: the EFAAR tables of the installed efaar_benchmarking, which lack g1..g3
    (None, r"benchmark_annotations/CORUM\.txt: none of its genes is in the map|no relationship tables: looked in "
           r"\S+/annotations"),
    ({"Wrong.txt": "gene_a,gene_b\nA,B\n"}, r"Wrong\.txt: expected the header 'entity1,entity2', found 'gene_a,gene_b'"),
    ({"Other.txt": "entity1,entity2\nNOT_IN_SCREEN1,NOT_IN_SCREEN2\n"}, r"Other\.txt: none of its genes is in the map"),
])
def test_eval_job_checks_the_relationship_tables_before_embedding(nan_run, tmp_path, monkeypatch, capsys,
                                                                  tables, message):
    """eval.job reads the tables against the dataset's perturbations first: a bad folder or table is one
    line and exit 2 before any crop is embedded, and no eval output is written."""
    from eval import job
    workdir = copy_run(nan_run, tmp_path)
    dataset = tmp_path / "dataset"
    shutil.copytree(nan_run[2], dataset)
    if tables is not None:
        (dataset / "annotations").mkdir(exist_ok=True)
        for name, text in tables.items():
            (dataset / "annotations" / name).write_text(text)
    embedded = []
    monkeypatch.setattr(job, "features_for", lambda *a, **k: embedded.append(a))
    monkeypatch.setattr(sys, "argv", ["eval.job", f"--workdir={workdir}", f"--dataset={dataset}"])
    err = [exits_with_one_line(job.main, capsys)]
    assert err[0].startswith("AnnotationError: "), err
    assert re.search(message, err[0]), err[0]
    assert not embedded and not (workdir / "eval").exists()


def test_training_on_a_damaged_shard_is_one_line_naming_it(tmp_path, capsys):
    """A shard cut short after the build: the trainer's CLI path stops at open with one line naming the
    shard, exit 2, and writes no run."""
    from maejax.train import run
    dataset = write_tiny_dataset(tmp_path / "dataset", num_records=32)
    shard = sorted(dataset.glob("*.array_record*"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    workdir = tmp_path / "run"
    assert run(tiny_config(dataset, **RUN), str(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("RecordError: ") and shard.name in err[0], err
    assert not workdir.exists()
