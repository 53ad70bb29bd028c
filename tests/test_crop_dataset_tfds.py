"""A built crop dataset exposed through tensorflow-datasets (ArrayRecord, no TensorFlow) and read by grain."""
from __future__ import annotations

import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data.crop_builder import BuildOptions, build_dataset
from data.cropping import CropSpec
from data.sources.rxrx1 import RXRX_STAINS, RxRx1
from data.tfds_crops import prepare
from maejax.input_pipeline import open_dataset
from tests import fake_screens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = fake_screens.rxrx1(tmp_path_factory.mktemp("src"), experiments=("HUVEC-01",))
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text().replace("train,HUVEC-01,2", "test,HUVEC-01,2"))  # plate 2 is the test split
    options = BuildOptions(crop=CropSpec(size=32), image_size=(64, 64), num_shards=2, progress=False)
    dataset = build_dataset(RxRx1(root), tmp_path_factory.mktemp("out") / "rx", options).path
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare(dataset, data_dir, name="rx_tiny", split_column="dataset")
    return open_dataset(dataset), data_dir


def test_tfds_data_source_reads_every_record(built):
    ds, data_dir = built
    train = tfds.data_source("maejax_crops/rx_tiny", data_dir=str(data_dir), split="train")
    test = tfds.data_source("maejax_crops/rx_tiny", data_dir=str(data_dir), split="test")
    assert len(train) == len(test) == 24
    seen = set()
    for source, split in ((train, "train"), (test, "test")):
        for i in range(len(source)):
            example = source[i]
            row = ds.metadata.iloc[example["record_id"]]
            np.testing.assert_array_equal(example["image"], ds.reader.read(example["record_id"]))
            assert [c.decode() for c in example["channels"]] == RXRX_STAINS
            assert example["dataset"].decode() == split == row.dataset
            assert (example["well"].decode(), example["tile"], example["label"]) == (row.well, row.tile, row.label)
            assert bool(example["is_control"]) == row.is_control and example["sirna_id"] == row.sirna_id
            seen.add(example["record_id"])
    assert seen == set(range(len(ds)))
    builder = tfds.builder_from_directory(str(data_dir / "maejax_crops" / "rx_tiny" / "1.0.0"))
    assert builder.info.metadata["manifest"]["channels"] == RXRX_STAINS
    assert "tensorflow" not in sys.modules


def test_grain_batches_the_tfds_source(built):
    _, data_dir = built
    source = tfds.data_source("maejax_crops/rx_tiny", data_dir=str(data_dir), split="train")
    batches = grain.MapDataset.source(source).seed(0).shuffle().map(lambda e: {"image": e["image"],
                                                                               "label": e["label"]}).batch(8)
    batch = next(iter(batches))
    assert batch["image"].shape == (8, 6, 32, 32) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,)


def test_unknown_split_column_is_named(built):
    ds, data_dir = built
    with pytest.raises(ValueError, match="metadata has no column 'fold'"):
        prepare(ds.path, data_dir, name="other", split_column="fold")
