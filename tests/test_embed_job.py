"""The screen-scale embed job (`python -m eval.embed_job`) with the tiny mu/8 MAE on 256 tiny crops in 8 output
shards, against one uninterrupted one-process run in this process (4 CPU devices):

- two processes over loopback (4 devices each), killed with SIGKILL after their first shards and rerun
  over a killed writer's leftovers (a temporary file, a shard with one block's file renamed and not the
  other's), write the same parquet rows, each record once, finished shards not redone;
- a SIGTERM stops the job after the shard in hand with status 75 (maejax.train.PREEMPTED_EXIT_CODE); the
  rerun finishes it with the same rows;
- the wells tables are read by `eval.map_benchmark`'s loader as they are and equal the crop rows' well means;
- a resume with another shard size is refused, naming what differs; a finished job run again embeds nothing;
- `eval.embed_arrays` writes the same kind of parquet tables (one per block, metadata beside the features).

The runs share a persistent compilation cache, so only the first run of each program pays the compile.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tests import tiny_training as tt

SHARD, BATCH, RECORDS = 32, 16, 256
ARGS = ["--shard_size", str(SHARD), "--batch_size", str(BATCH)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset and a tiny model's step-0 checkpoint in a run directory (random parameters: no training)."""
    from maejax.convert import save_converted
    from tests.random_params import random_model
    root = tmp_path_factory.mktemp("embed")
    dataset = tt.write_tiny_dataset(root / "dataset", num_records=RECORDS)
    config = tt.tiny_config(dataset, **{"data.normalize": "plate"})   # each crop by its plate's statistics
    save_converted(str(root / "run" / "checkpoints"), random_model(config.model),
                   {"config": json.loads(config.to_json()), "step": 0})
    env = dict(JAX_COMPILATION_CACHE_DIR=root / "jax-cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
    return root, env


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted process with 4 devices."""
    import jax

    from eval.embed_job import embed_dataset
    root, _ = setup
    summary = embed_dataset(str(root / "run"), str(root / "dataset"), str(root / "reference"), shard_size=SHARD,
                            batch_size=BATCH, devices=jax.devices()[:4], progress=False)
    assert not summary["preempted"] and summary["skipped"] == 0 and summary["shards"] == RECORDS // SHARD
    return root / "reference"


def start(setup, out, *, processes=1, devices=4, log=None):
    """The embed job CLI in `processes` processes (joined over loopback when more than one)."""
    root, env = setup
    cmd = [sys.executable, "-m", "eval.embed_job", "--workdir", str(root / "run"), "--dataset",
           str(root / "dataset"), "--out", str(out), *ARGS]
    port = tt.free_port()
    procs = []
    for i in range(processes):
        extra = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=processes,
                     JAX_PROCESS_ID=i) if processes > 1 else env
        logfile = open(f"{log or out}.{i}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=tt.REPO, env=tt.subprocess_env(devices, **extra), stdout=logfile,
                                      stderr=subprocess.STDOUT))
    return procs


def finish(procs, out, rc=0, timeout=300):
    for i, p in enumerate(procs):
        assert p.wait(timeout=timeout) == rc, open(f"{out}.{i}.log").read()[-3000:]


def tables(out):
    """{relative path: DataFrame} of every crops dataset and wells file."""
    found = {}
    for kind in ("crops", "wells"):
        for name in sorted(os.listdir(out / kind)):
            found[f"{kind}/{name}"] = pd.read_parquet(out / kind / name)
    return found


def assert_same_rows(got_dir, want_dir, rtol=1e-6, atol=1e-6):
    got, want = tables(got_dir), tables(want_dir)
    assert sorted(got) == sorted(want) == ["crops/block_01", "crops/block_02", "wells/block_01.parquet",
                                           "wells/block_02.parquet"]
    for name, w in want.items():
        g = got[name]
        feats = [c for c in w.columns if c.startswith("feature_")]
        assert list(g.columns) == list(w.columns)
        pd.testing.assert_frame_equal(g.drop(columns=feats), w.drop(columns=feats))
        np.testing.assert_allclose(g[feats].to_numpy(), w[feats].to_numpy(), rtol=rtol, atol=atol, err_msg=name)
        if name.startswith("crops"):   # each record once, in order
            assert g["record_id"].tolist() == list(range(RECORDS))


def test_reference_layout_and_map_benchmark_reads_the_wells_tables(setup, reference):
    from eval.embeddings import read_features
    from eval.map_benchmark import load_embeddings
    spec = json.loads((reference / "embed.json").read_text())
    assert spec["complete"] and spec["blocks"] == [1, 2] and spec["num_shards"] == RECORDS // SHARD
    parts = sorted(os.listdir(reference / "crops" / "block_01"))
    assert parts == [f"part-{s:05d}.parquet" for s in range(RECORDS // SHARD)]
    crops = pd.read_parquet(reference / "crops" / "block_02")
    feats, meta = read_features(str(reference / "crops" / "block_02"))
    assert feats.dtype == np.float32 and feats.shape == (RECORDS, spec["dim"])
    assert meta["record_id"].tolist() == list(range(RECORDS))
    assert {"record_id", "experiment", "plate", "well", "site", "tile", "perturbation", "is_control", "label",
            "well_id"} <= set(crops.columns)
    dim = spec["dim"]
    feats, meta, cols = load_embeddings(str(reference / "wells" / "block_02.parquet"))
    assert feats.shape == (8, dim) and cols == [f"feature_{i}" for i in range(dim)]
    assert meta["n_crops"].tolist() == [RECORDS // 8] * 8
    # A well's row is the mean of its crop rows (the partial means of 8 shards combined).
    crop_feats = crops[cols].to_numpy(np.float64)
    means = pd.DataFrame(crop_feats).groupby(crops["well_id"].to_numpy(), sort=False).mean()
    np.testing.assert_allclose(feats, means.loc[meta["well_id"]].to_numpy(), rtol=1e-5, atol=1e-6)
    assert set(meta["perturbation"]) == {"non-targeting", "g1", "g2", "g3"}
    # The crop dataset is read by the same loader once in one file, and averages like the wells table.
    one_file = setup[0] / "crops_block_02.parquet"
    crops.to_parquet(one_file)
    avg, avg_meta, _ = load_embeddings(str(one_file), average_by="well_id")
    np.testing.assert_allclose(avg, means.loc[avg_meta["well_id"]].to_numpy(), rtol=1e-5, atol=1e-6)


def test_two_processes_killed_and_resumed_equal_one_process(setup, reference):
    out = setup[0] / "two-processes"
    procs = start(setup, out, processes=2)
    first = out / "crops" / "block_02" / "part-00000.parquet"
    deadline = time.time() + 120
    while not first.exists():
        assert procs[0].poll() is None and time.time() < deadline, open(f"{out}.0.log").read()[-3000:]
        time.sleep(0.01)
    for p in procs:   # the whole job dies (a lost allocation): no process finishes its shard
        p.kill()
    for p in procs:
        p.wait()
    done = len(os.listdir(out / "crops" / "block_01"))
    assert 0 < done < RECORDS // SHARD and not (out / "wells").exists()
    # What a kill in the middle of a shard's writes leaves: a temporary file, and a shard whose block 1 file
    # was renamed but not its block 2 file (its crop rows would be duplicated if the shard counted as done).
    (out / "crops" / "block_01" / ".part-00007.parquet.tmp-12345").write_bytes(b"half a file")
    os.remove(out / "partial" / "block_02" / "part-00000.parquet")
    done = int(sum(all((out / k / f"block_0{b}" / f"part-{s:05d}.parquet").exists()
                       for k in ("crops", "partial") for b in (1, 2)) for s in range(RECORDS // SHARD)))
    procs = start(setup, out, processes=2, log=f"{out}-resume")
    finish(procs, f"{out}-resume")
    assert f"{done} done, {RECORDS // SHARD - done} to do on 2 process(es)" in open(f"{out}-resume.0.log").read()
    assert "ETA" in open(f"{out}-resume.1.log").read()      # every process shows its progress
    assert not [n for n in os.listdir(out / "crops" / "block_01") if n.startswith(".")]
    assert_same_rows(out, reference)


def test_sigterm_stops_after_the_shard_in_hand_with_status_75_and_the_rerun_finishes(setup, reference,
                                                                                    monkeypatch, capsys):
    from eval import embed_job
    from maejax.train import PREEMPTED_EXIT_CODE
    out = setup[0] / "sigterm"
    embed_shard = embed_job._embed_shard

    def preempted_during_the_first_shard(*args):
        os.kill(os.getpid(), signal.SIGTERM)   # handled by the job's handler: it finishes this shard and stops
        monkeypatch.setattr(embed_job, "_embed_shard", embed_shard)
        return embed_shard(*args)

    monkeypatch.setattr(embed_job, "_embed_shard", preempted_during_the_first_shard)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--workdir", str(setup[0] / "run"), "--out", str(out), *ARGS]
    assert embed_job.main(argv) == PREEMPTED_EXIT_CODE
    assert "Preemption notice: stopped after round 1 of 8; 1 of 8 shards are done" in capsys.readouterr().out
    assert sorted(os.listdir(out / "crops" / "block_02")) == ["part-00000.parquet"]
    assert signal.getsignal(signal.SIGTERM) is before   # the job's handler is gone again
    assert embed_job.main(argv) == 0
    assert "1 done, 7 to do on 1 process(es)" in capsys.readouterr().out
    assert_same_rows(out, reference)


def test_a_resume_of_another_job_is_refused(setup, reference):
    from eval import embed_job
    with pytest.raises(embed_job.EmbedJobError, match=r"shard_size 32 there, 16 now"):
        embed_job.embed_dataset(str(setup[0] / "run"), str(setup[0] / "dataset"), str(reference), shard_size=16,
                                progress=False)
    # The same job again: nothing to embed, the wells tables written again from the partial means.
    summary = embed_job.embed_dataset(str(setup[0] / "run"), None, str(reference), shard_size=SHARD, progress=False)
    assert summary["skipped"] == RECORDS // SHARD and not summary["preempted"]
    with pytest.raises(embed_job.EmbedJobError, match=r"--blocks '3': the model has blocks 1..2"):
        embed_job.parse_blocks("3", 2)
    assert embed_job.parse_blocks("all", 3) == [1, 2, 3] and embed_job.parse_blocks("2,1", 3) == [1, 2]


def test_embed_arrays_writes_parquet_tables_per_block(setup, tmp_path, monkeypatch, capsys):
    from eval import embed_arrays
    from eval.map_benchmark import load_embeddings
    from maejax.convert import save_converted
    from maejax.input_pipeline import open_dataset
    from tests.random_params import random_model
    config = tt.tiny_config(setup[0] / "dataset", **{"data.normalize": "crop"})   # embed_arrays: per crop
    save_converted(str(tmp_path / "ckpt"), random_model(config.model), {"config": json.loads(config.to_json())})
    ds = open_dataset(setup[0] / "dataset")
    np.save(tmp_path / "images.npy", ds.reader.read_many(np.arange(12)))
    ds.metadata.iloc[:12][["well", "perturbation"]].to_csv(tmp_path / "meta.csv", index=False)
    outputs = embed_arrays.embed_arrays(str(tmp_path / "ckpt"), np.load(tmp_path / "images.npy"))
    assert outputs["blockwise_meanpool"].shape[:2] == (12, 2)
    # The command line, on these outputs (computed once above).
    monkeypatch.setattr(embed_arrays, "embed_arrays", lambda *a, **k: outputs)
    embed_arrays.main(["--workdir", str(tmp_path / "ckpt"), "--images", str(tmp_path / "images.npy"),
                       "--out", str(tmp_path / "tables"), "--metadata", str(tmp_path / "meta.csv")])
    assert ("5 parquet tables (predict.parquet, forward_head.parquet, cls.parquet, block_01.parquet, "
            "block_02.parquet); not defined by this model: channelwise") in capsys.readouterr().out
    for name, want in [("predict", outputs["predict"]), ("forward_head", outputs["forward_head"]),
                       ("block_01", outputs["blockwise_meanpool"][:, 0]),
                       ("block_02", outputs["blockwise_meanpool"][:, 1])]:
        feats, meta, _ = load_embeddings(str(tmp_path / "tables" / f"{name}.parquet"))
        np.testing.assert_array_equal(feats, want)
        assert list(meta.columns) == ["image_index", "well", "perturbation"]
        assert meta["image_index"].tolist() == list(range(12))
        assert meta["well"].tolist() == ds.metadata["well"].iloc[:12].tolist()
    ds.metadata.iloc[:5].to_csv(tmp_path / "five.csv", index=False)
    with pytest.raises(ValueError, match="5 rows, the images are 12"):
        embed_arrays.load_metadata(str(tmp_path / "five.csv"), 12)
