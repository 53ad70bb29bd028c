"""The MAE model: masking, loss terms, per-block features, scan == loop, sharded == single device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maejax import sharding as shd
from maejax.models import build, losses
from maejax.models.mae import random_masking
from maejax.models.vit import decode_variant, patchify, unpatchify

TINY = dict(name="mae", variant="mu/8", in_channels=6, decoder_width=32, decoder_depth=1, decoder_heads=2)


def run(model_cfg, mesh_axes, devices, images, fn):
    mesh = shd.make_mesh(mesh_axes, devices)
    with shd.activate(mesh, shd.DEFAULT_RULES):
        model = build(model_cfg, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x))(state, images), state


def test_random_masking_keeps_a_quarter_and_restores_order():
    keep, mask, restore = random_masking(jax.random.key(0), 4, 64, 0.75)
    assert keep.shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [48] * 4)
    for b in range(4):  # kept tokens are exactly the unmasked ones
        assert set(np.asarray(keep[b])) == set(np.flatnonzero(np.asarray(mask[b]) == 0))
    x = jnp.arange(64)[None].repeat(4, 0)
    shuffled = jnp.take_along_axis(x, jnp.argsort(restore, 1), 1)
    np.testing.assert_array_equal(np.asarray(jnp.take_along_axis(shuffled, restore, 1)), np.asarray(x))


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.key(0), (2, 6, 32, 48))
    p = patchify(x, 8)
    assert p.shape == (2, 4 * 6, 8 * 8 * 6)
    np.testing.assert_array_equal(np.asarray(unpatchify(p, 8, 6, (4, 6))), np.asarray(x))


def test_masked_mse_ignores_visible_tokens():
    pred = jnp.zeros((1, 4, 3))
    target = jnp.array([[[1.0] * 3, [2.0] * 3, [100.0] * 3, [0.0] * 3]])
    mask = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    assert float(losses.masked_mse(pred, target, mask)) == pytest.approx((1 + 4) / 2)


def test_fourier_term_is_zero_for_identical_images_and_positive_otherwise():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16, 16))
    assert float(losses.fourier_l1(x, x)) == 0.0
    assert float(losses.fourier_l1(x, x * 2)) > 0.1


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ViT variant 'Q/8'"):
        decode_variant("Q/8")


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (8, 6, 32, 32))


def test_loss_and_features_agree_between_scan_loop_and_8_device_mesh(images):
    def fn(model, x):
        loss, metrics = model.loss({"image": x}, jax.random.key(2))
        return loss, metrics, model.embed(x)

    one = jax.devices()[:1]
    (loss_scan, m_scan, f_scan), _ = run(TINY, {"data": 1}, one, images, fn)
    (loss_loop, _, f_loop), _ = run(dict(TINY, scan_layers=False, remat="full"), {"data": 1}, one, images, fn)
    (loss_shard, _, f_shard), state = run(TINY, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8], images, fn)

    assert set(m_scan) == {"loss", "mse", "fourier"}
    assert float(m_scan["mse"]) > 0.5 and 0 < float(m_scan["fourier"]) < 10
    np.testing.assert_allclose(float(loss_loop), float(loss_scan), rtol=1e-5)
    np.testing.assert_allclose(float(loss_shard), float(loss_scan), rtol=1e-5)
    assert f_scan["blocks"].shape == (8, 2, 64)
    np.testing.assert_allclose(np.asarray(f_scan["blocks"][:, -1]), np.asarray(f_scan["predict"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f_loop["blocks"]), np.asarray(f_scan["blocks"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f_shard["blocks"]), np.asarray(f_scan["blocks"]), rtol=1e-4, atol=1e-5)
    # Parameters are really sharded on the 8-device mesh: fsdp over width, tensor over heads/MLP.
    fc1 = state["encoder"]["transformer"]["blocks"]["mlp"]["fc1"]["kernel"][...]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (2, 32, 128)


def test_wrong_channel_count_is_a_clear_error(images):
    with pytest.raises(ValueError, match="takes 6 channels"):
        run(TINY, {"data": 1}, jax.devices()[:1], images[:, :4], lambda m, x: m.embed(x))
