"""Experiment configs: `configs/<name>.py` defines `get_config(arg)` (big_vision style), chosen on the command
line as `--config configs/name.py:key=value,key2=value2` and overridden with `--config.section.key=value`.

`base()` holds every key with its default (the only place defaults are written), so configs only state
what differs and a typo in a config file or an override is an error that names the key. Code that reads a
partial config (a run's stored config, a test's few model keys) reads `complete(...)` of it, which fills
in base()'s defaults. Every command that takes a config takes its overrides as `--config.KEY=VALUE`
through `parse_override_flags`.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from maejax.flags import deprecated_flag  # noqa: F401  (the one deprecation notice; commands call it from here)

# Logical axis -> mesh axes (MaxText's rules table): parameter, activation and input shardings follow from
# it (maejax/sharding.py). Defaults: FSDP over the model width of every large weight, tensor parallelism
# over heads and MLP, batch over (data, fsdp); norm scales, biases over "embed" and position tables stay
# replicated. Kept here, free of jax, so reading a config or its defaults imports no jax.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("classes", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_ckpts = 3
    c.ckpt_dir = ""              # "" = <workdir>/checkpoints; may be gs://... (orbax writes it directly)
    c.peak_tflops = 0.0          # per-device peak for MFU; 0 = look the device kind up in maejax.mfu
    # XLA backend (LLVM) optimisation level of the train step; -1 = XLA's default. 0 compiles a CPU step about
    # twice as fast and runs it slower: for tests and smoke runs.
    c.xla_backend_optimization_level = -1

    # Where metrics go (maejax.metrics; the trainer's and eval.job's): comma-separated, of jsonl
    # (<workdir>/metrics.jsonl), tensorboard (<workdir>/tensorboard), console (absl log lines) and wandb
    # (Weights & Biases, when `pip install wandb`); "" = none.
    c.log = ml_collections.ConfigDict()
    c.log.writers = "jsonl,tensorboard,console"

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""              # dataset directory (maejax.records.LAYOUT)
    # Several datasets, sampled by weight (grain mixing): "DIR=WEIGHT,DIR=WEIGHT" (data.dir stays ""); each
    # may have its own channels (a channel-agnostic model gets them padded, with channel_ids / channel_mask)
    c.data.mixture = ""
    # Channel vocabulary (maejax.channels): the channel identities the model's channel ids index. "" = the
    # channels of data.dir (or of the mixture's datasets, in order of first appearance); a preset (rxrx1 |
    # rxrx3_core | jump_cp | synthetic | cell_painting); or names "DNA|Hoechst,ER|ConA,..." (| = aliases)
    c.data.channels = ""
    c.data.batch_size = 64       # global batch size (all processes)
    c.data.crop_size = 64        # model input size; records may be larger (random crop)
    c.data.normalize = "crop"    # crop (self-standardisation, the papers') | plate (maejax.preprocess)
    c.data.flip = True
    c.data.rot90 = True
    c.data.workers = 0           # grain worker processes per host (0 = in-process)
    # Input streams the global batch is assembled from; each process reads streams / process_count of them.
    # 0 = one per process. Fixing it (e.g. to the largest host count you will use) keeps the data order,
    # and hence the losses, the same whatever the number of processes, and lets a run resume on another.
    c.data.streams = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "mae"         # mae | ca_mae | munet | supervised (maejax.models.MODELS)
    c.model.variant = "S/16"     # ViT NAME/PATCH (maejax.models.vit.VARIANTS); MU-Net / CNN: NAME/MASKPATCH
    c.model.in_channels = 6      # input channels (CA-MAE: channels reconstructed, one decoder each)
    # Explicit overrides of the variant's dimensions (0 = take the variant's).
    c.model.width = 0
    c.model.depth = 0
    c.model.mlp_dim = 0
    c.model.num_heads = 0
    c.model.block = "pre_ln"     # "pre_ln" | "parallel" (OpenPhenom / ViT-22B)
    c.model.qkv_bias = True
    c.model.qk_norm = False
    c.model.layerscale = ml_collections.FieldReference(None, field_type=float)
    c.model.drop_path = 0.0          # stochastic depth rate of the last block
    c.model.drop_path_schedule = "linear"   # linear (timm: 0 -> drop_path over depth) | uniform
    c.model.norm_eps = 1e-6
    c.model.cls_token = True
    c.model.final_norm = "tokens"
    c.model.pool = "mean"        # per-block features: mean | mean_std (mean and std of patch tokens) | cls
    c.model.dtype = "float32"    # compute dtype ("bfloat16" at scale); parameters stay float32
    c.model.param_dtype = "float32"
    # None (= "xla") | "cudnn" (GPUs) | "splash" (the Pallas TPU kernel): maejax/models/attention.py
    c.model.attention = ml_collections.FieldReference(None, field_type=str)
    c.model.scan_layers = True
    c.model.remat = "none"       # none | full | dots | dots_no_batch
    c.model.mask_ratio = 0.75
    c.model.decoder_width = 512
    c.model.decoder_depth = 8
    c.model.decoder_heads = 16
    c.model.decoder_norm_eps = 0.0  # 0 = norm_eps
    c.model.fourier_weight = 0.01
    c.model.norm_pix_loss = False
    # Channel-agnostic MAE (ca_mae)
    c.model.max_channels = 0         # channels the encoder accepts (0 = in_channels); OpenPhenom: 11
    c.model.channel_embed = False    # learned per-channel embedding (ChannelViT)
    c.model.channel_sampling = "none"  # none | hierarchical (ChannelViT HCS, per sample)
    c.model.cross_attention_heads = 8
    # Supervised baseline and CNN models
    c.model.num_classes = 0          # supervised: number of perturbation labels (required)
    c.model.backbone = "vit"         # supervised: vit | cnn
    c.model.label_smoothing = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"       # adamw | lion
    c.optim.lr = 1e-4
    c.optim.min_lr_ratio = 0.0
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 1  # microbatches per step (lax.scan); the batch is data.batch_size in total

    # Axis sizes within a TPU slice / GPU node (one may be -1), and across them (dcn_*: hybrid mesh).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1,
                                        "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})
    c.sharding_rules = [list(r) for r in DEFAULT_RULES]

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    # Channels given to the model (eval.job's mae / random_init kinds, eval.embed_job), by name, in this order:
    # "" = the dataset's, as stored (a fixed-channel model: its training channels, found by name);
    # "DNA,RNA,Mito" = that subset and order (channel-agnostic models; names through the run's vocabulary)
    c.eval.channels = ""
    # Map building, shared with `eval.map_benchmark`'s defaults: the EFAAR reference settings
    # (efaar_benchmarking 1.0: PCA 128, TVN on each batch's controls, recall at (0.05, 0.95) and (0.1, 0.9)).
    c.eval.pca_components = 128          # at most: fewer when the map has fewer wells or features; 0 = no PCA
    c.eval.correction = "tvn"            # tvn | centerscale | none (fitted on each batch's controls)
    c.eval.thresholds = [[0.05, 0.95], [0.1, 0.9]]
    # "" = from the dataset's manifest: its control_label, else its controls (is_control); other controls
    # are left out of the map
    c.eval.control = ""
    c.eval.batch_col = "experiment"      # batch of the correction: experiment | plate
    c.eval.pca_batch_col = ""            # batch of the scaling before PCA: "" = batch_col | experiment | plate
    # Relationship tables (<Source>.txt, entity1,entity2): "" = <dataset>/annotations when the dataset has one
    # (the synthetic screen), else the EFAAR 1.0 tables of the installed efaar_benchmarking package
    c.eval.annotations = ""
    c.eval.probe = True                  # run the probe tasks (False: recall and consistency only)
    # Probe tasks by name (eval/tasks.py): "NAME" or "NAME:key=value,..." with split (wells |
    # experiments | perturbations), level (crop | well), probe (ridge | logistic), correction.
    c.eval.tasks = ["perturbation", "functional_group", "qc", "experiment"]
    c.eval.select_by = "perturbation"    # the task whose validation score picks the reported block
    c.eval.probe_model = "ridge"         # each task's probe unless its spec names one: ridge | logistic
    c.eval.split_fractions = [0.8, 0.1, 0.1]    # train/val/test shares of each class's held-out units
    c.eval.groups = "ground_truth:complex"      # functional groups: CSV gene,group | ground_truth:complex|pathway
    c.eval.negative_controls = "ground_truth"   # consistency null: ground_truth (null genes) | random | FILE
    c.eval.mean_average_precision = True  # copairs mAP (activity, consistency) in every block's map report
    c.eval.n_boot = 1000                 # bootstrap resamples for the 95% intervals (genes, held-out wells); 0 = none
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """"variant=L/8,steps=100,runlocal" -> ConfigDict; keys must be among `defaults` (typed by them)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise KeyError(f"config argument {key!r} is not one of {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            value = True
        elif isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            value = type(default)(value)
        out[key] = value
    return out


def load(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and applies {"section.key": value} overrides (unknown keys are errors)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"maejax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    for key, value in (overrides or {}).items():
        override(config, key, value)
    return config


def complete(given: Any, section: str = "") -> ml_collections.ConfigDict:
    """base() (or its `section`, e.g. "model") overlaid with `given` (a dict or ConfigDict, possibly partial:
    a run's stored config from before newer keys, a test's few keys): what code reads instead of writing
    defaults again. A key base() does not have is a KeyError naming it."""
    out = base()
    for part in filter(None, section.split(".")):
        out = out[part]
    out.lock()
    _overlay(out, given, f"{section}." if section else "")
    return out


def _overlay(node: ml_collections.ConfigDict, given: Any, prefix: str) -> None:
    for key, value in dict(given).items():
        if key not in node:
            raise KeyError(unknown_key(f"{prefix}{key}", prefix.count("."), node.keys()))
        if isinstance(node[key], ml_collections.ConfigDict) and hasattr(value, "items"):
            _overlay(node[key], value, f"{prefix}{key}.")
        else:
            node[key] = value


def unknown_key(key: str, depth: int, known, where: str = "") -> str:
    """The message for a key that does not exist: the key, where it was given, and the closest key at the
    level (`depth`, 0-based) where it went wrong, or the keys there."""
    parts = key.split(".")
    known = sorted(known)
    close = difflib.get_close_matches(parts[depth], known, n=1)
    hint = (f"did you mean {'.'.join(parts[:depth] + close + parts[depth + 1:])}?" if close
            else f"known keys there: {known}")
    return f"unknown config key {key!r}{f' in {where}' if where else ''}; {hint}"


def locate(config: ml_collections.ConfigDict, key: str, where: str = "") -> tuple[ml_collections.ConfigDict, str]:
    """(the section of `config` that holds `key` = "section.name", its last part); a key `config` does not
    have is a KeyError (`unknown_key`'s message)."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        known = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
        if part not in known:
            raise KeyError(unknown_key(key, i, known, where))
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets `section.key` in a locked config; a key that does not exist is a KeyError that names it. A
    string is parsed for a key that is not a string (Python literals; true/false/yes/no/1/0 for booleans)."""
    node, leaf = locate(config, key, f"override {key}={value!r}")
    current = node[leaf]
    if isinstance(value, str) and not isinstance(current, str):
        if isinstance(current, bool) and value.lower() in BOOLEAN_WORDS:
            value = BOOLEAN_WORDS[value.lower()]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
    node[leaf] = value


BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_override_flags(argv: Sequence[str], *, only: str = "") -> tuple[list[str], dict[str, str]]:
    """Takes the `--config.KEY=VALUE` (or `--config.KEY VALUE`) flags out of a command line: returns the
    other arguments, for the command's own parser, and {KEY: VALUE} (values stay strings: `override`
    parses them against the key's type). Every command that takes a config calls this, so an unknown KEY
    (not in base(); with `only`, e.g. "eval", not under that section) stops every one of them alike: a
    SystemExit naming the flag, with the closest key."""
    rest, out = [], {}
    reference = base()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--config."):
            rest.append(arg)
            continue
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i == len(args) or args[i].startswith("--"):
                raise SystemExit(f"{arg}: give a value, --config.{key}=VALUE")
            value, i = args[i], i + 1
        if only and not key.startswith(f"{only}."):
            raise SystemExit(f"{arg}: this command takes only --config.{only}.KEY=VALUE overrides")
        try:
            node, leaf = locate(reference, key, arg)
            if isinstance(node[leaf], ml_collections.ConfigDict):
                raise TypeError(f"{key} is a section: set one of its keys, --config.{key}.KEY=VALUE")
            override(reference, key, value)   # the value must fit the key's type
        except KeyError as e:
            raise SystemExit(e.args[0]) from None
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{arg}: {e}") from None
        out[key] = value
    return rest, out


def check_known(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
                prefix: str = "") -> None:
    """Every key of `config` must exist in `base()` (catches typos in config files)."""
    reference = base() if reference is None else reference
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise KeyError(unknown_key(name, prefix.count("."), reference.keys()))
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(reference[key],
                                                                             ml_collections.ConfigDict):
            check_known(config[key], reference[key], prefix=f"{name}.")
