"""Every new model's parameters map onto the (data, fsdp, tensor) mesh through the default logical rules:
stacked per-channel decoders, cross-attention, channel embeddings and conv kernels included."""
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from maejax import sharding as shd, state as state_lib

CONFIGS = {
    "ca_mae": dict(name="ca_mae", variant="mu/8", in_channels=4, decoder_width=32, decoder_depth=1, decoder_heads=2,
                   cross_attention_heads=2, channel_embed=True),
    "munet": dict(name="munet", variant="mu/8", in_channels=6),
    "supervised_cnn": dict(name="supervised", backbone="cnn", variant="mu", in_channels=6, num_classes=10),
}
EXPECTED = {
    "ca_mae": {("decoder", "channel_decoders", "blocks", "mlp", "fc1", "kernel"): P(None, None, "fsdp", "tensor"),
               ("decoder", "cross_attention", "kv"): P("fsdp", None, "tensor", None),
               ("encoder", "patch_embed", "channel_embed"): P(None, "fsdp")},
    "munet": {("encoder", "stem", "kernel"): P(None, None, None, "fsdp"),
              ("decoder", "head", "kernel"): P(None, None, "fsdp", None)},
    "supervised_cnn": {("head", "kernel"): P("fsdp", None)},
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_parameters_shard_by_their_logical_names(kind):
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    flat = dict(nnx.to_flat_state(state_lib.abstract(CONFIGS[kind], mesh, shd.DEFAULT_RULES).model_abstract))
    for path, spec in EXPECTED[kind].items():
        assert flat[path].sharding.spec == spec, path
