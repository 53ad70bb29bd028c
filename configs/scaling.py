"""The scaling sweep on the synthetic screen: MAEs of several sizes, each trained on two dataset sizes with
the demo recipe (AdamW lr 1e-3, warm-up 60, batch 32, 64 x 64 crops, decoder 128 x 2), then evaluated on
one held-out screen.

  python -m maejax.train --config configs/scaling.py:variant=S/8,depth=6,data=small,root=runs/scaling \
      --workdir runs/scaling/S8d6-small
  python -m launch.scaling_sweep --out runs/scaling         # datasets, every run, evals, table and plot

Arguments: variant (ViT NAME/PATCH), depth (0 = the variant's), data (small | large), root, steps.

Datasets under `<root>/datasets/` (all `data.synthetic_screen` preset demo_qc: 10% of crops carry an
image-quality artefact): `small` (seed 0, 4 experiments x 2 plates, 3,456 crops), `large` (seed 0, 4 x 8
plates, 13,824 crops) and `eval` (seed 1, as small: a screen no run trains on). Every run takes the same
number of steps (`steps=`, default 300), so the model size and the number of epochs differ, not the crops seen.
"""
from configs.mae_synthetic import synthetic_map_settings
from maejax.config import base, parse_arg

# name -> synthetic-screen parameters (preset demo_qc plus these)
DATASETS = {
    "small": dict(seed=0),
    "large": dict(seed=0, plates_per_experiment=8),
    "eval": dict(seed=1),
}
SCREEN_PRESET = "demo_qc"


def dataset_dir(root: str, name: str) -> str:
    return f"{root}/datasets/{name}"


def get_config(arg=None):
    arg = parse_arg(arg, variant="Ti/8", depth=0, data="small", root="runs/scaling", steps=300)
    if arg.data not in DATASETS:
        raise ValueError(f"data={arg.data!r}: choose one of {sorted(DATASETS)}")
    c = base()
    c.model.name = "mae"
    c.model.variant = arg.variant
    c.model.depth = arg.depth
    c.model.decoder_width = 128
    c.model.decoder_depth = 2
    c.model.decoder_heads = 4
    c.data.dir = dataset_dir(arg.root, arg.data)
    c.data.batch_size = 32
    c.data.crop_size = 64
    c.total_steps = arg.steps
    c.log_every = 50
    c.ckpt_every = arg.steps
    c.keep_ckpts = 1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 60
    c.optim.weight_decay = 0.05
    return synthetic_map_settings(c)
