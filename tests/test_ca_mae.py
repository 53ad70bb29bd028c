"""Channel-agnostic MAE: any channel count and order, padded channels (ChAda-ViT), channel embeddings and
per-channel decoders routed by channel identity, hierarchical channel sampling (ChannelViT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maejax.models.ca_mae import hierarchical_channel_sampling, padded_random_masking
from tests.random_params import random_model

TINY = dict(name="ca_mae", variant="mu/8", in_channels=4, max_channels=6, decoder_width=32, decoder_depth=1,
            decoder_heads=2, cross_attention_heads=2, block="parallel", qk_norm=True, layerscale=0.5,
            final_norm="pooled")


def tiny(**overrides):
    return random_model(dict(TINY, **overrides))


@pytest.fixture(scope="module")
def model():
    return tiny(channel_embed=True, mask_ratio=0.5)


@pytest.fixture(scope="module")
def embed(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x, cm: nnx.merge(graphdef, s).embed(x, channel_mask=cm, full=True))
    return lambda x, cm=None: fn(state, x, cm)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (3, 6, 32, 32))


def test_padded_channels_change_nothing(embed, images):
    """A 4-channel image padded to 6 channels (channel_mask) embeds exactly like the 4-channel image."""
    mask = jnp.array([[1, 1, 1, 1, 0, 0]] * 3, bool)
    garbage = images.at[:, 4:].set(100.0)
    padded, alone = embed(garbage, mask), embed(images[:, :4])
    for k in ("blocks", "predict", "pooled", "cls"):
        np.testing.assert_allclose(padded[k], alone[k], rtol=2e-5, atol=2e-5, err_msg=k)
    assert alone["channelwise"].shape == (3, 4 * 64)
    np.testing.assert_allclose(padded["channelwise"][:, :4 * 64], alone["channelwise"], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(padded["channelwise"][:, 4 * 64:], 0)
    # full=True: every block's token matrix, whose patch-token mean is the pooled block feature.
    assert alone["tokens"].shape == (3, 2, 1 + 4 * 16, 64)
    np.testing.assert_allclose(alone["tokens"][:, :, 1:].mean(2), alone["blocks"], rtol=1e-5, atol=1e-6)


def test_channel_count_above_the_maximum_is_a_clear_error(model, images):
    with pytest.raises(ValueError, match="takes 1 to 6 channels"):
        model.embed(jnp.concatenate([images, images[:, :1]], axis=1))


def test_routing_by_channel_identity_is_equivariant_to_channel_order():
    """Channel embeddings and per-channel decoders follow `channel_ids`, not slot positions: feeding the
    channels in another order with matching ids permutes the reconstruction and nothing else."""
    model = tiny(channel_embed=True, mask_ratio=0.0)
    x = jax.random.normal(jax.random.key(2), (2, 4, 32, 32))
    ids = jnp.array([[2, 0, 3, 1]] * 2, jnp.int32)
    perm = jnp.array([3, 1, 0, 2])
    mask = jnp.ones((2, 4), bool)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x, ids: nnx.merge(graphdef, s)(x, jax.random.key(0), mask, ids)[0])
    pred = np.asarray(fn(state, x, ids)).reshape(2, 4, 16, 64)
    pred_perm = np.asarray(fn(state, x[:, perm], ids[:, perm])).reshape(2, 4, 16, 64)
    np.testing.assert_allclose(pred_perm, pred[:, perm], rtol=1e-4, atol=1e-5)
    # ... whereas with the ids left in place the decoders see other channels.
    pred_swapped = np.asarray(fn(state, x[:, perm], ids)).reshape(2, 4, 16, 64)
    assert np.abs(pred_swapped - pred[:, perm]).max() > 1e-2


def test_training_loss_ignores_whatever_padded_channels_hold(model, images):
    batch = {"image": images[:, :4], "channel_mask": jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]], bool),
             "channel_ids": jnp.array([[0, 1, 2, 3]] * 3, jnp.int32)}
    graphdef, state = nnx.split(model)
    loss_fn = jax.jit(lambda s, b: nnx.merge(graphdef, s).loss(b, jax.random.key(3)))
    loss, metrics = loss_fn(state, batch)
    assert set(metrics) == {"loss", "mse", "fourier", "channels"}
    assert np.isfinite(float(loss)) and float(metrics["mse"]) > 0.3
    assert float(metrics["channels"]) == pytest.approx(3.0)
    loss2, _ = loss_fn(state, dict(batch, image=batch["image"].at[0, 3].set(50.0).at[2, 0].set(-9.0)))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
    # A real channel does count.
    loss3, _ = loss_fn(state, dict(batch, image=batch["image"].at[1, 3].set(50.0)))
    assert abs(float(loss3) - float(loss)) > 1e-3


def test_hierarchical_sampling_draws_the_count_then_the_channels():
    available = jnp.array([[1, 1, 1, 1, 1, 1]] * 3000 + [[1, 0, 1, 0, 1, 1]] * 3000, bool)
    picked = np.asarray(jax.jit(hierarchical_channel_sampling)(jax.random.key(0), available))
    full, partial = picked[:3000], picked[3000:]
    assert not partial[:, [1, 3]].any()                       # never a channel the sample does not have
    assert (picked.sum(1) >= 1).all()
    counts = np.bincount(full.sum(1), minlength=7)[1:] / 3000   # k ~ U{1..6}
    np.testing.assert_allclose(counts, 1 / 6, atol=0.03)
    np.testing.assert_allclose(full.mean(0), 3.5 / 6, atol=0.04)  # every channel equally likely
    np.testing.assert_allclose(np.bincount(partial.sum(1), minlength=5)[1:] / 3000, 1 / 4, atol=0.03)


def test_padded_masking_keeps_the_ratio_of_real_tokens_per_sample():
    valid = jnp.repeat(jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool), 16, axis=1)   # (3, 64)
    keep, visible, mask, restore = jax.jit(padded_random_masking, static_argnums=2)(jax.random.key(0), valid, 0.75)
    assert keep.shape == visible.shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(visible.sum(1)), [16, 8, 4])
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [48, 24, 12])
    kept_valid = np.take_along_axis(np.asarray(valid), np.asarray(keep), 1)
    assert kept_valid[np.asarray(visible)].all()               # a visible token is never padding
    for b in range(3):                                          # visible tokens are exactly the unmasked real ones
        vis = set(np.asarray(keep[b])[np.asarray(visible[b])])
        assert vis == set(np.flatnonzero(np.asarray(valid[b]) & (np.asarray(mask[b]) == 0)))
