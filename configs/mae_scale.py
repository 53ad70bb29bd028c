"""MAE-L/8 and MAE-G/8 at the papers' scale (Kraus et al. 2024/2025; see ../shared/notes/recursion.md s.4).

  python -m maejax.train --config configs/mae_scale.py:preset=L8 --workdir gs://BUCKET/runs/mae-l8 \
      --config.data.dir=DATASET
  python -m maejax.aot --config configs/mae_scale.py:preset=G8 --topology v5p:8x8x8   # memory, no hardware

The model and its recipe (architecture, global batch, Lion, lr, stochastic depth, 256 x 256 x 6 crops, mask
0.75) are configs/model_zoo.py's `mae_l8` and `mae_g8`; this file adds only what a run at scale needs: the
mesh, bf16 compute (float32 master weights), remat (`remat=`, default full), the run length, input workers and
the logging and checkpoint cadence.

Presets: `L8` (model_zoo's mae_l8: 128 H100 in the paper) and `G8` (mae_g8: 256 H100). Both default to 8e9
crops seen, G/8's 500 epochs of Phenoprints-16M (the paper states L/8's compute, 15,360 H100-h, not its
length); `steps=N` overrides. Parallelism is pure FSDP over all devices for L/8; G/8's width 1664 = 13 x 128
caps FSDP at 128, so the rest is data parallel (`mesh.data=-1, mesh.fsdp=128`). Set `mesh.dcn_data` to the
number of slices / nodes for a hybrid mesh.
"""
from configs import model_zoo
from maejax.config import parse_arg

CROPS_SEEN = 8e9
PRESETS = {
    # name: (the paper model in configs/model_zoo.py, mesh)
    "L8": ("mae_l8", {"data": 1, "fsdp": -1}),
    "G8": ("mae_g8", {"data": -1, "fsdp": 128}),
}


def get_config(arg=None):
    arg = parse_arg(arg, preset="L8", steps=0, data="", remat="full")
    if arg.preset not in PRESETS:
        raise ValueError(f"preset={arg.preset!r}: choose one of {sorted(PRESETS)}")
    paper, mesh = PRESETS[arg.preset]
    steps = arg.steps or round(CROPS_SEEN / model_zoo.PRESETS[paper]["batch"])
    c = model_zoo.recipe(paper, steps, data=arg.data)
    c.mesh.update(mesh)
    c.model.dtype = "bfloat16"
    c.model.remat = arg.remat
    c.data.workers = 8
    c.log_every = 100
    c.ckpt_every = 2_000
    return c
