"""ViT encoder: every block's full output from the same forward pass, and the stochastic-depth schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maejax.models import flops
from maejax.models.layers import drop_path
from tests.random_params import random_model


def test_full_block_outputs_come_with_the_pooled_ones():
    model = random_model(dict(name="mae", variant="mu/8", in_channels=6, decoder_width=32, decoder_depth=1,
                              decoder_heads=2))
    x = jax.random.normal(jax.random.key(0), (2, 6, 32, 32))
    full = nnx.jit(lambda m, x: m.embed(x, full=True))(model, x)
    assert "tokens" not in nnx.eval_shape(lambda m, x: m.embed(x), model, x)   # the default path stores none
    assert full["tokens"].shape == (2, 2, 1 + 16, 64)          # (B, depth, cls + patches, D)
    np.testing.assert_allclose(full["tokens"][:, :, 1:].mean(2), full["blocks"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["tokens"][:, -1, 0], full["cls"], rtol=1e-6)


def test_stochastic_depth_schedule_and_drop():
    m = flops.abstract_model(dict(name="mae", variant="mu/8", in_channels=6, depth=5, drop_path=0.4))
    np.testing.assert_allclose(m.encoder.transformer.drop_path_rates(), [0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    u = flops.abstract_model(dict(name="mae", variant="mu/8", in_channels=6, drop_path=0.4,
                                  drop_path_schedule="uniform"))
    np.testing.assert_allclose(u.encoder.transformer.drop_path_rates(), [0.4, 0.4])
    # A traced rate (as scanned per layer): each sample's branch is dropped or rescaled by 1 / (1 - rate).
    x = jnp.ones((4000, 3, 2))
    y = np.asarray(jax.jit(drop_path)(x, jnp.float32(0.25), jax.random.key(0)))
    per_sample = y[:, 0, 0]
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert (y == per_sample[:, None, None]).all()
    assert (per_sample == 0).mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_array_equal(jax.jit(drop_path)(x, jnp.float32(0.0), jax.random.key(0)), x)
