"""The grain training stream and the ordered eval reader over a tiny synthetic screen."""
from __future__ import annotations

import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data.synthetic_screen import generate_screen
from maejax import records
from maejax.input_pipeline import iterate_records, make_train_iterator, open_dataset
from maejax.preprocess import self_standardize

# The tiny preset's records are 32x32; training crops of 24 exercise the random crop.
TRAIN = dict(batch_size=8, crop_size=24, seed=3, process_index=0, process_count=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return open_dataset(generate_screen(tmp_path_factory.mktemp("pipeline") / "tiny", preset="tiny", seed=1))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


DIHEDRAL = [lambda x, k=k, f=f: np.rot90(x[:, :, ::-1] if f else x, k, axes=(1, 2))
            for k in range(4) for f in (False, True)]


def matching_transforms(example, record, crop):
    """(y, x, dihedral index) of every window + transform of `record` that gives `example`."""
    _, h, w = record.shape
    return [(y, x, t) for y in range(h - crop + 1) for x in range(w - crop + 1)
            for t, transform in enumerate(DIHEDRAL)
            if np.allclose(self_standardize(transform(record[:, y:y + crop, x:x + crop])), example, atol=1e-5)]


def test_batch_contents(dataset):
    batch = next(make_train_iterator(dataset, **TRAIN))
    assert batch["image"].shape == (8, 6, 24, 24) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["is_control"].dtype == bool
    assert batch["record_id"].dtype == np.int64
    rows = dataset.metadata.loc[batch["record_id"]]
    np.testing.assert_array_equal(batch["label"], rows.label)
    np.testing.assert_array_equal(batch["is_control"], rows.is_control)
    assert [dataset.perturbations[i] for i in batch["label"]] == rows.perturbation.tolist()
    np.testing.assert_allclose(batch["image"].mean(axis=(2, 3)), 0, atol=1e-4)  # self-standardised
    np.testing.assert_allclose(batch["image"].std(axis=(2, 3)), 1, atol=1e-2)

    transforms = set()
    for example, record_id in zip(batch["image"], batch["record_id"]):
        matches = matching_transforms(example, dataset.reader.read(record_id), 24)
        assert matches, f"record {record_id}: example is no crop + flip/rotation of its record"
        transforms.add(matches[0][2])
    assert len(transforms) > 1  # the flips and rotations do happen


def test_augmentation_switches(dataset):
    plain = next(make_train_iterator(dataset, **TRAIN, flip=False, rot90=False))
    for example, record_id in zip(plain["image"], plain["record_id"]):
        assert any(t == 0 for *_, t in matching_transforms(example, dataset.reader.read(record_id), 24))
    # Switching augmentations off keeps the same records and crop positions.
    augmented = next(make_train_iterator(dataset, **TRAIN))
    np.testing.assert_array_equal(plain["record_id"], augmented["record_id"])

    full = next(make_train_iterator(dataset, **{**TRAIN, "crop_size": 32}, flip=False, rot90=False))
    expected = self_standardize(dataset.reader.read_many(full["record_id"]))
    np.testing.assert_allclose(full["image"], expected, atol=1e-6)  # crop == record: a no-op


def test_seeded_and_reproducible(dataset):
    first = take(make_train_iterator(dataset, **TRAIN), 3)
    assert_same_batches(first, take(make_train_iterator(dataset, **TRAIN), 3))
    other = next(make_train_iterator(dataset, **{**TRAIN, "seed": 4}))
    assert not np.array_equal(other["record_id"], first[0]["record_id"])


def test_epochs(dataset):
    n = len(dataset)
    one = np.concatenate([b["record_id"] for b in make_train_iterator(dataset, **TRAIN, num_epochs=1)])
    assert len(one) == n // 8 * 8 and len(set(one)) == len(one) and one.max() < n
    assert not np.array_equal(one, np.sort(one))  # shuffled
    two = np.concatenate([b["record_id"] for b in make_train_iterator(dataset, **TRAIN, num_epochs=2)])
    assert len(two) == 2 * n // 8 * 8
    np.testing.assert_array_equal(np.sort(two[:n]), np.arange(n))  # epoch 1 visits every record once
    assert not np.array_equal(two[:len(two) - n], two[n:])           # epoch 2 in a new order


def test_records_split_across_processes(dataset):
    kwargs = {**TRAIN, "process_count": 2, "num_epochs": 1}
    per_process = [list(make_train_iterator(dataset, **{**kwargs, "process_index": p})) for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1])  # same number of steps everywhere
    ids = [np.concatenate([b["record_id"] for b in batches]) for batches in per_process]
    assert all(b["image"].shape[0] == 4 for batches in per_process for b in batches)  # local batch
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) <= set(range(0, len(dataset), 2)) and set(ids[1]) <= set(range(1, len(dataset), 2))
    assert len(ids[0]) + len(ids[1]) >= len(dataset) - 2 * 4  # at most a local batch dropped per process


def test_jax_process_defaults(dataset):
    batch = next(make_train_iterator(dataset, batch_size=8, crop_size=24, seed=3))
    assert_same_batches([batch], [next(make_train_iterator(dataset, **TRAIN))])


def save_and_restore(dataset, tmp_path, num_workers):
    """Batches k+1, k+2 of an iterator, and of a fresh iterator restored by orbax from the state after k."""
    kwargs = {**TRAIN, "num_workers": num_workers}
    iterator = make_train_iterator(dataset, **kwargs)
    before = take(iterator, 3)
    manager = ocp.CheckpointManager(
        tmp_path / "ckpt", item_names=("data_iter",),
        item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 2)
    restored = make_train_iterator(dataset, **kwargs)
    manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
    from_orbax = take(restored, 2)
    for it in (iterator, restored):
        it.close()  # stops worker processes now rather than at interpreter exit
    return before, expected, from_orbax


def test_checkpoint_restore_in_process(dataset, tmp_path):
    _, expected, from_orbax = save_and_restore(dataset, tmp_path, num_workers=0)
    assert_same_batches(expected, from_orbax)

    iterator = make_train_iterator(dataset, **TRAIN)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 2)
    fresh = make_train_iterator(dataset, **TRAIN)
    fresh.set_state(state)
    assert_same_batches(expected, take(fresh, 2))


def test_worker_process_matches_in_process_and_restores(dataset, tmp_path):
    before, expected, from_orbax = save_and_restore(dataset, tmp_path, num_workers=1)
    assert_same_batches(before + expected, take(make_train_iterator(dataset, **TRAIN), 5))
    assert_same_batches(expected, from_orbax)


def test_request_errors(dataset):
    with pytest.raises(ValueError, match="crop_size 40 does not fit records of 32x32 .*manifest.json"):
        make_train_iterator(dataset, **{**TRAIN, "crop_size": 40})
    with pytest.raises(ValueError, match="asked for 5 channels; .*manifest.json says records have 6"):
        make_train_iterator(dataset, **TRAIN, num_channels=5)
    with pytest.raises(ValueError, match="batch_size 7 is not divisible by process_count 2"):
        make_train_iterator(dataset, **{**TRAIN, "batch_size": 7, "process_count": 2})
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_train_iterator(dataset, **{**TRAIN, "batch_size": 4096})


def rewrite_shard(path, replace):
    """Rewrites an ArrayRecord shard with some records replaced ({index: bytes})."""
    source = grain.sources.ArrayRecordDataSource([str(path)])
    data = [replace.get(i, source[i]) for i in range(len(source))]
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for d in data:
        writer.write(d)
    writer.close()


def test_bad_records_are_named(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset.path, broken)
    shards = [s["file"] for s in dataset.manifest["shards"]]
    five_channels = records.encode(np.zeros((5, 32, 32), np.uint8), {
        "experiment": "SYN-01", "plate": "Plate1", "well": "A01", "site": 1, "tile": 0,
        "perturbation": "non-targeting", "is_control": True, "channels": list("abcde")})
    rewrite_shard(broken / shards[0], {3: b"\xc1 not msgpack"})
    rewrite_shard(broken / shards[1], {2: five_channels})
    ds = open_dataset(broken)  # record counts still match: only reading finds the damage
    offsets = ds.reader.shard_offsets
    with pytest.raises(records.RecordError, match=f"{broken / shards[0]}\\[3\\]: cannot decode"):
        ds.reader.read(offsets[0] + 3)
    with pytest.raises(records.RecordError, match=f"{broken / shards[1]}\\[2\\]: image shape .* \\(5, 32, 32\\)"):
        ds.reader.read(offsets[1] + 2)
    with pytest.raises(records.RecordError, match=f"{broken / shards[0]}\\[3\\]"):
        list(iterate_records(ds, 16))
    either = f"({broken / shards[0]}\\[3\\]|{broken / shards[1]}\\[2\\])"  # whichever is read first
    with pytest.raises(records.RecordError, match=either):
        list(make_train_iterator(ds, **TRAIN, num_epochs=1))


def test_iterate_records_in_order(dataset):
    batches = list(iterate_records(dataset, 10))
    sizes = [len(images) for images, _ in batches]
    assert sizes[:-1] == [10] * (len(batches) - 1) and 0 < sizes[-1] <= 10
    images = np.concatenate([images for images, _ in batches])
    assert images.dtype == np.uint8 and images.shape == (len(dataset), 6, 32, 32)
    np.testing.assert_array_equal(images, dataset.reader.read_many(range(len(dataset))))
    meta = pd.concat([m for _, m in batches])
    pd.testing.assert_frame_equal(meta, dataset.metadata)

    blocks = [pd.concat([m for _, m in iterate_records(dataset.path, 7, process_index=p, process_count=3)])
              for p in range(3)]
    assert pd.concat(blocks).record_id.tolist() == list(range(len(dataset)))  # disjoint, complete, ordered


def test_the_benchmarks_png_baseline_feeds_the_trainers_pipeline_the_same_crops(tmp_path):
    """benchmarks/input_pipeline.py compares like with like: the trainer's pipeline reading the records'
    tiles from the per-channel PNGs yields the batches it yields from the ArrayRecord build of those PNGs."""
    from benchmarks.input_pipeline import png_dataset
    from data.crop_builder import BuildOptions, build_dataset
    from data.cropping import CropSpec
    from data.sources.rxrx1 import RxRx1
    from tests import fake_screens
    root = fake_screens.rxrx1(tmp_path / "png")
    options = BuildOptions(crop=CropSpec(size=32), image_size=(64, 64), progress=False)
    built = open_dataset(build_dataset(RxRx1(root), tmp_path / "arrayrecord", options).path)
    streams = [make_train_iterator(ds, batch_size=8, crop_size=24, seed=3, process_index=0, process_count=1)
               for ds in (built, png_dataset(root, built))]
    for _ in range(4):
        from_records, from_pngs = (next(s) for s in streams)
        assert from_records.keys() == from_pngs.keys()
        for key in from_records:
            np.testing.assert_array_equal(from_records[key], from_pngs[key], err_msg=key)
