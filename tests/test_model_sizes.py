"""Parameter counts of the variants match the published ones (abstract models: nothing is allocated), and
the model report lists every variant of every model kind."""
import json
from pathlib import Path

import pytest

from maejax.models import flops, report
from maejax.models.cnn import decode_cnn_variant

REPO = Path(__file__).resolve().parents[1]

# Published encoder sizes (ViT papers; "ViTally Consistent" for G/8). Ours use 6-channel patch
# embeddings and fixed sin-cos positions where the published ViTs have 3 channels and a learned table,
# and the published numbers are rounded, hence 1.5%.
PUBLISHED = {"S/16": 22e6, "B/16": 86e6, "L/16": 304e6, "H/14": 632e6, "G/8": 1.85e9}


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_vit_encoder_sizes_match_the_published_ones(variant):
    model = flops.abstract_model(dict(name="mae", variant=variant, in_channels=6))
    assert flops.param_count(model.encoder) == pytest.approx(PUBLISHED[variant], rel=0.015)


def test_ca_mae_s16_is_openphenom_without_its_fixed_tables():
    """OpenPhenom's state dict holds 178,045,568 values; less its sin-cos tables (encoder 1 + 11 * 256
    positions x 384, decoder 1 + 6 * 256 x 512) and the zero placeholder (512), which maejax computes
    instead of storing, that is exactly our CA-MAE S/16 with OpenPhenom's decoder (512 x 8 per channel).
    (qkv_bias=False as in OpenPhenom; a converted checkpoint sets it to hold timm's misaligned bias.)"""
    model = flops.abstract_model(dict(name="ca_mae", variant="S/16", in_channels=6, max_channels=11,
                                      block="parallel", qkv_bias=False, qk_norm=True, layerscale=1e-4,
                                      final_norm="pooled",
                                      decoder_width=512, decoder_depth=8, decoder_heads=16))
    assert flops.param_count(model) == 178_045_568 - (1 + 11 * 256) * 384 - (1 + 6 * 256) * 512 - 512


def test_report_lists_every_variant_of_every_model(capsys):
    report.main(["--json"])
    table = json.loads(capsys.readouterr().out)
    expected = {(kind, v) for kind, (_, variants) in report.KINDS.items() for v in variants}
    assert {(r["model"], r["variant"]) for r in table} == expected
    assert {"S/16", "B/16", "B/8", "L/16", "L/8", "H/14", "G/8"} <= {r["variant"] for r in table}
    for r in table:
        assert {"variant", "model", "params", "train_gflops_per_crop", "infer_gflops_per_crop"} <= set(r)
        assert r["params"] >= r["encoder_params"] > 0 and r["infer_gflops_per_crop"] > 0
    rows = {(r["model"], r["variant"]): r for r in table}
    g8 = rows[("mae", "G/8")]
    assert g8["tokens"] == 1024 and g8["crop"] == "256x256x6"
    # MAE training runs the encoder on a quarter of the tokens: cheaper than inference for big encoders.
    assert g8["train_gflops_per_crop"] < g8["infer_gflops_per_crop"]
    assert rows[("ca_mae", "S/16")]["tokens"] == 6 * 256
    assert rows[("mae", "H/14")]["crop"] == "252x252x6"
    md = report.markdown(table[:2])
    assert md.splitlines()[2].startswith("| mae | S/16 | 48.1M | 21.9M | 256x256x6 | 256 |")


def test_unknown_cnn_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CNN variant 'XL/8'"):
        decode_cnn_variant("XL/8")


@pytest.mark.parametrize("preset", ["openphenom", "mae_l8", "mae_g8", "munet", "wsl"])
def test_zoo_presets_are_valid_configs_of_the_expected_size(preset):
    from maejax import config as config_lib
    c = config_lib.load(f"{REPO / 'configs' / 'model_zoo.py'}:preset={preset},steps=1000")
    config_lib.check_known(c)
    params = flops.param_count(flops.abstract_model(c.model))
    expected = {"openphenom": 176.2e6, "mae_l8": 329e6, "mae_g8": 1.868e9, "munet": 17.2e6, "wsl": 305e6}
    assert params == pytest.approx(expected[preset], rel=0.01)
    assert c.optim.warmup_steps == 100
