"""Eval job: restore a checkpoint onto the devices that exist, embed every crop of a screen, and evaluate
every block (recall of known relationships and replicate consistency after batch correction, probe tasks).

  python -m eval.job --workdir runs/demo [--dataset DIR] [--out DIR] [--features KIND]
      [--tasks perturbation functional_group:split=perturbations qc experiment] [--config.eval.KEY=VALUE ...]

`mae` evaluates the run's latest checkpoint (in `<workdir>/checkpoints`, or the run's `ckpt_dir`);
`random_init` the same architecture with fresh weights (the untrained control); `handcrafted`
CellProfiler-grade features, no model (eval/cellprofiler.py: nuclei / cell segmentation, cp-measure
measurements, pycytominer-style selection; one crop per well); `handcrafted_fast` the fast per-image
statistics of eval/handcrafted.py, every crop; `oracle` the synthetic screen's true well parameters (the ceiling). The eval settings are `maejax.config.base().eval`, overlaid with
the run's own `eval` section and then with `--tasks` / `--annotations` / `--config.eval.KEY=VALUE` (e.g.
`--config.eval.probe_model=logistic --config.eval.groups=anax.csv`; `--eval KEY=VALUE ...`, its spelling
before, is deprecated). The model embeds under its run's sharding rules, data-parallel over every device.
Outputs go to `<out>` (default `<workdir>/eval/<features>`): report.json, embeddings.parquet, blocks.png,
similarity.png; the headline numbers (eval/..., at the checkpoint's step) and, for an autoencoder, a picture of
its reconstructions (masked input, reconstruction, target, per channel) go to the run's metric writers
(`log.writers` but the console, under `<out>`: metrics.jsonl and images/, tensorboard/, W&B).

What the map needs comes from the dataset and one set of defaults (docs/eval.md), checked before anything
is embedded: the control (`eval.control`, default: the manifest's `control_label`, else its `controls`,
i.e. the records marked is_control; other control labels are left out of the map), the batch columns
(`eval.batch_col`, `eval.pca_batch_col`: experiment | plate), PCA / correction / thresholds (EFAAR's:
128 components at most, TVN, (0.05, 0.95) and (0.1, 0.9), as `eval.map_benchmark`), the relationship
tables (`--annotations` / `eval.annotations`; default `<dataset>/annotations`, else the EFAAR 1.0 tables
of the installed efaar_benchmarking package: eval/annotations.py) and the channel count (the dataset's
channels go to the model as they are: a channel-agnostic model takes 1 to its `max_channels`, any other
exactly its `in_channels`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np
import pandas as pd
from flax import nnx

from eval import screen
from eval.annotations import find_annotations
from eval.embed import Embedder
from maejax import channels as channels_lib, config as config_lib, flags, metrics as metrics_lib
from maejax import sharding as shd, state as state_lib
from maejax.checkpoint import CheckpointMismatchError, Checkpoints, NoCheckpointError, run_checkpoint_dir
from maejax.input_pipeline import iterate_records

FEATURES = ("mae", "random_init", "handcrafted", "handcrafted_fast", "oracle")
MODEL_FEATURES = ("mae", "random_init")      # the kinds that run the run's model on the crops
BATCH_COLUMNS = ("experiment", "plate")      # well-level columns (eval.tasks.WELL_KEYS) a map batch can be


def embed_screen(model, config: ml_collections.ConfigDict, dataset_dir: str, batch_size: int,
                 settings: MapSettings | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Every crop of the dataset -> (N, blocks, D) pooled block features, plus crop metadata, with the model
    of the run `config` (its sharding rules; crops normalised as it was trained, `data.normalize`, with
    plate statistics of this dataset), given the channels `settings` chose (`check_channels`; None: all)."""
    from maejax.input_pipeline import open_dataset
    from maejax.preprocess import plate_statistics
    rules = shd.rules_from_config(config.sharding_rules)
    dataset = open_dataset(dataset_dir)
    normalize = config.data.normalize
    stats = plate_statistics(dataset) if normalize == "plate" else None
    embedder = Embedder(model, shd.batch_mesh(rules), batch_size, rules, keys=("blocks",), normalize=normalize,
                        plate_stats=stats, channels=settings and settings.channel_index,
                        channel_ids=settings and settings.channel_ids)
    feats, meta = embedder.embed_batches(iterate_records(dataset, embedder.batch_size))
    return feats["blocks"], meta


def handcrafted_fast_screen(dataset_dir: str, batch_size: int = 256) -> tuple[np.ndarray, pd.DataFrame]:
    from eval.handcrafted import handcrafted_features
    feats, metas = [], []
    for images, meta in iterate_records(dataset_dir, batch_size):
        feats.append(handcrafted_features(images)[0])
        metas.append(meta)
    return np.concatenate(feats), pd.concat(metas, ignore_index=True)


def features_for(kind: str, workdir: str, dataset_dir: str | None, batch_size: int | None, *, model=None,
                 settings: MapSettings | None = None):
    """(features, metadata, config, dataset_dir, step) for one of FEATURES; the kinds that run a model
    run `model` where given (`features_model`'s), else load it, on the channels of `settings`."""
    if kind not in FEATURES:
        raise ValueError(f"features={kind!r}: choose one of {FEATURES}")
    ckpt_dir = run_checkpoint_dir(workdir)
    ckpts = Checkpoints(ckpt_dir)
    step = ckpts.step()
    config = config_lib.complete(ckpts.meta(step)["config"])
    ckpts.close()
    dataset_dir = dataset_dir or config.data.dir
    batch_size = batch_size or config.eval.batch_size
    if kind == "handcrafted_fast":
        feats, meta = handcrafted_fast_screen(dataset_dir)
        return feats, meta, config, dataset_dir, step
    if kind == "handcrafted":
        from eval.cellprofiler import cellprofiler_screen
        feats, meta, _ = cellprofiler_screen(dataset_dir)
        return feats, meta, config, dataset_dir, step
    if kind == "oracle":
        from eval.oracle import oracle_screen
        feats, meta = oracle_screen(dataset_dir)
        return feats, meta, config, dataset_dir, step
    if model is None:
        model = features_model(kind, config, ckpt_dir, step)
    feats, meta = embed_screen(model, config, dataset_dir, batch_size, settings)
    return feats, meta, config, dataset_dir, step


def features_model(kind: str, config: ml_collections.ConfigDict, ckpt_dir: str, step: int):
    """The model a MODEL_FEATURES kind runs: `mae` the checkpoint's, `random_init` the same architecture
    with fresh weights."""
    if kind == "mae":
        return state_lib.load_model(ckpt_dir, step=step)[0]
    rules = shd.rules_from_config(config.sharding_rules)
    mesh = shd.batch_mesh(rules)
    sharded = state_lib.abstract(config.model, mesh, rules, seed=config.seed + 1)
    fresh = state_lib.initialize(config.model, mesh, rules, sharded, seed=config.seed + 1)
    with shd.activate(mesh, rules):
        return nnx.merge(sharded.model_def, fresh)


class AnnotationError(ValueError):
    """The relationship tables cannot give a recall for this dataset (eval.recall's one-line message)."""


class EvalSetupError(ValueError):
    """The dataset and the eval settings do not fit (no dataset, no control, a batch column or channel count
    the map or the model cannot take): one line naming the key, the value and what to do."""


@dataclasses.dataclass(frozen=True)
class MapSettings:
    """What one dataset's maps are built with (resolved from the eval config and the dataset's manifest)."""
    control: str                 # the map's control label (correction fitted on these wells)
    drop: tuple[str, ...]        # the dataset's other control labels, left out of the map
    batch_col: str
    pca_batch_col: str | None    # None: batch_col
    annotations: str             # the relationship-table folder
    channels: tuple[str, ...]    # the channels the model gets, in order (eval.channels; default the dataset's)
    channel_index: tuple[int, ...]   # their indices among the dataset's channels
    channel_ids: tuple[int, ...]     # their ids in the run's channel vocabulary (positions without one)


def dataset_controls(manifest: dict[str, Any], control: str, where: str) -> tuple[str, tuple[str, ...]]:
    """(the map's control label, the dataset's other control labels). `control` "" takes the manifest's
    `control_label`, else its `controls` (the labels of records marked is_control), in the order of the
    builder's `control_labels` where it lists them."""
    listed = [str(c) for c in manifest.get("controls") or []]
    perturbations = {str(p) for p in manifest.get("perturbations") or []}
    if control:
        if control not in perturbations:
            raise EvalSetupError(f"eval.control={control!r} is not a perturbation of {where} (its manifest's controls: "
                                 f"{listed or 'none'}); pass --config.eval.control=LABEL with a control of this dataset, "
                                 f"or --config.eval.control= to take the manifest's")
        return control, tuple(c for c in listed if c != control)
    label = str(manifest.get("control_label") or "")
    if label in perturbations:
        return label, tuple(c for c in listed if c != label)
    if not listed:
        raise EvalSetupError(f"{where}/manifest.json lists no controls (no record is marked is_control), and the map "
                             f"is corrected on control wells; pass --config.eval.control=LABEL naming the control "
                             f"perturbation, or rebuild the dataset with its control labels")
    order = [str(c) for src in manifest.get("sources") or [] if isinstance(src, dict)
             for c in src.get("control_labels") or []]
    ranked = sorted(listed, key=lambda c: (order.index(c) if c in order else len(order), c))
    return ranked[0], tuple(ranked[1:])


def check_channels(model_cfg: Any, vocabulary: str | None, names: list[str], wanted: str, dataset_dir: str,
                   workdir: str) -> tuple[list[int], list[int]]:
    """Which of the dataset's channels (`names`) go to the model, in which order, with their vocabulary ids:
    (indices into `names`, ids). `vocabulary`: the run's channel vocabulary (its checkpoint's meta
    `channels`; None for a run from before vocabularies or a converted model: ids are positions).
    `wanted` (eval.channels): "" = the dataset's channels, or names. A channel-agnostic model (ca_mae) takes
    any 1 to max_channels of them in any order; any other model exactly its training channels, found by name
    in whatever order the dataset has them (without a vocabulary: the dataset's as stored, in_channels of
    them). EvalSetupError otherwise, naming the dataset, the channels and the key."""
    name, in_channels = model_cfg.name, int(model_cfg.in_channels)
    vocab = channels_lib.parse(vocabulary) if vocabulary else None
    fixed = vocab.labels if vocab is not None and name != "ca_mae" else None
    try:
        indices, ids = channels_lib.select(vocab, names, wanted, dataset_dir, fixed=fixed)
    except channels_lib.ChannelError as e:
        raise EvalSetupError(str(e)) from None
    given = f"{dataset_dir} has {len(names)} channels ({', '.join(names)})" if not wanted else (
        f"eval.channels={wanted!r} gives {len(indices)} channels")
    if name == "ca_mae":
        limit = int(model_cfg.max_channels or in_channels)
        if not 1 <= len(indices) <= limit:
            raise EvalSetupError(f"{given}; the channel-agnostic model of {workdir} takes 1 to {limit} "
                                 f"(model.max_channels): evaluate it on at most {limit} channels (--config.eval."
                                 f"channels=NAMES picks them)")
        if vocab is not None and max(ids) >= in_channels:
            raise EvalSetupError(f"{given}; the channel ids {ids} do not fit the {in_channels} channels the "
                                 f"channel-agnostic model of {workdir} was built for (model.in_channels)")
    elif len(indices) != in_channels:
        raise EvalSetupError(f"{given}; the {name} model of {workdir} takes exactly {in_channels} "
                             f"(model.in_channels): evaluate it on a dataset of its channels, or use a "
                             f"channel-agnostic model (model.name=ca_mae)")
    return indices, ids


def map_settings(e: ml_collections.ConfigDict, manifest: dict[str, Any], dataset_dir: str) -> MapSettings:
    """Control, batch columns, tables and channel count of one dataset's maps (EvalSetupError /
    annotations.AnnotationsNotFound when they cannot be had)."""
    for key in ("batch_col", "pca_batch_col"):
        value = e[key]
        if (value or key == "batch_col") and value not in BATCH_COLUMNS:
            raise EvalSetupError(f"eval.{key}={value!r}: a map batch is one of {list(BATCH_COLUMNS)} (columns every "
                                 f"well has); pass --config.eval.{key}=experiment or plate")
    control, drop = dataset_controls(manifest, e.control, dataset_dir)
    return MapSettings(control=control, drop=drop, batch_col=e.batch_col, pca_batch_col=e.pca_batch_col or None,
                       annotations=find_annotations(e.annotations, dataset_dir),
                       channels=tuple(manifest["channels"]), channel_index=tuple(range(len(manifest["channels"]))),
                       channel_ids=tuple(range(len(manifest["channels"]))))


def check_annotations(workdir: str, dataset_dir: str | None, overrides: dict[str, Any] | None = None,
                      kind: str = "mae") -> MapSettings | None:
    """Reads the dataset's manifest and perturbations (its metadata, no image), resolves the map's settings
    (`map_settings`), checks that the model takes the dataset's channels (kinds that run the model) and
    checks the relationship tables against the perturbations as the map will (eval.recall): a missing or
    empty folder, a table with another header or no pair, no table gene in the screen. Raises
    AnnotationError naming the folder or table, EvalSetupError naming the key; None when the run has no
    checkpoint (features_for says so)."""
    from eval import recall
    from maejax.input_pipeline import open_dataset
    ckpts = Checkpoints(run_checkpoint_dir(workdir))
    step = ckpts.latest_step()
    meta = ckpts.meta(step) if step is not None else None
    ckpts.close()
    if meta is None:
        return None   # features_for says there is no checkpoint
    config = config_lib.complete(meta["config"])
    dataset_dir = dataset_dir or config.data.dir
    if not dataset_dir:
        what = "a converted model" if meta.get("converted_from") else "data.dir is empty"
        raise EvalSetupError(f"{workdir}: its config names no dataset ({what}); pass --dataset DIR")
    e = eval_config(config.eval, overrides)
    try:
        eval_writers(config)   # the metric writers: an unknown one, or wandb not installed, stops here
    except metrics_lib.WriterError as err:
        raise EvalSetupError(str(err)) from None
    try:
        dataset = open_dataset(dataset_dir)
    except (OSError, ValueError) as err:    # no manifest, a damaged shard or table: the reader's one line
        raise EvalSetupError(str(err)) from err
    try:
        settings = map_settings(e, dataset.manifest, dataset_dir)
    except ValueError as err:     # annotations.AnnotationsNotFound
        if isinstance(err, EvalSetupError):
            raise
        raise AnnotationError(str(err)) from err
    if kind in MODEL_FEATURES:
        index, ids = check_channels(config.model, meta.get("channels"), dataset.channels, e.channels, dataset_dir,
                                    workdir)
        settings = dataclasses.replace(settings, channels=tuple(dataset.channels[i] for i in index),
                                       channel_index=tuple(index), channel_ids=tuple(ids))
    genes = dataset.metadata["perturbation"].astype(str).unique()
    left_out = {settings.control, *settings.drop}
    try:
        recall.known_pair_positions(sorted(g for g in genes if g not in left_out), settings.annotations)
    except ValueError as err:
        raise AnnotationError(str(err)) from err
    return settings


def eval_config(stored: ml_collections.ConfigDict, overrides: dict[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """base().eval overlaid with a run's stored eval section (older runs lack newer keys) and then with
    {key: value} overrides (keys of the eval section); unknown keys are errors that name them."""
    cfg = config_lib.complete(stored, "eval")
    for key, value in (overrides or {}).items():
        config_lib.override(cfg, key, value)
    return cfg


def negative_controls(source: str, dataset_dir: str) -> list[str] | None:
    """The consistency null's perturbations: `ground_truth` (the synthetic screen's null genes; random
    groups when the dataset has no ground truth), `random` (random groups: None), or a file of names."""
    if source == "random":
        return None
    if source == "ground_truth":
        path = os.path.join(dataset_dir, "ground_truth.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f).get("null_genes") or None
    if not os.path.isfile(source):
        raise ValueError(f"eval.negative_controls={source!r}: not ground_truth, random or an existing file")
    with open(source) as f:
        return [line.strip() for line in f if line.strip()]


def gene_families(dataset_dir: str) -> dict[str, str] | None:
    """gene -> phenotype family from a synthetic screen's ground_truth.json (None elsewhere)."""
    path = os.path.join(dataset_dir, "ground_truth.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        genes = json.load(f).get("genes", {})
    families = {g: v["family"] for g, v in genes.items() if v.get("family")}
    return families or None


def evaluate(kind: str, workdir: str, *, dataset_dir: str | None = None, out_dir: str | None = None,
             batch_size: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embeds and evaluates one of FEATURES; writes the outputs and returns the report (with in-memory
    arrays under keys starting with '_'; `screen.public` drops them)."""
    t0 = time.time()
    # a bad table, no control, a channel count the model cannot take: fails here, before the embedding
    settings = check_annotations(workdir, dataset_dir, overrides, kind=kind)
    model = None
    if kind in MODEL_FEATURES:   # loaded here: it embeds the screen, then draws its reconstructions
        ckpts = Checkpoints(run_checkpoint_dir(workdir))
        step = ckpts.step()
        stored = config_lib.complete(ckpts.meta(step)["config"])
        ckpts.close()
        model = features_model(kind, stored, run_checkpoint_dir(workdir), step)
    feats, meta, config, dataset_dir, step = features_for(kind, workdir, dataset_dir, batch_size, model=model,
                                                          settings=settings)
    t_embed = time.time() - t0
    e = eval_config(config.eval, overrides)
    report = screen.evaluate_blocks(
        feats, meta, settings.annotations, control=settings.control, drop=list(settings.drop),
        batch_col=settings.batch_col, pca_batch_col=settings.pca_batch_col,
        pca_components=e.pca_components, correction=e.correction,
        thresholds=[tuple(t) for t in e.thresholds], tasks=list(e.tasks) if e.probe else [],
        select_by=e.select_by, groups=e.groups, dataset_dir=dataset_dir, probe_model=e.probe_model,
        split_fractions=list(e.split_fractions), negative_controls=negative_controls(e.negative_controls, dataset_dir),
        seed=config.seed, families=gene_families(dataset_dir), n_boot=e.n_boot,
        mean_average_precision=e.mean_average_precision)
    report.update(features=kind, checkpoint_step=step if kind == "mae" else None, dataset=dataset_dir,
                  embed_seconds=t_embed, eval_seconds=time.time() - t0 - t_embed, eval_config=e.to_dict(),
                  map_settings={**dataclasses.asdict(settings), "drop": list(settings.drop)})
    out_dir = out_dir or os.path.join(workdir, "eval", kind)
    report["outputs"] = screen.write_outputs(report, out_dir, title=f"{kind} ({config.model.variant})")
    write_metrics(report, config, out_dir, step, model=model, dataset_dir=dataset_dir, settings=settings)
    return report


def eval_writers(config: ml_collections.ConfigDict) -> str:
    """The run's metric writers (`log.writers`) for its evals: all but the console (the job prints its
    summary)."""
    return ",".join(n for n in metrics_lib.writer_names(config.log.writers) if n != "console")


def eval_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers at the chosen block, named eval/...: the block, each mean recall, the
    replicate consistency (KS, CvM), the mAPs (activity, consistency) and every probe task's test score."""
    best = report["best"]
    out: dict[str, Any] = {"eval/best_block": report["best_block"]}
    out.update({f"eval/{k}": v for k, v in best["recall_mean"].items()})
    rc = best["consistency"]["replicate_consistency"]
    out.update({"eval/replicate_ks": rc.get("ks_statistic"), "eval/replicate_cvm": rc.get("cvm_statistic")})
    for part, m in (best.get("mean_average_precision") or {}).items():
        if isinstance(m, dict) and part in ("activity", "consistency"):
            out[f"eval/map_{part}"] = m.get("mean_average_precision")
            out[f"eval/map_{part}_fraction_retrieved"] = m.get("fraction_retrieved")
    out.update({f"eval/{name}_test": t["best_block_test"] for name, t in report["tasks"].items()
                if "best_block_test" in t})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float, np.number)) and np.isfinite(v)}


def write_metrics(report: dict[str, Any], config: ml_collections.ConfigDict, out_dir: str, step: int, *,
                  model=None, dataset_dir: str | None = None, settings: MapSettings | None = None) -> None:
    """`eval_scalars` at the checkpoint's step, and for an autoencoder a picture of its reconstructions
    (masked input, reconstruction, target, per channel: eval/reconstruction.py; the channels `settings`
    chose) as eval/reconstruction, to the run's writers (`eval_writers`) under `out_dir`."""
    spec = eval_writers(config)
    if not spec:
        return
    writer = metrics_lib.create_writer(spec, out_dir, run_config=config.to_dict())
    try:
        writer.write_scalars(step, eval_scalars(report))
        # an encoder without a decoder (e.g. converted OpenPhenom weights: model.decoder_depth=0) embeds but does
        # not reconstruct: no picture for it
        if model is not None and dataset_dir and int(config.model.get("decoder_depth", 1)) > 0:
            from eval.reconstruction import reconstruction_picture
            from maejax.input_pipeline import open_dataset
            image = reconstruction_picture(
                model, open_dataset(dataset_dir), config.data.normalize, int(config.data.crop_size),
                seed=int(config.seed), channels=settings and settings.channel_index,
                channel_ids=settings and settings.channel_ids)
            if image is not None:
                writer.write_images(step, {"eval/reconstruction": image})
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> None:
    argv, eval_overrides = config_lib.parse_override_flags(sys.argv[1:] if argv is None else argv, only="eval")
    ap = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, metavar="DIR",
                    help="training run directory (its config.json says where the checkpoints are)")
    ap.add_argument("--dataset", default=None, metavar="DIR",
                    help="dataset directory (default: the one it was trained on)")
    ap.add_argument("--annotations", default=None, metavar="DIR",
                    help="relationship tables <Source>.txt (default: eval.annotations; '' = <dataset>/annotations, "
                         "else the EFAAR 1.0 tables of the installed efaar_benchmarking package)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <workdir>/eval/<features>)")
    ap.add_argument("--features", default="mae", choices=FEATURES)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--tasks", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help="probe tasks (eval/tasks.py); default: the run's eval.tasks")
    ap.add_argument("--eval", nargs="+", default=[], help=argparse.SUPPRESS)   # deprecated: --config.eval.KEY=VALUE
    a = ap.parse_args(argv)
    ckpt_dir = run_checkpoint_dir(a.workdir)
    if "://" not in ckpt_dir and not os.path.isdir(ckpt_dir):
        raise SystemExit(f"NoCheckpointError: {NoCheckpointError(ckpt_dir)}")
    if a.eval:
        config_lib.deprecated_flag("--eval KEY=VALUE", "--config.eval.KEY=VALUE")
        eval_overrides = {**config_lib.parse_override_flags([f"--config.eval.{kv}" for kv in a.eval])[1],
                          **eval_overrides}
    overrides = {key.removeprefix("eval."): value for key, value in eval_overrides.items()}
    if a.tasks:
        overrides["tasks"] = a.tasks
    if a.annotations is not None:
        overrides["annotations"] = a.annotations
    try:
        report = evaluate(a.features, a.workdir, dataset_dir=a.dataset, out_dir=a.out, batch_size=a.batch_size,
                          overrides=overrides)
    except (CheckpointMismatchError, NoCheckpointError, AnnotationError, EvalSetupError) as e:   # one line
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summary(report))
    print(f"outputs in {os.path.dirname(report['outputs']['report'])}")


def summary(report: dict[str, Any]) -> str:
    """A few lines: the chosen block's recall and consistency, and every probe task at its best block."""
    best = report["best"]
    rc = best["consistency"]["replicate_consistency"]
    lines = [f"{report['features']}: block {report['best_block']}/{len(report['blocks'])} "
             f"({report['selected_by']}); mean recall {best['recall_mean']}; "
             f"KS {rc['ks_statistic']:.3f}, CvM {rc['cvm_statistic']:.2f}"]
    ms = report.get("map_settings")
    if ms:
        dropped = f" (left out: {', '.join(ms['drop'])})" if ms["drop"] else ""
        lines.append(f"  map: {len(ms['channels'])} channels ({', '.join(ms['channels'])}), control "
                     f"{ms['control']}{dropped}, batches {ms['batch_col']}, "
                     f"PCA up to {report['pca_components']}, {report['correction']}, tables {ms['annotations']}")
    for name, t in report["tasks"].items():
        if "skipped" in t:
            lines.append(f"  {name}: skipped ({t['skipped']})")
        else:
            note = "" if t["higher_is_better"] else ", lower is better"
            lines.append(f"  {name}: test balanced accuracy {t['best_block_test']:.3f} at block {t['best_block']} "
                         f"(chance {t['chance']:.3f}{note}); at the chosen block "
                         f"{t['test'][report['best_block'] - 1]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
