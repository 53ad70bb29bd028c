"""MU-Net (masked U-Net autoencoder) and the weakly supervised classifier (CNN or ViT backbone)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maejax.models import build
from tests.random_params import random_model

MUNET = dict(name="munet", variant="mu/8", in_channels=6, mask_ratio=0.5)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (4, 6, 32, 32))


def test_munet_never_sees_the_masked_patches(images):
    model = random_model(MUNET)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jax.random.key(1)))
    recon, mask = forward(state, images)
    assert recon.shape == images.shape and mask.shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [8] * 4)
    pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(4, 4, 4), 8, 1), 8, 2)[:, None] > 0
    hidden_changed = jnp.where(pixel_mask, images * -3.0 + 7.0, images)
    np.testing.assert_allclose(forward(state, hidden_changed)[0], recon, rtol=1e-5, atol=1e-5)
    visible_changed = jnp.where(pixel_mask, images, images + 1.0)
    assert np.abs(np.asarray(forward(state, visible_changed)[0] - recon)).max() > 1e-3


def test_munet_loss_and_stage_embeddings(images):
    model = random_model(MUNET)
    graphdef, state = nnx.split(model)
    loss, metrics = jax.jit(lambda s, b: nnx.merge(graphdef, s).loss(b, jax.random.key(1)))(state, {"image": images})
    assert set(metrics) == {"loss", "mse", "fourier"} and np.isfinite(float(loss)) and float(metrics["mse"]) > 0
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x, full=True))(state, images)
    assert out["blocks"].shape == (4, 2, 64)          # one row per stage (widths 32, 64), zero-padded
    np.testing.assert_array_equal(out["blocks"][:, 0, 32:], 0)
    np.testing.assert_allclose(out["blocks"][:, 1], out["predict"])
    assert [f.shape for f in out["feature_maps"]] == [(4, 32, 32, 32), (4, 64, 16, 16)]
    np.testing.assert_allclose(out["feature_maps"][0].mean((2, 3)), out["blocks"][:, 0, :32], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes 6 channels and sizes divisible by 8"):
        model.embed(images[:, :, :30, :30])


def test_supervised_cnn_learns_labels_and_ignores_unlabelled_crops(images):
    model = random_model(dict(name="supervised", backbone="cnn", variant="mu", in_channels=6, num_classes=5))
    graphdef, state = nnx.split(model)
    tx = optax.adam(3e-2)

    @jax.jit
    def step(state, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(
            lambda s: nnx.merge(graphdef, s).loss(batch, jax.random.key(0)), has_aux=True)(state)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(state, updates), opt_state, loss, metrics

    same = jnp.stack([images[0]] * 4)
    # An unlabelled crop (-1) changes neither the loss nor the accuracy.
    _, _, loss_one, _ = step(state, tx.init(state), {"image": same, "label": jnp.array([2, -1, -1, -1])})
    _, _, loss_all, _ = step(state, tx.init(state), {"image": same, "label": jnp.array([2, 2, 2, 2])})
    assert float(loss_one) == pytest.approx(float(loss_all), rel=1e-5)
    batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
    opt_state = tx.init(state)
    losses = []
    for _ in range(4):
        state, opt_state, loss, metrics = step(state, opt_state, batch)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    out, normed = nnx.jit(lambda m, x: (lambda o: (o, m.feature_norm(o["predict"])))(m.embed(x)))(
        nnx.merge(graphdef, state), images)
    assert out["blocks"].shape == (4, 2, 64) and out["pooled"].shape == (4, 64)
    # `pooled` is the classifier's input: the normalised last-stage feature.
    np.testing.assert_allclose(out["pooled"], normed, rtol=1e-5, atol=1e-6)
    assert float(metrics["accuracy"]) >= 0.5


def test_supervised_vit_embeds_like_its_backbone(images):
    model = random_model(dict(name="supervised", variant="mu/8", in_channels=6, num_classes=5))
    out = nnx.jit(lambda m, x: m.embed(x))(model, images)
    assert out["blocks"].shape == (4, 2, 64) and out["pooled"].shape == (4, 64) and out["cls"].shape == (4, 64)
    with pytest.raises(ValueError, match="model.num_classes=0: set it to the number of perturbation labels"):
        build(dict(name="supervised", variant="mu/8", in_channels=6), nnx.Rngs(0))
