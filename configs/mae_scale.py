"""MAE-L/8 and MAE-G/8 at the papers' scale (Kraus et al. 2024/2025; see ../shared/notes/recursion.md s.4):
256 x 256 x 6 crops, mask 0.75, Lion (0.9, 0.95), weight decay 0.05, bf16 compute, float32 master weights.

  python -m maejax.train --config configs/mae_scale.py:preset=L8 --workdir gs://BUCKET/runs/mae-l8 \
      --config.data.dir=DATASET
  python -m maejax.aot --config configs/mae_scale.py:preset=G8 --topology v5p:8x8x8   # memory, no hardware

Presets: `L8` (ViT-L/8, global batch 16,384, lr 3e-5, stochastic depth 0.3: 128 H100 in the paper) and
`G8` (ViT-G/8, batch 8,192, lr 3e-5, stochastic depth 0.6: 256 H100). Both default to 8e9 crops seen, G/8's
500 epochs of Phenoprints-16M (the paper states L/8's compute, 15,360 H100-h, not its length); `steps=N`
overrides. Warm-up is 10% of the steps. Parallelism is pure FSDP over all
devices for L/8; G/8's width 1664 = 13 x 128 caps FSDP at 128, so the rest is data parallel
(`mesh.data=-1, mesh.fsdp=128`). Set `mesh.dcn_data` to the number of slices / nodes for a hybrid mesh.
"""
from maejax.config import base, parse_arg

CROPS_SEEN = 8e9
PRESETS = {
    # variant, global batch, stochastic depth, mesh
    "L8": ("L/8", 16_384, 0.3, {"data": 1, "fsdp": -1}),
    "G8": ("G/8", 8_192, 0.6, {"data": -1, "fsdp": 128}),
}


def get_config(arg=None):
    arg = parse_arg(arg, preset="L8", steps=0, data="", remat="full")
    if arg.preset not in PRESETS:
        raise ValueError(f"preset={arg.preset!r}: choose one of {sorted(PRESETS)}")
    variant, batch, drop_path, mesh = PRESETS[arg.preset]
    c = base()
    c.model.name = "mae"
    c.model.variant = variant
    c.model.drop_path = drop_path
    c.model.dtype = "bfloat16"
    c.model.remat = arg.remat
    c.model.scan_layers = True
    c.data.batch_size = batch
    c.data.crop_size = 256
    c.data.workers = 8
    c.total_steps = arg.steps or round(CROPS_SEEN / batch)
    c.log_every = 100
    c.ckpt_every = 2_000
    c.optim.name = "lion"
    c.optim.lr = 3e-5
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = c.total_steps // 10
    c.mesh.update(mesh)
    if arg.data:
        c.data.dir = arg.data
    return c
