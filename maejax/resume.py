"""Resuming a run with another config: what may change, what is refused, and how both configs are kept.

A resume compares the config with the one the checkpoint was written with. Keys of RESUME_SAFE (logging,
checkpoint cadence, parallelism, eval settings) may change; any other change (model, optimiser, schedule,
data, seed) is refused, naming every differing key, unless the trainer's `--accept_config_change`. After
any change `config.json` holds the new config, `config.<step>.json` the one the run had up to that step,
and the checkpoints' meta a `config_history` entry per change.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from maejax.checkpoint import Checkpoints, run_checkpoint_dir
from maejax.config import base

class ConfigChangeError(ValueError):
    """A resume with a config that changes what the checkpoint was trained with (see RESUME_SAFE)."""


# The config keys a run may change when it resumes, and why each is harmless: none changes the model, the
# optimiser state, the learning-rate schedule or the data stream. A key ending in "." covers its section.
# Every other key of maejax.config.base() is refused unless --accept_config_change; total_steps too (it
# stretches the learning-rate schedule), and so are data.workers (a grain state restores only with the same
# worker count) and data.streams (the streams' positions are per stream).
RESUME_SAFE = {
    "log_every": "how often metrics are logged",
    "log.": "where metrics are written",
    "ckpt_every": "how often checkpoints are saved",
    "keep_ckpts": "how many checkpoints are kept",
    "ckpt_dir": "where checkpoints are written (the run's checkpoint was found there)",
    "peak_tflops": "the MFU denominator",
    "xla_backend_optimization_level": "compiler effort",
    "mesh.": "parallelism: a restore reshards onto any mesh",
    "sharding_rules": "parallelism",
    "model.remat": "rematerialisation trades memory for compute, same maths",
    "model.attention": "the attention kernel, same maths",
    "eval.": "evaluation settings, unused by training",
}


def resume_safe(key: str) -> bool:
    return key in RESUME_SAFE or any(p.endswith(".") and key.startswith(p) for p in RESUME_SAFE)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every flattened key whose values differ. A key the saved config
    lacks counts only where the new value is not base()'s default (older runs lack newer keys); a key the
    new config lacks (gone from the code) does not count; data.dir compares as an absolute path."""
    old, cur = _flatten(saved), _flatten(new)
    default = _flatten(json.loads(base().to_json()))
    changes = []
    for key in sorted(cur):
        if key not in old:
            if key not in default or cur[key] != default[key]:
                changes.append((key, "<absent>", cur[key]))
        elif old[key] != cur[key] and not (key == "data.dir" and _same_path(old[key], cur[key])):
            changes.append((key, old[key], cur[key]))
    return changes


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _local_abspath(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _same_path(a: Any, b: Any) -> bool:
    return (isinstance(a, str) and isinstance(b, str) and "://" not in a + b
            and os.path.abspath(a) == os.path.abspath(b))


def _describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    def short(v):   # paths and names in full; long lists (sharding_rules) cut
        r = repr(v)
        return r if isinstance(v, str) or len(r) <= 80 else r[:77] + "..."
    return ", ".join(f"{k} {short(a)} -> {short(b)}" for k, a, b in changes)


def check_resume(config: ml_collections.ConfigDict, workdir: str, ckpts: Checkpoints | None, start: int,
                  accept: bool) -> tuple[dict[str, Any] | None, list[tuple[str, Any, Any]], list[str], list[dict]]:
    """The config the run had (its latest checkpoint's, else the config.json of a run whose checkpoints are
    elsewhere), the changes against it, the changed keys outside RESUME_SAFE, and the checkpoint's config
    history. Raises ConfigChangeError on a change outside RESUME_SAFE unless `accept`."""
    saved, source, forced, history = None, "", set(), []
    if start:
        meta = ckpts.meta(start)
        saved, history = meta.get("config"), list(meta.get("config_history", []))
        source = f"checkpoint step {start} in {ckpts.directory}"
    elif jax.process_count() == 1:   # (a multi-host job's workdirs may be per host: only the checkpoint counts)
        path = os.path.join(workdir, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            old_dir = _local_abspath(run_checkpoint_dir(workdir, old.get("ckpt_dir", "")))
            new_dir = _local_abspath(run_checkpoint_dir(workdir, config.ckpt_dir))
            if old_dir != new_dir:  # the run's checkpoints are elsewhere: this would silently start again
                saved, forced = old, {"ckpt_dir"}
                source = f"{path} (whose checkpoints are in {old_dir}; none in {new_dir}: it would start from step 0)"
    if saved is None:
        return None, [], [], history
    new = json.loads(config.to_json())
    changes = config_changes(saved, new)
    refused = [c for c in changes if c[0] in forced or not resume_safe(c[0])]
    if refused and not accept:
        allowed = [c for c in changes if c not in refused]
        also = f" (allowed changes: {_describe_changes(allowed)})" if allowed else ""
        raise ConfigChangeError(
            f"{workdir}: the config differs from the one of {source}: {_describe_changes(refused)}{also}; "
            f"resuming would mix two runs (model, optimiser, schedule or data): use a new --workdir, or pass "
            f"--accept_config_change to resume with the new values (config.json gets them, the old config is "
            f"kept as config.{start}.json)")
    return saved, changes, [k for k, _, _ in refused], history


def record_config(config: ml_collections.ConfigDict, workdir: str, start: int, saved: dict[str, Any] | None,
                   changes: list[tuple[str, Any, Any]], refused: list[str], history: list[dict]) -> None:
    """config.json <- the config this run trains with; after a change also config.<start>.json <- the one
    it had up to `start`, a config_history entry (carried in every later checkpoint's meta) and a line."""
    if changes:
        history.append({"step": start, "changes": {k: [a, b] for k, a, b in changes},
                        "accepted_with_flag": refused})
    if jax.process_index() != 0:
        return
    if changes:
        _write_json(os.path.join(workdir, f"config.{start}.json"), json.dumps(saved, indent=2))
    _write_json(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    if changes:
        how = "accepted with --accept_config_change" if history[-1]["accepted_with_flag"] else "all resume-safe"
        logging.info(f"Config changed at step {start} ({how}): {_describe_changes(changes)}; config.json holds "
                     f"the new config, config.{start}.json the previous one")


def _write_json(path: str, text: str) -> None:
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)
