"""OpenPhenom import: both file formats convert to a maejax checkpoint whose embeddings match the reference
PyTorch outputs (../shared/reference/openphenom_small) for 6-channel, 4-channel, permuted and edge-case inputs;
the converted CAMAEDecoder matches a PyTorch re-implementation of maes_microscopy's decoder."""
import pickle
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import embed_arrays
from maejax import convert, torch_pickle
from maejax.state import load_model
from tests.reference_data import OPENPHENOM, require

OUTPUTS = ("predict", "channelwise", "forward_head", "cls", "blockwise_meanpool")
TOLERANCE = 1e-4     # max |ours - reference| / max |reference|, the README's measure


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ref():
    return require(OPENPHENOM)


@pytest.fixture(scope="module")
def golden(ref):
    return np.load(ref / "golden_io.npz")


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    """The encoder-only safetensors file, converted through the command line into a run directory."""
    out = tmp_path_factory.mktemp("openphenom") / "ckpt"
    convert.main(["openphenom", "--weights", str(ref / "encoder_random_init.safetensors"), "--workdir", str(out)])
    return out


def embed_golden_inputs(checkpoint, golden, tmp_path):
    """Embeds every golden input through the command line (6-channel inputs in one batch, one compile)."""
    x = golden["input_uint8"]
    six = np.concatenate([x, x[:, golden["perm"]], golden["edge_input_uint8"]])
    out = {}
    for name, images in (("six", six), ("c4", np.ascontiguousarray(x[:, :4]))):
        np.save(tmp_path / f"{name}.npy", images)
        embed_arrays.main(["--workdir", str(checkpoint), "--images", str(tmp_path / f"{name}.npy"),
                           "--out", str(tmp_path / name), "--format", "npz"])
        out[name] = dict(np.load(tmp_path / name / embed_arrays.NPZ))
    split = {"c6": slice(0, 3), "c6perm": slice(3, 6), "edge": slice(6, 8)}
    result = {t: {k: v[s] for k, v in out["six"].items()} for t, s in split.items()}
    result["c4"] = out["c4"]
    return result


def test_safetensors_conversion_matches_the_reference_outputs(converted, golden, tmp_path):
    model, config, step = load_model(str(converted / "checkpoints"))
    m = config.model
    assert (step, m.name, m.width, m.depth, m.num_heads, m.mlp_dim, m.max_channels, m.decoder_depth) == \
        (0, "ca_mae", 96, 3, 3, 384, 8, 0)
    assert m.variant == "S/16" and config.data.crop_size == 64
    ours = embed_golden_inputs(converted, golden, tmp_path)
    errors = {}
    for variant, out in ours.items():
        assert set(out) == set(OUTPUTS)
        for k in OUTPUTS:
            errors[f"{variant}_{k}"] = relative_error(out[k], golden[f"{variant}_{k}"])
    print("max relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOLERANCE, errors
    # The channel-permutation property holds in our outputs as in the reference.
    np.testing.assert_allclose(ours["c6perm"]["channelwise"].reshape(3, 6, 96),
                               ours["c6"]["channelwise"].reshape(3, 6, 96)[:, golden["perm"]], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def torch_pickle_converted(ref, tmp_path_factory):
    """The full-model torch pickle under save_pretrained's default name, converted (decoder included)."""
    tmp = tmp_path_factory.mktemp("openphenom_torch")
    weights = tmp / "model.safetensors"
    shutil.copy(ref / "model_torch_save_pretrained.pt", weights)
    assert convert.sniff_format(str(weights)) == "torch"
    config = convert.convert_openphenom(str(weights), str(tmp / "ckpt"), decoder_heads=4)
    return weights, tmp / "ckpt", config


def test_torch_pickle_named_safetensors_converts_with_its_decoder(torch_pickle_converted, converted):
    """Runs with or without PyTorch (without it, maejax.torch_pickle reads the file)."""
    _, ckpt, config = torch_pickle_converted
    assert (config.model.decoder_depth, config.model.decoder_width, config.model.in_channels) == (1, 32, 6)
    model, _, _ = load_model(str(ckpt))
    reference, _, _ = load_model(str(converted / "checkpoints"))
    # The encoder is bit-identical to the one converted from safetensors (so it matches the goldens too).
    ours = nnx.to_pure_dict(nnx.state(model.encoder))
    jax.tree.map(np.testing.assert_array_equal, ours, nnx.to_pure_dict(nnx.state(reference.encoder)))


def test_the_builtin_torch_reader_equals_torch_load(torch_pickle_converted):
    torch = pytest.importorskip("torch")
    weights, _, _ = torch_pickle_converted
    ours = torch_pickle.load(str(weights))["state_dict"]
    with open(weights, "rb") as f:
        theirs = torch.load(f, map_location="cpu", weights_only=True)["state_dict"]
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == np.dtype(str(v.dtype).removeprefix("torch.")), k
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    # strided views (a transposed tensor and a slice share one storage) rebuild as torch does
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = weights.parent / "views.pt"
    torch.save({"t": base.t(), "s": base[1:, 2:5], "b": torch.tensor(3, dtype=torch.bfloat16)}, path)
    views = torch_pickle.load(str(path))
    np.testing.assert_array_equal(views["t"], base.t().numpy())
    np.testing.assert_array_equal(views["s"], base[1:, 2:5].numpy())
    assert float(views["b"]) == 3.0 and views["b"].shape == ()      # 0-d tensors stay arrays
    # a storage cut short is an error naming the file and the storage
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    first = next(n for n in entries if n.endswith("/data/0"))
    entries[first] = entries[first][:2]
    short = weights.parent / "short.pt"
    with zipfile.ZipFile(short, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(pickle.UnpicklingError, match=r"short.pt: views/data/0 holds 2 bytes"):
        torch_pickle.load(str(short))


def test_the_builtin_torch_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"state_dict": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pt: refusing to load (__builtin__|builtins).print"):
        torch_pickle.load(str(path))


def test_converted_decoder_matches_maes_microscopy(torch_pickle_converted, converted):
    torch = pytest.importorskip("torch")
    weights, ckpt, _ = torch_pickle_converted
    model, _, _ = load_model(str(ckpt))
    sd = convert.read_state_dict(str(weights))
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, 1 + 24, 96)).astype(np.float32)
    restore = np.stack([rng.permutation(96) for _ in range(2)])
    expected = reference_camae_decoder(torch, sd, latent, restore, heads=4, depth=1, channels=6, eps=1e-5)
    graphdef, state = nnx.split(model.decoder)
    got = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, jnp.ones((2, 24), bool), r, jnp.broadcast_to(
        jnp.arange(6), (2, 6)), jnp.ones((2, 6), bool), (4, 4), 1))(state, latent, restore)
    error = relative_error(got, expected)
    print(f"decoder max relative error: {error:.1e}")
    assert error < TOLERANCE


def reference_camae_decoder(torch, sd, latent, restore, *, heads, depth, channels, eps):
    """maes_microscopy's `decode_to_reconstruction` with CAMAEDecoder, written out in torch ops."""
    F = torch.nn.functional
    w = {k: torch.from_numpy(v) for k, v in sd.items()}

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def lin(x, name, bias=True):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"] if bias else None)

    def attend(q, k, v, h):     # (B, N, D) each -> (B, N, D)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return a.transpose(1, 2).reshape(q.shape)

    def mlp(x, name):
        return lin(F.gelu(lin(x, f"{name}.fc1")), f"{name}.fc2")

    x = lin(torch.from_numpy(latent), "encoder_decoder_proj")
    b, n = restore.shape
    mask_tokens = w["decoder.mask_token"].repeat(b, n + 1 - x.shape[1], 1)
    rest = torch.cat([x[:, 1:], mask_tokens], 1)
    rest = torch.gather(rest, 1, torch.from_numpy(restore).unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], rest], 1)
    per = n // channels
    tiled = torch.cat([w["decoder.placeholder"]] + [w[f"decoder.modality_tokens.{m}"].repeat(1, per, 1)
                                                    for m in range(channels)], 1)
    x = x + w["decoder.pos_embeddings"] + tiled
    tokens = x[:, 1:]
    outs = []
    for m in range(channels):
        xm = tokens[:, m * per:(m + 1) * per]
        q = lin(ln(xm, "decoder.query_norm"), "decoder.cross_attention.q", bias=False)
        kv = lin(ln(tokens, "decoder.context_norm"), "decoder.cross_attention.kv", bias=False)
        xm = lin(attend(q, kv[..., :kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:], 8), "decoder.cross_attention.proj")
        xm = xm + mlp(ln(xm, "decoder.out_norm"), "decoder.mlp")
        for i in range(depth):
            p = f"decoder.decoders.{m}.{i}"
            qkv = lin(ln(xm, f"{p}.norm1"), f"{p}.attn.qkv")
            xm = xm + lin(attend(*qkv.chunk(3, dim=-1), heads), f"{p}.attn.proj")
            xm = xm + mlp(ln(xm, f"{p}.norm2"), f"{p}.mlp")
        outs.append(xm)
    return lin(torch.cat(outs, 1), "decoder_pred").numpy()


def test_bad_files_are_clear_errors(tmp_path, monkeypatch, ref):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(convert.ConversionError, match="weights.bin: neither a torch zip pickle"):
        convert.read_state_dict(str(junk))
    pickle = tmp_path / "model.safetensors"
    shutil.copy(ref / "model_torch_save_pretrained.pt", pickle)
    monkeypatch.setitem(sys.modules, "torch", None)           # as if torch were not installed
    assert convert.read_state_dict(str(pickle))["encoder.vit_backbone.cls_token"].shape == (1, 1, 96)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pickle.read_bytes()[: pickle.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt: not a readable torch zip checkpoint"):
        convert.read_state_dict(str(truncated))
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 6, 8, 8), np.float32))
    with pytest.raises(ValueError, match="images.npy: expected a uint8 array"):
        embed_arrays.load_images(str(images))


def test_converted_directory_cannot_be_overwritten(converted, ref):
    with pytest.raises(FileExistsError, match="already holds a run"):
        convert.convert_openphenom(str(ref / "encoder_random_init.safetensors"), workdir=str(converted))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):      # the deprecated out=
        convert.convert_openphenom(str(ref / "encoder_random_init.safetensors"), str(converted / "checkpoints"))
