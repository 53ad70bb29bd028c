"""One train-step set-up (maejax.step.setup) for the trainer, the ahead-of-time compiler and the throughput
benchmark; the batch's mesh axes come from the rules table (its act_batch entry, as the activations'), for
training and for the eval embedder, which embeds under the run's rules."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maejax import sharding as shd, step as step_lib
from tests.tiny_training import tiny_config


def rules_with_batch_on(axes) -> list[list]:
    """The default rules table with the batch (act_batch) put on `axes`."""
    return [[name, axes if name == shd.BATCH else rule] for name, rule in shd.DEFAULT_RULES]


def test_the_batch_is_split_over_the_mesh_axes_its_rule_names():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    assert shd.batch_sharding(mesh, shd.DEFAULT_RULES, 4).spec == P(("data", "fsdp"), None, None, None)
    assert shd.data_parallel_size(mesh, shd.DEFAULT_RULES) == 8
    on_fsdp = shd.rules_from_config(rules_with_batch_on("fsdp"))
    assert shd.batch_sharding(mesh, on_fsdp, 2).spec == P("fsdp", None)
    assert shd.data_parallel_size(mesh, on_fsdp) == 4
    nowhere = shd.rules_from_config(rules_with_batch_on(None))
    assert shd.batch_sharding(mesh, nowhere).spec == P(None) and shd.data_parallel_size(mesh, nowhere) == 1


def test_the_batch_check_divides_by_the_axes_of_the_rule():
    mesh = {"mesh.data": 2, "mesh.fsdp": 4}
    devices = shd.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match=r"data.batch_size=4 is not divisible by the data-parallel size 8 = "
                                         r"data x fsdp \(the sharding rule of act_batch\)"):
        step_lib.check_batch(tiny_config("unused", **mesh, **{"data.batch_size": 4}), devices)
    on_fsdp = {**mesh, "sharding_rules": rules_with_batch_on("fsdp")}
    step_lib.check_batch(tiny_config("unused", **on_fsdp, **{"data.batch_size": 4}), devices)
    with pytest.raises(ValueError, match=r"data.batch_size=6 is not divisible by the data-parallel size 4 = fsdp"):
        step_lib.check_batch(tiny_config("unused", **on_fsdp, **{"data.batch_size": 6}), devices)


def test_the_compiled_step_takes_the_batch_as_the_rules_split_it():
    config = tiny_config("unused", **{"mesh.data": 2, "mesh.fsdp": 4, "data.batch_size": 4,
                                      "sharding_rules": rules_with_batch_on("fsdp")})
    train_setup = step_lib.setup(config)
    expected = NamedSharding(train_setup.mesh, P("fsdp"))
    for key, ndim in step_lib.BATCH_KEYS.items():
        assert train_setup.batch_shardings[key].is_equivalent_to(expected, ndim)
        assert train_setup.abstract_batch()[key].sharding.is_equivalent_to(expected, ndim)
    compiled = train_setup.compile()
    assert compiled.input_shardings[0][2]["image"].is_equivalent_to(expected, 4)   # (the MAE reads no label)
    m = step_lib.describe_memory(compiled)
    assert m["alias"] > 0.9 * m["output"]   # the model and optimiser states are donated


class SetUp(Exception):
    """Raised by the spy once a command has set its step up (nothing is compiled)."""


def _trainer(config, tmp_path):
    from maejax.train import train
    train(config, str(tmp_path / "run"))


def _aot(config, tmp_path):
    from maejax import aot
    aot.compile_step(config, jax.devices())


def _benchmark(config, tmp_path):
    from benchmarks import train_throughput
    train_throughput.measure(config, 1)


@pytest.mark.parametrize("command", [_trainer, _aot, _benchmark], ids=["train", "aot", "train_throughput"])
def test_trainer_aot_and_benchmark_set_their_step_up_alike(command, tmp_path, monkeypatch):
    """All three go through maejax.step.setup, so they check alike: the benchmark once skipped the
    unknown-key check."""
    config = tiny_config(tmp_path / "no-dataset", **{"mesh.data": 2, "mesh.fsdp": 4})
    seen, setup = [], step_lib.setup

    def spy(config, devices=None):
        seen.append(setup(config, devices))
        raise SetUp
    monkeypatch.setattr(step_lib, "setup", spy)
    with pytest.raises(SetUp):
        command(config, tmp_path)
    assert seen[0].config is config and dict(seen[0].mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert not (tmp_path / "run").exists()
    with config.unlocked():
        config.optim.lrr = 1e-3
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'; did you mean optim.lr"):
        command(config, tmp_path)


def test_the_embedder_splits_the_batch_where_the_runs_rules_put_it():
    """A run whose rules put the batch on fsdp embeds data-parallel over every device (batch_mesh puts them
    on fsdp) and gives the features of the default rules."""
    from eval.embed import Embedder
    from tests.random_params import random_model
    model = random_model(dict(name="mae", variant="mu/8", in_channels=6, decoder_width=32, decoder_depth=1,
                              decoder_heads=2))
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 32, 32), np.uint8)
    on_fsdp = shd.rules_from_config(rules_with_batch_on("fsdp"))
    mesh = shd.batch_mesh(on_fsdp)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(shd.batch_mesh(shd.DEFAULT_RULES).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    embedder = Embedder(model, mesh, 5, on_fsdp, keys=("blocks",))
    assert embedder.batch_size == 8      # rounded up to the 8-way split
    # The same rules on a mesh with every device on data: the batch is not split (fsdp has size 1).
    assert Embedder(model, shd.batch_mesh(shd.DEFAULT_RULES), 5, on_fsdp, keys=("blocks",)).batch_size == 5
    reference = Embedder(model, shd.batch_mesh(shd.DEFAULT_RULES), 5, shd.DEFAULT_RULES, keys=("blocks",))
    np.testing.assert_allclose(embedder(images)["blocks"], reference(images)["blocks"], rtol=1e-5, atol=1e-5)
