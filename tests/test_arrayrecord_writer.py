"""The dataset writer and `open_dataset`: layout, record placement, labels, and errors that name the path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data.arrayrecord_writer import shard_file_names, write_dataset
from maejax import records
from maejax.input_pipeline import open_dataset
from tests.reference_data import ANNOTATIONS, require

CHANNELS = ["DNA", "ER", "RNA"]


def make_examples(n: int, shape=(3, 8, 8)):
    rng = np.random.default_rng(0)
    perturbations = ["GENE0002", "non-targeting", "GENE0001"]
    for k in range(n):
        pert = perturbations[k % 3]
        meta = {"experiment": f"EXP{k % 2}", "plate": "Plate1", "well": f"A{k // 4:02d}", "site": 1,
                "tile": k % 4, "perturbation": pert, "is_control": pert == "non-targeting", "order": k}
        yield rng.integers(0, 256, shape, dtype=np.uint8), meta


def write(out_dir, n=11, **kwargs):
    kwargs = {"name": "toy", "source": "tests", "channels": CHANNELS, "num_shards": 3, **kwargs}
    return write_dataset(out_dir, make_examples(n), **kwargs)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("writer") / "toy"
    return write(out, annotations={"ToyComplex": [("GENE0001", "GENE0002")]}, params={"seed": 7},
                 manifest_extra={"tiling": {"crop_size": 8}}, extra_files={"ground_truth.json": "{}"})


def test_layout_and_manifest(dataset_dir):
    names = sorted(p.name for p in dataset_dir.iterdir())
    assert names == sorted(shard_file_names(3) + ["annotations", "ground_truth.json", "manifest.json",
                                                  "metadata.parquet"])
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["name"] == "toy" and manifest["source"] == "tests"
    assert manifest["channels"] == CHANNELS and manifest["crop_shape"] == [3, 8, 8]
    assert manifest["num_records"] == 11
    assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 3]  # round-robin: balanced
    assert manifest["perturbations"] == ["GENE0001", "GENE0002", "non-targeting"]
    assert manifest["controls"] == ["non-targeting"]
    assert manifest["experiments"]["EXP0"]["records"] == 6 and manifest["experiments"]["EXP1"]["records"] == 5
    assert manifest["params"] == {"seed": 7} and manifest["tiling"] == {"crop_size": 8}
    assert manifest["annotations"] == ["annotations/ToyComplex.txt"]
    assert {"python", "numpy", "array-record"} <= set(manifest["created_by"])


def test_records_round_trip_in_record_id_order(dataset_dir):
    ds = open_dataset(dataset_dir)
    expected = list(make_examples(11))
    meta = ds.metadata
    assert meta.record_id.tolist() == list(range(11))
    for row in meta.itertuples():
        # Example k went to shard k % 3 at index k // 3.
        k = row.index * 3 + row.shard
        assert row.order == k
        image, written = expected[k]
        record = records.decode(ds.reader.source[row.record_id])
        np.testing.assert_array_equal(record["image"], image)
        np.testing.assert_array_equal(ds.reader.read(row.record_id), image)
        assert record["channels"] == CHANNELS and record["order"] == k
        assert (row.experiment, row.well, row.tile, row.perturbation) == (
            written["experiment"], written["well"], written["tile"], written["perturbation"])
        assert ds.perturbations[row.label] == row.perturbation
        assert row.is_control == (row.perturbation == "non-targeting")
    assert "channels" not in meta.columns


def test_annotations_use_efaar_format(dataset_dir):
    path = dataset_dir / "annotations" / "ToyComplex.txt"
    assert path.read_text().splitlines() == ["entity1,entity2", "GENE0001,GENE0002"]
    with open(require(ANNOTATIONS) / "CORUM.txt") as f:
        assert f.readline().strip() == path.read_text().splitlines()[0]


def test_same_input_gives_identical_files(tmp_path, dataset_dir):
    again = write(tmp_path / "again", annotations={"ToyComplex": [("GENE0001", "GENE0002")]},
                  params={"seed": 7}, manifest_extra={"tiling": {"crop_size": 8}},
                  extra_files={"ground_truth.json": "{}"})
    for name in shard_file_names(3) + ["manifest.json", "metadata.parquet"]:
        assert (again / name).read_bytes() == (dataset_dir / name).read_bytes(), name


def test_refuses_to_clobber(tmp_path):
    out = write(tmp_path / "ds", n=4)
    with pytest.raises(ValueError, match="not empty"):
        write(out, n=4)
    write(out, n=5, overwrite=True)
    assert open_dataset(out).manifest["num_records"] == 5
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing"):
        write(stranger, n=4, overwrite=True)
    assert (stranger / "thesis.tex").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # failed writes leave no temporary directory


@pytest.mark.parametrize("bad, message", [
    (lambda k, img, m: (img[:, :4] if k == 2 else img, m), "example 2 .* shape"),
    (lambda k, img, m: (img, {**m, "channels": ["a", "b", "c"]}), "channels"),
    (lambda k, img, m: (img, {**m, "extra": [1, 2]}), "'extra'.* not a scalar"),
    (lambda k, img, m: (img, {**m, "is_control": k == 0}), "is_control"),
    (lambda k, img, m: (img.astype(np.float32), m), "uint8"),
])
def test_bad_examples_are_named(tmp_path, bad, message):
    examples = (bad(k, img, meta) for k, (img, meta) in enumerate(make_examples(6)))
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "bad", examples, name="bad", source="tests", channels=CHANNELS, num_shards=2)
    assert not (tmp_path / "bad").exists()


def test_no_examples(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        write_dataset(tmp_path / "empty", iter([]), name="e", source="tests", channels=CHANNELS)


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "manifest.json")):
        open_dataset(tmp_path / "nothing")

    ds = write(tmp_path / "ds", n=6)
    manifest = ds / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:40])
    with pytest.raises(ValueError, match=f"{manifest}: corrupt manifest"):
        open_dataset(ds)
    manifest.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "shards"}))
    with pytest.raises(ValueError, match="missing keys \\['shards'\\]"):
        open_dataset(ds)
    manifest.write_text(good)

    shard = ds / shard_file_names(3)[1]
    content = shard.read_bytes()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed"):
        open_dataset(ds)
    shard.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=f"{shard}: corrupt ArrayRecord shard"):
        open_dataset(ds)
    writer = ArrayRecordWriter(str(shard), "group_size:1")  # one record short
    writer.write(b"x")
    writer.close()
    with pytest.raises(ValueError, match=f"{shard}: holds 1 records, .* says 2"):
        open_dataset(ds)
    shard.write_bytes(content)

    meta = pd.read_parquet(ds / "metadata.parquet")
    meta.iloc[::-1].to_parquet(ds / "metadata.parquet")
    with pytest.raises(ValueError, match="metadata.parquet: expected one row per record"):
        open_dataset(ds)
