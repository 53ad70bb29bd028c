"""Analytic FLOPs per crop (`flops_per_crop`) of every model kind agree with XLA's cost analysis.

Configs are small but wide (width 256, few tokens) so matmuls dominate, and layers are unrolled (XLA counts
a scan body once). XLA also counts elementwise work (norms, GELU, softmax, residual adds, GroupNorm): about
+3..5% here, which the model-FLOP convention leaves out; for training, JAX never computes the gradient
with respect to the input images, which the "3 x forward" rule counts: about -2..3%. Hence 6%.
Models are abstract (ShapeDtypeStructs): lowering needs no parameters and no compilation.
"""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from maejax.models import flops

WIDE = dict(variant="mu/8", width=256, num_heads=4, mlp_dim=1024, scan_layers=False, fourier_weight=0.0)
CONFIGS = {
    "mae": dict(WIDE, name="mae", in_channels=6, decoder_width=128, decoder_depth=1, decoder_heads=2),
    "ca_mae": dict(WIDE, name="ca_mae", in_channels=3, decoder_width=128, decoder_depth=1, decoder_heads=2,
                   cross_attention_heads=2),
    "munet": dict(name="munet", variant="mu/8", in_channels=6, fourier_weight=0.0),
    "supervised_vit": dict(WIDE, name="supervised", in_channels=6, num_classes=10),
    "supervised_cnn": dict(name="supervised", backbone="cnn", variant="mu", in_channels=6, num_classes=10),
}
RTOL = 0.06


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_analytic_flops_match_xla(kind):
    cfg = CONFIGS[kind]
    model = flops.abstract_model(cfg)
    graphdef, state = nnx.split(model)
    batch = {"image": jax.ShapeDtypeStruct((2, cfg["in_channels"], 32, 32), jnp.float32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32)}

    def loss(state, batch):
        return nnx.merge(graphdef, state).loss(batch, jax.random.key(0))[0]

    train = flops.xla_flops(jax.grad(loss), state, batch) / 2
    infer = flops.xla_flops(lambda s, x: nnx.merge(graphdef, s).embed(x), state, batch["image"]) / 2
    analytic = model.flops_per_crop(32, 32)
    assert train == pytest.approx(analytic["train"], rel=RTOL)
    assert infer == pytest.approx(analytic["infer"], rel=RTOL)
