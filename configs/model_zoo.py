"""The papers' models and recipes (Kraus et al. 2023/2024, OpenPhenom, "ViTally Consistent" 2025): the one place
where each published model's architecture and training recipe is written (../shared/notes/recursion.md).

  python -m maejax.train --config configs/model_zoo.py:preset=openphenom,steps=50000,data=DIR --workdir runs/x

Presets:
  openphenom  CA-MAE ViT-S/16 (OpenPhenom): parallel blocks, qk-norm, LayerScale, up to 11 channels, decoder
              512 x 8 per channel; batch 2048, Lion lr 1e-4, stochastic depth 0.1.
  mae_l8      MAE ViT-L/8 on Phenoprints-16M: batch 16,384, lr 3e-5, stochastic depth 0.3.
  mae_g8      MAE ViT-G/8 ("Phenom-2"): batch 8,192, lr 3e-5, stochastic depth 0.6.
  munet       MU-Net M/8 (masked U-Net), batch 2048, Lion lr 1e-4.
  wsl         weakly supervised ViT-L/16 classifier over `classes=` perturbations (default: RxRx1's 1,138).
Every preset trains on 256 x 256 crops with the papers' Lion (0.9, 0.95), weight decay 0.05, 10% warm-up
then cosine decay, and takes `steps=` (crops seen / batch size; the papers quote epochs of their data).
The encoders of all Recursion MAEs use timm's ParallelScalingBlock (qkv without bias, q/k LayerNorm,
LayerScale 1e-4) and timm's average pooling (no norm on tokens, LayerNorm after pooling): maes_microscopy's
ViT factories (S/16 to L/8) and OpenPhenom's weights show it; G/8 is taken to be of the same family (its
paper's block is only known second-hand).

Presets state the model and the optimiser, not the machine: compute dtype, remat and mesh stay at base()'s
(float32, none, data parallel). `configs/mae_scale.py:preset=L8|G8` runs mae_l8 and mae_g8 at the papers'
scale: it takes these recipes and adds the mesh, bf16 compute, remat and the run length.
"""
from maejax.config import base, parse_arg

RECURSION_ENCODER = dict(block="parallel", qkv_bias=False, qk_norm=True, layerscale=1e-4, final_norm="pooled")

PRESETS = {
    "openphenom": dict(model=dict(RECURSION_ENCODER, name="ca_mae", variant="S/16", max_channels=11, drop_path=0.1,
                                  decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_norm_eps=1e-5),
                       batch=2048, lr=1e-4),
    "mae_l8": dict(model=dict(RECURSION_ENCODER, name="mae", variant="L/8", drop_path=0.3), batch=16384, lr=3e-5),
    "mae_g8": dict(model=dict(RECURSION_ENCODER, name="mae", variant="G/8", drop_path=0.6), batch=8192, lr=3e-5),
    "munet": dict(model=dict(name="munet", variant="M/8"), batch=2048, lr=1e-4),
    "wsl": dict(model=dict(name="supervised", backbone="vit", variant="L/16", drop_path=0.1), batch=2048, lr=1e-4),
}


def recipe(preset: str, steps: int, data: str = "", classes: int = 1138):
    """base() with the published model `preset`'s architecture and training recipe, for `steps` steps."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose one of {sorted(PRESETS)}")
    if steps <= 0:
        raise ValueError("set steps= (crops to train on / batch size): the papers quote epochs of their datasets")
    p = PRESETS[preset]
    c = base()
    c.model.update(p["model"])
    if preset == "wsl":
        c.model.num_classes = classes
    c.data.batch_size = p["batch"]
    c.data.crop_size = 256
    c.data.dir = data
    c.total_steps = steps
    c.optim.name = "lion"
    c.optim.lr = p["lr"]
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = max(1, steps // 10)
    return c


def get_config(arg=None):
    arg = parse_arg(arg, preset="openphenom", steps=0, data="", classes=1138)
    return recipe(arg.preset, arg.steps, arg.data, arg.classes)
