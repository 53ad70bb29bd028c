"""Every model kind of maejax.models trains through the same `train(config, workdir)` path: two steps on a
data 4 x fsdp 2 mesh from the tiny dataset (the MAE itself is trained by tests/test_trainer_processes.py, the
CA-MAE on a mixture of channel lists by tests/test_channel_mixture.py)."""
import numpy as np
import pytest

from maejax.train import train
from tests.tiny_training import losses, tiny_config, write_tiny_dataset

# The tiny dataset has 4 perturbations: labels 0..3.
MODELS = {
    "munet": {"model.name": "munet", "model.variant": "mu/8", "model.mask_ratio": 0.5},
    # A ViT backbone; the CNN backbone goes through the same loss (tests/test_cnn_models.py).
    "supervised": {"model.name": "supervised", "model.num_classes": 4},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-dataset")
    write_tiny_dataset(out, num_records=32)
    return out


def config(dataset, **overrides):
    return tiny_config(dataset, **{"total_steps": 2, "optim.warmup_steps": 1, "ckpt_every": 100,
                                   "mesh.data": 4, "mesh.fsdp": 2, "data.streams": 1, **overrides})


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_kind_trains_two_steps(dataset, tmp_path, kind):
    last = train(config(dataset, **MODELS[kind]), str(tmp_path / kind))
    got = losses(tmp_path / kind)
    assert sorted(got) == [1, 2] and np.isfinite(list(got.values())).all()
    assert last["grad_norm"] > 0   # the loss reaches the parameters
    if kind == "supervised":
        assert 0 <= last["accuracy"] <= 1


def test_supervised_model_with_fewer_classes_than_labels_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"model.num_classes=3 .* 4 perturbations"):
        train(config(dataset, **{**MODELS["supervised"], "model.num_classes": 3}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
