"""The train step's parts: gradient accumulation, weight-decay mask, float32 master weights, MFU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maejax import mfu, models, optim, sharding as shd, state as state_lib
from maejax.config import base
from maejax.step import loss_and_grads

TINY = dict(name="mae", variant="mu/8", in_channels=6, decoder_width=32, decoder_depth=1, decoder_heads=2)


class Regression(nnx.Module):
    """A per-example loss (mean over the batch of a squared error): accumulating microbatch gradients
    must give the full-batch gradient exactly."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (6 * 4 * 4, 3)), out_sharding=("embed", None))

    def loss(self, batch, key):
        pred = batch["image"].reshape(batch["image"].shape[0], -1) @ self.w[...]
        target = jax.nn.one_hot(batch["label"], 3)
        loss = jnp.mean((pred - target) ** 2)
        return loss, {"loss": loss, "label_mean": jnp.mean(batch["label"].astype(jnp.float32))}


def test_accumulated_gradients_equal_the_full_batch_gradient_on_a_sharded_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 6, 4, 4)).astype(np.float32),
             "label": rng.integers(0, 3, 16).astype(np.int32)}
    with shd.activate(mesh, shd.DEFAULT_RULES):
        model = Regression(nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, shd.DEFAULT_RULES, v.ndim)) for k, v in batch.items()}

        @jax.jit
        def run(state, batch):
            m = nnx.merge(graphdef, state)
            return loss_and_grads(m, batch, jax.random.key(0), 1), loss_and_grads(m, batch, jax.random.key(0), 4)

        (metrics1, grads1), (metrics4, grads4) = run(state, batch)
    np.testing.assert_allclose(float(metrics4["loss"]), float(metrics1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics4["label_mean"]), float(metrics1["label_mean"]), rtol=1e-6)
    # float32 sums in another order: equal to rounding
    np.testing.assert_allclose(np.asarray(grads4["w"][...]), np.asarray(grads1["w"][...]), rtol=1e-5, atol=1e-6)
    assert grads4["w"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_weight_decay_reaches_weight_matrices_only():
    # With zero gradients, AdamW's only update to a parameter is its weight decay.
    cfg = dict(TINY, layerscale=0.1, qk_norm=True)
    o = base().optim
    o.lr, o.warmup_steps, o.clip_norm, o.weight_decay = 0.5, 0, 0.0, 0.1
    with nnx.use_eager_sharding(False):
        shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))), nnx.Param))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    tx = optim.make(o, 10)
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(updates)}
    changed = {name for name, u in flat.items() if np.any(np.asarray(u) != 0)}
    matrices = {name for name in flat if name.rsplit("/", 1)[-1] in ("kernel", "qkv", "out")}
    assert changed == matrices
    assert "encoder/transformer/blocks/ls1/gamma" in flat and "encoder/cls" in flat  # present, not decayed
    assert len(matrices) == 11   # encoder: patch + 4 per block; decoder: embed, pred + 4 per block


def test_master_weights_and_optimizer_state_stay_float32_under_bfloat16_compute():
    c = base()
    c.model.update(TINY)
    c.model.dtype = "bfloat16"
    mesh = shd.make_mesh({"data": 8})
    layout = state_lib.abstract(c.model, mesh, shd.DEFAULT_RULES, tx=optim.make(c.optim, 1000))
    dtypes = {x.dtype for x in jax.tree.leaves(layout.model_abstract)}
    opt_dtypes = {x.dtype for x in jax.tree.leaves(layout.opt_abstract) if x.ndim}
    assert dtypes == {jnp.dtype("float32")} and opt_dtypes == {jnp.dtype("float32")}
    assert layout.abstract_model().encoder.cfg.block.dtype == jnp.bfloat16


def test_peak_table_and_mfu():
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_flops("NVIDIA H200") == 989e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_flops("TPU v5 lite") == 197e12 and mfu.peak_flops("TPU v5") == 459e12
    assert mfu.peak_flops("TPU v4") == 275e12 and mfu.peak_flops("TPU v6 lite") == 918e12
    assert mfu.peak_flops("cpu") is None
    out = mfu.throughput(flops_per_example=1e12, examples=64, seconds=2.0, num_devices=8, peak=4e12)
    assert out == pytest.approx({"examples_per_s": 32.0, "tflops_per_device": 4.0, "mfu": 1.0})
    assert "mfu" not in mfu.throughput(1e12, 64, 2.0, 8, None)
