"""Sizes and FLOPs of the model zoo: every variant of every model kind, instantiated abstractly.

  python -m maejax.models.report --json        # one JSON list
  python -m maejax.models.report --markdown    # the README table
  [--height 256 --width 256 --channels 6]

Per row: variant, model, params (all parameters, decoder included), encoder_params (the part that embeds:
ViT encoder or CNN backbone), crop (the largest multiple of the patch not above the requested size, so /14
models get 252), tokens (patch tokens per crop; CA-MAE: channels x patches; none for CNNs),
train_gflops_per_crop and infer_gflops_per_crop (analytic model FLOPs, a multiply-add = 2, training =
forward + backward = 3 x forward of what training runs, inference = the embedding forward pass).
Model defaults are those of `maejax.config.base()` (MAE decoder 512 x 8, mask 0.75; CA-MAE decoder
512 x 8 per channel, 8 cross-attention heads; supervised head over 1,138 classes = the RxRx1 siRNAs).
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from maejax import flags
from maejax.config import base
from maejax.models.flops import abstract_model, param_count

VIT_VARIANTS = ("S/16", "B/16", "B/8", "L/16", "L/8", "H/14", "G/8")
CNN_VARIANTS = ("S/8", "M/8", "L/8")
SUPERVISED_CLASSES = 1138

# model label -> (config overrides, variants)
KINDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "mae": ({"name": "mae"}, VIT_VARIANTS),
    "ca_mae": ({"name": "ca_mae"}, VIT_VARIANTS),
    "supervised_vit": ({"name": "supervised", "backbone": "vit", "num_classes": SUPERVISED_CLASSES}, VIT_VARIANTS),
    "munet": ({"name": "munet"}, CNN_VARIANTS),
    "supervised_cnn": ({"name": "supervised", "backbone": "cnn", "num_classes": SUPERVISED_CLASSES}, ("S", "M", "L")),
}
CNN_KINDS = ("munet", "supervised_cnn")


def model_config(kind: str, variant: str, channels: int):
    overrides, _ = KINDS[kind]
    m = base().model
    m.update(overrides)
    m.variant = variant
    m.in_channels = channels
    return m


def row(kind: str, variant: str, height: int = 256, width: int = 256, channels: int = 6) -> dict[str, Any]:
    model = abstract_model(model_config(kind, variant, channels))
    _, _, patch = variant.partition("/")
    step = int(patch) if patch else 1
    h, w = height // step * step, width // step * step
    encoder = model.backbone if kind.startswith("supervised") else model.encoder
    tokens = None
    if kind not in CNN_KINDS:
        tokens = (h // step) * (w // step) * (channels if kind == "ca_mae" else 1)
    f = model.flops_per_crop(h, w)
    return {"variant": variant, "model": kind, "params": param_count(model), "encoder_params": param_count(encoder),
            "crop": f"{h}x{w}x{channels}", "tokens": tokens,
            "train_gflops_per_crop": round(f["train"] / 1e9, 2), "infer_gflops_per_crop": round(f["infer"] / 1e9, 2)}


def rows(height: int = 256, width: int = 256, channels: int = 6, kinds: Iterable[str] | None = None
         ) -> list[dict[str, Any]]:
    return [row(kind, variant, height, width, channels) for kind in (kinds or KINDS) for variant in KINDS[kind][1]]


def markdown(table: list[dict[str, Any]]) -> str:
    head = "| model | variant | params | encoder params | crop | tokens | train GFLOPs/crop | infer GFLOPs/crop |"
    lines = [head, "|" + "---|" * 8]
    for r in table:
        lines.append(f"| {r['model']} | {r['variant']} | {_millions(r['params'])} | {_millions(r['encoder_params'])} "
                     f"| {r['crop']} | {r['tokens'] if r['tokens'] is not None else '-'} "
                     f"| {r['train_gflops_per_crop']:,.1f} | {r['infer_gflops_per_crop']:,.1f} |")
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(prog="python -m maejax.models.report", description=__doc__.split("\n\n")[0])
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON list (default)")
    fmt.add_argument("--markdown", action="store_true", help="a markdown table")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--channels", type=int, default=6)
    args = parser.parse_args(argv)
    table = rows(args.height, args.width, args.channels)
    print(markdown(table) if args.markdown else json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
