"""model.attention: the Pallas TPU splash kernel (run here in Pallas's TPU interpret mode) equals the XLA path,
forward and gradients, at the ViT-L/8 MAE and CA-MAE sequence lengths and head counts (256 x 256 crops,
patch 8: 1,024 patches; tiny head dims); inside the models, under a mesh (shard_map on 8 fake devices); and
a kernel the platform cannot run is a one-line error at model build.

Sequence lengths at L/8 (16 heads; decoder 512 wide, 16 heads; CA-MAE cross-attention 8 heads):
MAE encoder in training 1,024 x 25% + cls = 257, at inference 1,025; MAE decoder 1,024 + cls = 1,025;
CA-MAE (6 channels) encoder 6 x 1,024 x 25% + cls = 1,537 with hidden slots key-masked, per-channel decoders
1,024, cross-attention 6,144 x 6,144 with absent channels key-masked.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maejax import sharding as shd
from maejax.models import attention
from tests.random_params import random_model

# (name, batch, q tokens, kv tokens, heads, key mask); head dim 8 throughout.
L8_SHAPES = [
    ("mae_encoder_train", 2, 257, 257, 16, False),
    ("mae_encoder_infer", 1, 1025, 1025, 16, False),
    ("mae_decoder", 1, 1025, 1025, 16, False),
    ("ca_mae_encoder", 1, 1537, 1537, 16, True),
    ("ca_mae_channel_decoder", 1, 1024, 1024, 16, False),
    ("ca_mae_cross_attention", 1, 6144, 6144, 4, True),   # 4 of the 8 heads: XLA's 6,144^2 scores are slow here
]
HEAD_DIM = 8
TOL = 2e-5   # of the largest reference value, forward and each gradient


FAST_COMPILE = {"xla_backend_optimization_level": 0}   # halves the CPU compile here


def run_jit(fn, *args, static=()):
    """jit(fn)(*args) compiled with FAST_COMPILE; returns (result, jaxpr text)."""
    traced = jax.jit(fn, static_argnums=static).trace(*args)
    compiled = traced.lower().compile(compiler_options=FAST_COMPILE)
    dynamic = [a for i, a in enumerate(args) if i not in static]
    return jax.block_until_ready(compiled(*dynamic)), str(traced.jaxpr)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()), float(np.abs(a - b).max() / np.abs(b).max())


def key_mask(key, b, s, channels=None):
    """A key mask like the models': cls always valid; then random hidden slots (CA-MAE encoder) or whole
    absent channel groups (cross-attention context)."""
    if channels:
        present = jax.random.bernoulli(key, 0.6, (b, channels)).at[:, 0].set(True)
        valid = jnp.repeat(present, s // channels, axis=1)
    else:
        valid = jax.random.bernoulli(key, 0.7, (b, s)).at[:, 0].set(True)
    return valid[:, None, None, :]


@pytest.mark.parametrize("name,b,t,s,h,masked", L8_SHAPES, ids=[s[0] for s in L8_SHAPES])
def test_splash_matches_xla_at_l8_shapes(name, b, t, s, h, masked):
    keys = jax.random.split(jax.random.key(len(name)), 5)
    q = jax.random.normal(keys[0], (b, t, h, HEAD_DIM))
    k = jax.random.normal(keys[1], (b, s, h, HEAD_DIM))
    v = jax.random.normal(keys[2], (b, s, h, HEAD_DIM))
    cot = jax.random.normal(keys[3], (b, t, h, HEAD_DIM))
    mask = key_mask(keys[4], b, s, channels=6 if name == "ca_mae_cross_attention" else None) if masked else None

    def fwd_bwd(impl, q, k, v, cot, mask):   # arguments, not constants: XLA would constant-fold the lot
        out, vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl), q, k, v)
        return (out,) + vjp(cot)

    start = time.time()
    with attention.tpu_interpret():
        got, _ = run_jit(fwd_bwd, "splash", q, k, v, cot, mask, static=(0,))
    seconds = time.time() - start
    want, _ = run_jit(fwd_bwd, "xla", q, k, v, cot, mask, static=(0,))
    errs = {n: rel_err(g, w) for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    print(f"\n{name} B={b} T={t} S={s} H={h} D={HEAD_DIM} masked={masked}: splash (interpret) {seconds:.1f} s; "
          + ", ".join(f"{n} max abs {a:.2e} rel {r:.2e}" for n, (a, r) in errs.items()))
    for n, (_, r) in errs.items():
        assert r < TOL, (n, r)


# Tiny models with 16 heads of 8 (the L/8 head count), the OpenPhenom / Recursion encoder block (parallel,
# qk-norm, LayerScale); 64 x 64 crops and no Fourier term keep them fast to compile (encoder 17 tokens, decoder 65:
# both padded to 128).
MAE = dict(name="mae", variant="mu/8", width=128, depth=1, mlp_dim=128, num_heads=16, in_channels=2,
           decoder_width=128, decoder_depth=1, decoder_heads=16, block="parallel", qk_norm=True, layerscale=0.5,
           qkv_bias=False, final_norm="pooled", fourier_weight=0.0)
CA_MAE = dict(MAE, name="ca_mae", in_channels=3, max_channels=4, cross_attention_heads=8, mask_ratio=0.5)


def grads_close(got, want):
    """Every gradient leaf within TOL of the largest gradient value (a leaf that is zero in exact arithmetic,
    e.g. the k-norm bias under softmax's shift invariance, has no meaningful relative error)."""
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(want))
    worst = max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in
                zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert worst < TOL * scale, (worst, scale)
    return worst, worst / scale


def loss_and_grads(cfg, batch, key, attention_name, mesh=None):
    """(loss, grads) of `cfg` with attention `attention_name`; same random parameters whatever the kernel."""
    def run():
        model = random_model(dict(cfg, attention=attention_name))
        graphdef, state = nnx.split(model)
        return run_jit(jax.value_and_grad(lambda s, b, k: nnx.merge(graphdef, s).loss(b, k)[0]), state, batch, key)

    with attention.tpu_interpret():
        if mesh is None:
            return run()
        with shd.activate(mesh, shd.DEFAULT_RULES):
            return run()


def test_mae_with_splash_matches_xla():
    """Loss and every parameter gradient through the encoder's and the decoder's self-attention (the CA-MAE's
    sites, with an absent channel and hidden encoder slots, are compared the same way on 8 devices in
    test_splash_under_a_mesh_runs_per_shard)."""
    kind, cfg = "mae", MAE
    batch = {"image": jax.random.normal(jax.random.key(1), (2, cfg["in_channels"], 64, 64))}
    (loss, grads), jaxpr = loss_and_grads(cfg, batch, jax.random.key(2), "splash")
    (loss_xla, grads_xla), _ = loss_and_grads(cfg, batch, jax.random.key(2), "xla")
    assert "pallas_call" in jaxpr
    np.testing.assert_allclose(loss, loss_xla, rtol=1e-6)
    worst, rel = grads_close(grads, grads_xla)
    print(f"\n{kind}: loss {float(loss):.6f} vs {float(loss_xla):.6f}; grads max abs {worst:.2e} ({rel:.2e} of the "
          f"largest)")


def test_splash_under_a_mesh_runs_per_shard():
    """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs in shard_map (batch over data x fsdp, heads over
    tensor) at every CA-MAE site (the per-channel decoders' under vmap too), and the sharded loss and
    gradients equal the single-device XLA ones."""
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = {"image": jax.random.normal(jax.random.key(1), (4, 3, 64, 64)),
             "channel_mask": jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]], bool)}
    (loss, grads), jaxpr = loss_and_grads(CA_MAE, batch, jax.random.key(2), "splash", mesh)
    (loss_xla, grads_xla), _ = loss_and_grads(CA_MAE, batch, jax.random.key(2), "xla")
    # encoder, cross-attention, channel decoders: forward and backward (remat-free) each in shard_map
    assert jaxpr.count("shard_map") >= 3 and "pallas_call" in jaxpr
    np.testing.assert_allclose(loss, loss_xla, rtol=1e-6)
    worst, rel = grads_close(grads, grads_xla)
    print(f"\nca_mae on 8 devices: loss {float(loss):.6f} vs {float(loss_xla):.6f}; grads max abs {worst:.2e} "
          f"({rel:.2e} of the largest)")


def test_a_kernel_the_platform_cannot_run_is_an_error_at_build():
    with pytest.raises(ValueError, match=r"^model.attention='splash' \(the Pallas TPU splash attention kernel\) runs "
                                         r"on TPU only, but this program is built for CPU: use model.attention=xla"):
        random_model(dict(MAE, attention="splash"))
    with pytest.raises(ValueError, match=r"model.attention='cudnn' .* runs on GPU only, but this program is built "
                                         r"for CPU"):
        random_model(dict(MAE, attention="cudnn"))
    # the platform is the mesh's devices, not the host's: what an AOT compile for a TPU topology sees
    for name, where, match in [("cudnn", "tpu", "GPU only, but this program is built for TPU: use model.attention="
                                                "splash or xla"),
                               ("splash", "gpu", "TPU only, but this program is built for GPU: use model.attention="
                                                 "cudnn or xla")]:
        with pytest.raises(ValueError, match=match):
            attention.check(name, where=where)
    with pytest.raises(ValueError, match=r"model.attention='cudnn' needs model.dtype=bfloat16 or float16"):
        attention.check("cudnn", dtype=jnp.float32, head_dim=64, where="gpu")
    with pytest.raises(ValueError, match=r"head dim that is a multiple of 8 .* got 12"):
        attention.check("cudnn", dtype=jnp.bfloat16, head_dim=12, where="gpu")
    with pytest.raises(ValueError, match=r"model.attention='flash' is not an attention implementation: choose xla"):
        random_model(dict(MAE, attention="flash"))


def test_values():
    assert [attention.resolve(v) for v in (None, "None", "xla", "cudnn", "splash")] == [
        "xla", "xla", "xla", "cudnn", "splash"]
    assert attention.check("splash", where="tpu") == "splash" and attention.check(None, where="tpu") == "xla"
    assert attention.check("cudnn", dtype=jnp.bfloat16, head_dim=64, where="gpu") == "cudnn"
    # state.load_model restores a model trained with a kernel this platform lacks onto XLA (the same maths)
    assert not attention.runs_on("splash", "cpu") and attention.runs_on("splash", "tpu")
    assert not attention.runs_on("cudnn", "tpu") and attention.runs_on(None, "gpu")
    with attention.tpu_interpret():
        assert attention.runs_on("splash", "cpu")
    with pytest.raises(ValueError, match=r"takes key masks of shape \(B, 1, 1, 5\) only"):
        q = jnp.zeros((1, 5, 2, 8))
        with attention.tpu_interpret():
            attention.dot_product_attention(q, q, q, jnp.ones((1, 1, 5, 5), bool), "splash")


def test_a_checkpoint_trained_with_splash_restores_onto_xla_here(tmp_path):
    """state.load_model on devices without the run's kernel (a TPU run's splash on this CPU): XLA attention,
    the same maths, instead of an error at build."""
    import json

    from maejax.config import complete
    from maejax.convert import save_converted
    from maejax.state import load_model

    config = complete({"model": dict(MAE, attention="splash")})
    with attention.tpu_interpret():
        model = random_model(dict(config.model))
    save_converted(str(tmp_path / "ckpt"), model, {"config": json.loads(config.to_json())})
    restored, restored_config, _ = load_model(str(tmp_path / "ckpt"))
    assert restored_config.model.attention == "xla"
    assert restored.encoder.transformer.blocks.attn.cfg.attention == "xla"
    np.testing.assert_array_equal(restored.encoder.patch_embed.proj.kernel[...],
                                  model.encoder.patch_embed.proj.kernel[...])
