"""A crop dataset directory as a tensorflow-datasets dataset: ArrayRecord files, no TensorFlow needed.

    python -m data.tfds_crops --dataset /data/crops/rxrx1 --out ~/tensorflow_datasets

writes `<out>/maejax_crops/<name>/1.0.0/` (--out is the TFDS data_dir) (name: the manifest's, or --name). Then, in any process
and without importing this module:

    src = tfds.data_source("maejax_crops/rxrx1", data_dir=..., split="train")  # or builder_from_directory
    src[i]  # {"image": uint8 (C, H, W), "channels": [b"Hoechst", ...], "record_id": ..., metadata columns}
    grain.MapDataset.source(src)  # grain reads it like the dataset directory's own shards

Every record becomes one example (image, channel names, every metadata column; text as bytes); the
source manifest is kept in the TFDS metadata (`builder.info.metadata["manifest"]`). TFDS orders
examples by a hash of their key, so use `record_id` to join back to `metadata.parquet`. `--split_col
dataset` makes one split per value of that column (e.g. RxRx1's train/test) instead of one `train`.

Features avoid `tfds.features.Image`, which needs TensorFlow and at most 4 channels (stack.md P11);
the builder class is not registered, so reading never needs this module (stack.md P10).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds

from maejax import flags
from maejax.input_pipeline import Dataset, open_dataset

NAME = "maejax_crops"
BATCH = 256  # records read per ArrayRecord call while generating


with tfds.core.registered.skip_registration():
    class MaejaxCrops(tfds.core.GeneratorBasedBuilder):
        """Builder over one crop dataset directory; the config name is the dataset's name."""
        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Crop records of a maejax dataset directory."}

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS looks for checksums/README beside a builder's code through the `importlib_resources`
            # backport, which is not installed; this builder downloads nothing, so it has no such files.
            return None

        def __init__(self, *, dataset: str | os.PathLike | Dataset, config_name: str | None = None,
                     split_column: str | None = None, **kwargs: Any):
            self._dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
            self._split_column = split_column
            if split_column is not None and split_column not in self._dataset.metadata.columns:
                raise ValueError(f"{self._dataset.path}: metadata has no column {split_column!r} to split by")
            name = config_name or self._dataset.manifest["name"]
            config = tfds.core.BuilderConfig(name=name, description=f"crops of {self._dataset.path}")
            super().__init__(config=config, file_format="array_record", **kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            features = {
                "image": tfds.features.Tensor(shape=self._dataset.crop_shape, dtype=np.uint8),
                "channels": tfds.features.Sequence(tfds.features.Text()),
            }
            for column, dtype in self._dataset.metadata.dtypes.items():
                features[column] = _feature(column, dtype, self._dataset.path)
            return tfds.core.DatasetInfo(
                builder=self, description=f"Crops ({', '.join(self._dataset.channels)}) of {self._dataset.path}",
                features=tfds.features.FeaturesDict(features),
                metadata=tfds.core.MetadataDict(manifest=self._dataset.manifest))

        def _split_generators(self, dl_manager):
            meta = self._dataset.metadata
            if self._split_column is None:
                return {"train": self._generate_examples(meta.record_id.to_numpy())}
            return {str(value): self._generate_examples(group.record_id.to_numpy())
                    for value, group in meta.groupby(self._split_column, sort=True)}

        def _generate_examples(self, record_ids: np.ndarray):
            meta = self._dataset.metadata
            channels = self._dataset.channels
            for start in range(0, len(record_ids), BATCH):
                ids = record_ids[start:start + BATCH]
                images = self._dataset.reader.read_many(ids)
                for record_id, image in zip(ids, images):
                    row = meta.iloc[int(record_id)].to_dict()
                    yield int(record_id), {"image": image, "channels": channels, **row}


def _feature(column: str, dtype, where: Path):
    types = pd.api.types
    if types.is_bool_dtype(dtype):
        return np.bool_
    if types.is_integer_dtype(dtype):
        return np.int64
    if types.is_float_dtype(dtype):
        return np.float64
    if types.is_string_dtype(dtype):
        return tfds.features.Text()
    raise ValueError(f"{where}: metadata column {column!r} has type {dtype}, which has no TFDS feature here")


def prepare(dataset: str | os.PathLike, data_dir: str | os.PathLike, *, name: str | None = None,
            split_column: str | None = None) -> tfds.core.DatasetBuilder:
    """Writes the TFDS version of `dataset` under `data_dir`; returns the builder (as_data_source works)."""
    builder = MaejaxCrops(dataset=dataset, config_name=name, split_column=split_column, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, metavar="DIR", help="crop dataset directory (has manifest.json)")
    parser.add_argument("--out", deprecated="--data-dir", required=True, metavar="DIR",
                        help="TFDS data_dir to write into")
    parser.add_argument("--name", help="config name (default: the manifest's name)")
    parser.add_argument("--split_col", deprecated="--split-column",
                        help="one split per value of this metadata column (default: train)")
    args = parser.parse_args(argv)
    builder = prepare(args.dataset, args.out, name=args.name, split_column=args.split_col)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"wrote {builder.data_dir}: {json.dumps(splits)}; read with "
          f"tfds.data_source({NAME + '/' + builder.builder_config.name!r}, data_dir={str(args.out)!r}, split=...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
