"""Metric writers (maejax.metrics): every one is a clu MetricWriter, chosen by config.log.writers; metrics.jsonl
keeps its row format; the console is absl log lines; only process 0 writes; an unknown writer or a missing
wandb is one line naming log.writers, before any compute; the W&B writer's calls (a fake `wandb` module);
the picture of an autoencoder's reconstructions; maejax.log's process-0 filter."""
from __future__ import annotations

import glob
import logging
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from maejax import config as config_lib, log, metrics, sharding as shd, train as train_lib
from tests.tiny_training import jsonl_rows, write_tiny_dataset


def tb_tags(logdir) -> set[tuple[int, str]]:
    from tensorboardX.proto import event_pb2
    out = set()
    for path in glob.glob(f"{logdir}/events.*"):
        data = open(path, "rb").read()
        while data:
            n = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12:12 + n])
            data = data[12 + n + 4:]
            out |= {(event.step, v.tag + (":image" if v.HasField("image") else "")) for v in event.summary.value}
    return out


def test_the_default_writers_are_clu_metric_writers_writing_jsonl_tensorboard_and_console(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    spec = config_lib.base().log.writers
    assert spec == "jsonl,tensorboard,console"
    writer = metrics.create_writer(spec, str(tmp_path), resume_step=0, total_steps=10, enabled=True)
    assert isinstance(writer, metrics.metric_writers.MultiWriter)
    assert all(isinstance(w, metrics.metric_writers.MetricWriter) for w in writer._writers)
    writer.write_scalars(2, {"loss": np.float32(0.5), "lr": 1e-3, "extra": np.array(3.0)})
    writer.write_images(2, {"eval/picture": np.zeros((2, 8, 6, 1), np.uint8)})
    writer.close()
    # metrics.jsonl: one row per write_scalars, {"step", "time", then the scalars as floats}
    [row] = jsonl_rows(tmp_path / "metrics.jsonl")
    assert list(row) == ["step", "time", "loss", "lr", "extra"] and row["step"] == 2
    assert row["loss"] == 0.5 and row["lr"] == pytest.approx(1e-3) and row["extra"] == 3.0
    with open(tmp_path / "images" / "eval_picture.2.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert tb_tags(tmp_path / "tensorboard") >= {(2, "loss"), (2, "lr"), (2, "extra"), (2, "eval/picture:image")}
    # the console: one absl INFO line with the progress scalars and an ETA
    assert "step 2/10 | loss 0.5 | lr 1.000e-03 | ETA ?" in caplog.text


def test_writers_are_chosen_by_the_config_and_other_processes_write_nothing(tmp_path):
    writer = metrics.create_writer("jsonl", str(tmp_path / "a"), enabled=True)
    assert [type(w).__name__ for w in writer._writers] == ["JsonlWriter"]
    writer.close()
    assert metrics.create_writer("", str(tmp_path / "b"), enabled=True)._writers == ()
    quiet = metrics.create_writer("jsonl,tensorboard,console", str(tmp_path / "c"), enabled=False)
    quiet.write_scalars(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "c").exists()


def test_an_unknown_writer_is_named_with_the_closest(tmp_path):
    with pytest.raises(metrics.WriterError, match=r"log.writers='jsonl,tensorbord': no writer 'tensorbord' "
                                                  r"\(did you mean 'tensorboard'\?\); choose from jsonl, "
                                                  r"tensorboard, console, wandb"):
        metrics.writer_names("jsonl,tensorbord")
    assert metrics.writer_names(" jsonl , console,jsonl ") == ("jsonl", "console")


def test_wandb_asked_for_and_missing_stops_the_trainer_in_one_line_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)    # `import wandb` fails, as where it is not installed
    config = config_lib.base()
    config.log.writers = "jsonl,wandb"
    workdir = tmp_path / "run"
    assert train_lib.run(config, str(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["WriterError: log.writers='jsonl,wandb' asks for Weights & Biases, but wandb is not installed: "
                   "pip install wandb, or leave wandb out of log.writers"]
    assert not workdir.exists()


class FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))
        self.config = types.SimpleNamespace(update=lambda d, **kw: calls.append(("config", d, kw)))

    def log(self, values, step):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: FakeRun(calls, **kw)
    wandb.Image = type("Image", (), {"__init__": lambda self, x: setattr(self, "array", x)})
    wandb.Histogram = type("Histogram", (), {"__init__": lambda self, x: setattr(self, "array", x)})
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return calls


def test_the_wandb_writer_logs_scalars_and_images_and_resumes_its_run(tmp_path, fake_wandb):
    logdir = tmp_path / "run"
    writer = metrics.create_writer("wandb", str(logdir), run_config={"seed": 0}, enabled=True)
    writer.write_scalars(3, {"loss": np.float32(0.5)})
    writer.write_images(3, {"eval/reconstruction": np.zeros((2, 4, 4, 1), np.uint8)})
    writer.write_hparams({"optim.lr": 1e-3})
    writer.close()
    (_, init), scalars, images, hparams, finish = fake_wandb
    run_id = (logdir / "wandb_run_id").read_text().strip()
    assert init == {"dir": str(logdir), "id": run_id, "name": "run", "resume": "allow", "config": {"seed": 0}}
    assert scalars == ("log", {"loss": 0.5}, 3)
    assert images[0] == "log" and images[2] == 3
    [pictures] = images[1].values()
    assert [p.array.shape for p in pictures] == [(4, 4, 1), (4, 4, 1)]
    assert hparams[:2] == ("config", {"optim.lr": 1e-3}) and finish == ("finish",)
    # a resumed run (same logdir) continues the same W&B run
    metrics.create_writer("wandb", str(logdir), enabled=True).close()
    assert fake_wandb[5][1]["id"] == run_id


def test_the_reconstruction_picture_shows_masked_input_reconstruction_and_target_per_channel(tmp_path):
    from eval.reconstruction import MASK_GREY, reconstruction_picture
    from maejax.input_pipeline import open_dataset
    from maejax.models import build
    dataset = open_dataset(write_tiny_dataset(tmp_path / "data", num_records=8, size=40, channels=3))
    cfg = dict(name="mae", variant="mu/8", in_channels=3, decoder_width=32, decoder_depth=1, decoder_heads=2)
    with shd.activate(shd.make_mesh({"data": 1}, jax.devices()[:1]), shd.DEFAULT_RULES):
        model = build(cfg, nnx.Rngs(0))
    image = reconstruction_picture(model, dataset, "crop", 32, seed=0)
    gap = 2
    assert image.dtype == np.uint8 and image.shape == (4, 3 * 32 + 2 * gap, 3 * 32 + 2 * gap, 1)
    for crop in image[..., 0]:
        for ch in range(3):
            row = crop[ch * (32 + gap):ch * (32 + gap) + 32]
            masked, recon, target = (row[:, k * (32 + gap):k * (32 + gap) + 32] for k in range(3))
            grey = masked == MASK_GREY
            assert 0.6 < grey.mean() < 0.9                   # 75% of the patches masked (in 8 px patches)
            np.testing.assert_array_equal(masked[~grey], target[~grey])   # the visible pixels are the target's
            np.testing.assert_array_equal(recon[~grey], target[~grey])    # the prediction fills the masked ones
    # a model that does not reconstruct has no picture
    with shd.activate(shd.make_mesh({"data": 1}, jax.devices()[:1]), shd.DEFAULT_RULES):
        supervised = build(dict(cfg, name="supervised", num_classes=4), nnx.Rngs(0))
    assert reconstruction_picture(supervised, dataset, "crop", 32) is None


def test_log_filter_keeps_info_on_process_0_and_this_projects_own():
    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "message", (), None)
    own, orbax = f"{log._ROOT}/maejax/train.py", "/venv/site-packages/orbax/checkpoint/manager.py"
    first, other = log._Filter(0, everything=False), log._Filter(1, everything=False)
    assert first.filter(record(logging.INFO, own)) and not first.filter(record(logging.INFO, orbax))
    assert log._Filter(0, everything=True).filter(record(logging.INFO, orbax))      # --verbosity given
    assert not other.filter(record(logging.INFO, own)) and other.filter(record(logging.WARNING, own))
