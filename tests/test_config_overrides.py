"""One override syntax: every command that takes a config takes `--config.KEY=VALUE` through
maejax.config.parse_override_flags, which refuses an unknown key with a did-you-mean before anything runs;
the old spellings (--set, --compare K=V, the throughput shorthands, eval.job's --eval) still work, say they
are deprecated, and mean the same overrides."""
from __future__ import annotations

import pathlib
import runpy
import sys

import pytest

from maejax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{REPO}/configs/mae_synthetic.py:preset=tiny"


def test_override_flags_are_taken_out_of_the_command_line_and_parsed_by_the_keys_type():
    rest, overrides = config_lib.parse_override_flags(
        ["--config", TINY, "--config.optim.lr=0.5", "--workdir", "w", "--config.data.flip", "false",
         "--config.model.attention=cudnn"])
    assert rest == ["--config", TINY, "--workdir", "w"]
    assert overrides == {"optim.lr": "0.5", "data.flip": "false", "model.attention": "cudnn"}
    config = config_lib.load(TINY, overrides)
    assert config.optim.lr == 0.5 and config.data.flip is False and config.model.attention == "cudnn"


@pytest.mark.parametrize("flag, message", [
    ("--config.optim.lrr=1", "unknown config key 'optim.lrr' in --config.optim.lrr=1; did you mean optim.lr?"),
    ("--config.optm.lr=1", "unknown config key 'optm.lr' in --config.optm.lr=1; did you mean optim.lr?"),
    ("--config.total_steps=many", "--config.total_steps=many: Could not override field 'total_steps'"),
    ("--config.model=1", "--config.model=1: model is a section"),
])
def test_a_bad_override_stops_with_one_line_naming_the_flag(flag, message):
    with pytest.raises(SystemExit) as e:
        config_lib.parse_override_flags(["--config", TINY, flag])
    assert str(e.value.code).startswith(message)


def run_module(monkeypatch, module: str, *argv: str) -> str:
    """Runs `python -m module argv` in this process; returns the message it exits with."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return str(e.value.code)


@pytest.mark.parametrize("module, argv", [
    ("maejax.train", ["--config", TINY, "--workdir", "w"]),
    ("maejax.aot", ["--config", TINY, "--fake_devices", "8"]),
    ("maejax.aot", ["--table"]),
    ("benchmarks.train_throughput", ["--config", TINY]),
    ("benchmarks.train_throughput", ["--config", TINY, "--compare"]),   # a compared run's override too
])
def test_every_command_that_takes_a_config_refuses_an_unknown_key_with_a_did_you_mean(monkeypatch, module, argv):
    monkeypatch.chdir(REPO)
    message = run_module(monkeypatch, module, *argv, "--config.optim.lrr=1")
    assert message == "unknown config key 'optim.lrr' in --config.optim.lrr=1; did you mean optim.lr?"


def test_eval_job_takes_eval_overrides_only_and_refuses_an_unknown_one_with_a_did_you_mean(monkeypatch, tmp_path):
    from eval import job
    with pytest.raises(SystemExit) as e:
        job.main(["--workdir", str(tmp_path), "--config.eval.probe_modle=logistic"])
    assert e.value.code == ("unknown config key 'eval.probe_modle' in --config.eval.probe_modle=logistic; "
                            "did you mean eval.probe_model?")
    with pytest.raises(SystemExit) as e:
        job.main(["--workdir", str(tmp_path), "--config.model.mask_ratio=0.5"])
    assert "takes only --config.eval.KEY=VALUE overrides" in str(e.value.code)


def eval_job_overrides(monkeypatch, tmp_path, *argv: str) -> dict:
    """The eval overrides eval.job's command line hands to `evaluate`."""
    from eval import job
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    seen = {}
    report = {"outputs": {"report": str(tmp_path / "eval" / "report.json")}}
    monkeypatch.setattr(job, "evaluate", lambda *a, overrides, **k: seen.update(overrides) or report)
    monkeypatch.setattr(job, "summary", lambda report: "")
    job.main(["--workdir", str(tmp_path), *argv])
    return seen


def test_eval_jobs_deprecated_eval_flag_means_the_same_overrides(monkeypatch, tmp_path, capsys):
    new = eval_job_overrides(monkeypatch, tmp_path, "--config.eval.probe_model=logistic", "--config.eval.control=",
                             "--config.eval.n_boot=0")
    assert new == {"probe_model": "logistic", "control": "", "n_boot": "0"}
    assert "deprecated" not in capsys.readouterr().err
    old = eval_job_overrides(monkeypatch, tmp_path, "--eval", "probe_model=logistic", "control=", "n_boot=0")
    assert old == new
    assert "--eval KEY=VALUE is deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown config key 'eval.probe_modle'"):
        eval_job_overrides(monkeypatch, tmp_path, "--eval", "probe_modle=logistic")


def test_train_throughputs_compare_runs_and_its_deprecated_flags(capsys):
    from benchmarks import train_throughput as tt
    rest, common, compares = tt.split_runs(
        ["--config", TINY, "--config.model.remat=full", "--steps", "3", "--compare", "--config.model.remat=dots",
         "--compare", "--config.model.remat=none", "--config.data.batch_size=32", "--compare"])
    assert rest == ["--config", TINY, "--steps", "3"] and common == {"model.remat": "full"}
    assert compares == [{"model.remat": "dots"}, {"model.remat": "none", "data.batch_size": "32"}, {}]
    assert "deprecated" not in capsys.readouterr().err
    _, _, old = tt.split_runs(["--config", TINY, "--compare", "model.remat=dots",
                               "--compare=model.remat=none,data.batch_size=32", "--compare"])
    assert old == compares and "--compare K=V[,K=V] is deprecated" in capsys.readouterr().err
    args = tt.parse_args(["--config", TINY, "--batch", "64", "--remat", "full", "--attention", "xla",
                          "--scan", "false", "--set", "optim.lr=0.5,seed=3"])
    assert tt.deprecated_overrides(args) == {"data.batch_size": "64", "model.remat": "full", "model.attention": "None",
                                             "model.scan_layers": "false", "optim.lr": "0.5", "seed": "3"}
    assert "--batch is deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="did you mean optim.lr"):
        tt.deprecated_overrides(tt.parse_args(["--config", TINY, "--set", "optim.lrr=1"]))
