"""MAE on the built-in synthetic screen.

  python -m maejax.train --config configs/mae_synthetic.py:preset=demo --workdir runs/demo \
      --config.data.dir=runs/demo/dataset

Presets: `demo` (the main job: a small ViT/8 on the 402-gene screen), `fast` (the same on the 210-gene
screen, fewer steps), `tiny` (tests: seconds), `paper` (ViT-S/16 recipe of the papers at 256 px: the Recursion
encoder of configs/model_zoo.py, Lion, lr 1e-4, 10% warm-up).
"""
from configs.model_zoo import RECURSION_ENCODER
from maejax.config import base, parse_arg

PRESETS = ("demo", "fast", "tiny", "paper")


def synthetic_map_settings(c, pca_components: int = 64):
    """The map settings every synthetic-screen number in README and docs was measured with (base() has
    EFAAR's: PCA 128, TVN, two threshold pairs): PCA 64, centerscale, the (0.05, 0.95) pair."""
    c.eval.pca_components = pca_components
    c.eval.correction = "centerscale"
    c.eval.thresholds = [[0.05, 0.95]]
    return c


def get_config(arg=None):
    arg = parse_arg(arg, preset="demo", variant="", steps=0, data="")
    c = base()
    c.model.name = "mae"
    if arg.preset == "demo":
        c.model.variant = "Ti/8"
        c.model.depth = 6
        c.model.decoder_width = 128
        c.model.decoder_depth = 2
        c.model.decoder_heads = 4
        c.model.remat = "full"    # half the activation memory, and the step is no slower on a CPU
        c.data.batch_size = 32
        c.data.crop_size = 64
        c.total_steps = 900
        c.log_every = 50
        c.ckpt_every = 300
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 60
        c.optim.weight_decay = 0.05
        # Screen v2 (docs/synthetic_screen.md): per-plate normalisation keeps each well's stain levels in
        # the input, mean+std pooling keeps per-crop spread; normalised-pixel targets (He et al.).
        c.data.normalize = "plate"
        c.model.pool = "mean_std"
        c.model.norm_pix_loss = True
        c.eval.tasks = ["perturbation", "functional_group", "experiment"]
        c.eval.split_fractions = [0.5, 0.25, 0.25]    # 2 of a gene's 8 wells held out for test
        synthetic_map_settings(c)
    elif arg.preset == "tiny":
        c.model.variant = "mu/8"
        c.model.decoder_width = 32
        c.model.decoder_depth = 1
        c.model.decoder_heads = 2
        c.data.batch_size = 8
        c.data.crop_size = 32
        c.total_steps = 6
        c.log_every = 2
        c.ckpt_every = 3
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 2
        c.eval.batch_size = 32
        synthetic_map_settings(c, pca_components=8)
        c.eval.tasks = ["perturbation", "functional_group", "experiment"]
        c.eval.n_boot = 200
        c.data.normalize = "plate"
        c.model.pool = "mean_std"
    elif arg.preset == "fast":
        c = get_config("preset=demo")
        c.total_steps = 600
    elif arg.preset == "paper":
        c.model.update(RECURSION_ENCODER)
        c.model.variant = "S/16"
        c.data.batch_size = 2048
        c.data.crop_size = 256
        c.total_steps = 100_000
        c.optim.name = "lion"
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 10_000
        c.optim.b1, c.optim.b2 = 0.9, 0.95
        c.model.drop_path = 0.1
        c.model.dtype = "bfloat16"
    else:
        raise ValueError(f"preset={arg.preset!r}: choose one of {PRESETS}")
    if arg.variant:
        c.model.variant = arg.variant
    if arg.steps:
        c.total_steps = arg.steps
    if arg.data:
        c.data.dir = arg.data
    return c
