"""The papers' models and recipes (Kraus et al. 2023/2024, OpenPhenom, "ViTally Consistent" 2025).

  python -m maejax.train --config configs/model_zoo.py:preset=openphenom,steps=50000,data=DIR --workdir runs/x

Presets:
  openphenom  CA-MAE ViT-S/16 (OpenPhenom): parallel blocks, qk-norm, LayerScale, up to 11 channels, decoder
              512 x 8 per channel; batch 2048, Lion lr 1e-4, stochastic depth 0.1.
  mae_l8      MAE ViT-L/8 on Phenoprints-16M: batch 16,384, lr 3e-5, stochastic depth 0.3.
  mae_g8      MAE ViT-G/8 ("Phenom-2"): batch 8,192, lr 3e-5, stochastic depth 0.6, remat, bf16.
  munet       MU-Net M/8 (masked U-Net), batch 2048, Lion lr 1e-4.
  wsl         weakly supervised ViT-L/16 classifier over `classes=` perturbations (default: RxRx1's 1,138).
Every preset trains on 256 x 256 crops with the papers' Lion (0.9, 0.95), weight decay 0.05, 10% warm-up
then cosine decay, and takes `steps=` (crops seen / batch size; the papers quote epochs of their data).
The encoders of all Recursion MAEs use timm's ParallelScalingBlock (qkv without bias, q/k LayerNorm,
LayerScale 1e-4) and timm's average pooling (no norm on tokens, LayerNorm after pooling).
"""
from maejax.config import base, parse_arg

RECURSION_ENCODER = dict(block="parallel", qkv_bias=False, qk_norm=True, layerscale=1e-4, final_norm="pooled")

PRESETS = {
    "openphenom": dict(model=dict(RECURSION_ENCODER, name="ca_mae", variant="S/16", max_channels=11, drop_path=0.1,
                                  decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_norm_eps=1e-5),
                       batch=2048, lr=1e-4),
    "mae_l8": dict(model=dict(RECURSION_ENCODER, name="mae", variant="L/8", drop_path=0.3), batch=16384, lr=3e-5),
    "mae_g8": dict(model=dict(RECURSION_ENCODER, name="mae", variant="G/8", drop_path=0.6, remat="dots_no_batch",
                              dtype="bfloat16"), batch=8192, lr=3e-5),
    "munet": dict(model=dict(name="munet", variant="M/8"), batch=2048, lr=1e-4),
    "wsl": dict(model=dict(name="supervised", backbone="vit", variant="L/16", drop_path=0.1), batch=2048, lr=1e-4),
}


def get_config(arg=None):
    arg = parse_arg(arg, preset="openphenom", steps=0, data="", classes=1138)
    if arg.preset not in PRESETS:
        raise ValueError(f"preset={arg.preset!r}: choose one of {sorted(PRESETS)}")
    if arg.steps <= 0:
        raise ValueError("set steps= (crops to train on / batch size): the papers quote epochs of their datasets")
    preset = PRESETS[arg.preset]
    c = base()
    c.model.update(preset["model"])
    if arg.preset == "wsl":
        c.model.num_classes = arg.classes
    c.data.batch_size = preset["batch"]
    c.data.crop_size = 256
    c.data.dir = arg.data
    c.total_steps = arg.steps
    c.optim.name = "lion"
    c.optim.lr = preset["lr"]
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = max(1, arg.steps // 10)
    return c
