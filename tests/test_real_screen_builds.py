"""Each real layout (RxRx1, RxRx3-core, JUMP-CP, generic CSV) builds a crop dataset whose records are
the source pixels (converted by the documented rule), with the right metadata, channels and manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data.conversion import ConversionRule, to_uint8
from data.crop_builder import BuildOptions, build_dataset
from data.cropping import CropSpec
from data.sources.generic import GenericCSV
from data.sources.jump_cp import JumpCP
from data.sources.rxrx1 import RXRX_STAINS, RxRx1
from data.sources.rxrx3_core import RxRx3Core
from maejax import records
from maejax.input_pipeline import make_train_iterator, open_dataset
from tests import fake_screens

CROP = CropSpec(size=32)
QUIET = dict(progress=False, image_size="auto")


def options(**kwargs) -> BuildOptions:
    return BuildOptions(**{"crop": CROP, **QUIET, **kwargs})


def all_records(dataset_dir):
    ds = open_dataset(dataset_dir)
    return ds, [records.decode(ds.reader.source[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def rxrx1_built(tmp_path_factory):
    root = fake_screens.rxrx1(tmp_path_factory.mktemp("rxrx1"))
    out = tmp_path_factory.mktemp("out") / "rxrx1"
    report = build_dataset(RxRx1(root), out, options(image_size=(64, 64), num_shards=3))
    return root, out, report


def test_rxrx1_records_are_the_png_tiles(rxrx1_built):
    root, out, report = rxrx1_built
    ds, recs = all_records(out)
    assert report.num_sites == 24 and report.num_records == len(ds) == 24 * 4 and not report.skipped_sites
    for rec, row in zip(recs, ds.metadata.itertuples()):
        assert rec["channels"] == RXRX_STAINS
        plate = int(rec["plate"].removeprefix("Plate"))
        files = [fake_screens.rxrx1_file(root, rec["experiment"], plate, rec["well"], rec["site"], c)
                 for c in range(1, 7)]
        site = np.stack([np.asarray(Image.open(f)) for f in files])
        y, x = divmod(rec["tile"], 2)  # row-major 2x2 tiling of a 64 px site
        assert (rec["crop_y"], rec["crop_x"]) == (32 * y, 32 * x)
        np.testing.assert_array_equal(rec["image"], site[:, 32 * y:32 * y + 32, 32 * x:32 * x + 32])
        assert (row.experiment, row.well, row.site, row.tile) == tuple(rec[k] for k in ("experiment", "well", "site",
                                                                                          "tile"))
    meta = ds.metadata
    assert set(meta.perturbation) == {"EMPTY", "s0001", "s0002"}
    assert meta.is_control.tolist() == (meta.well_type == "negative_control").tolist()
    assert meta.is_control.sum() == 32
    assert {"cell_type", "sirna_id", "site_id", "crop_y", "crop_x"} <= set(meta.columns)
    # Contiguous blocks of sites in source order: shard 0 holds the first experiment's first plate.
    assert meta[meta["shard"] == 0].experiment.unique().tolist() == ["HUVEC-01"]


def test_rxrx1_manifest(rxrx1_built):
    root, out, _ = rxrx1_built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "data.sources.rxrx1" and manifest["channels"] == RXRX_STAINS
    assert manifest["crop_shape"] == [6, 32, 32] and manifest["num_records"] == 96
    assert [s["num_records"] for s in manifest["shards"]] == [32, 32, 32]
    assert manifest["sources"][0]["kind"] == "rxrx1" and manifest["sources"][0]["source_dir"] == str(root)
    assert manifest["crops"]["mode"] == "tile" and manifest["crops"]["crops_per_site"] == 4
    assert manifest["site_format"] == {"size": [64, 64], "dtypes": ["uint8"] * 6}
    assert manifest["conversion"]["converted_channels"] == [] and manifest["conversion"]["levels_file"] is None
    assert manifest["num_sites"] == 24 and manifest["skipped_sites"] == []
    assert manifest["params"]["seed"] == 0 and {"pillow", "pyarrow", "numpy"} <= set(manifest["created_by"])
    assert manifest["controls"] == ["EMPTY"]


def test_trainer_reads_a_built_dataset(rxrx1_built):
    batch = next(make_train_iterator(rxrx1_built[1], batch_size=8, crop_size=32, seed=0, process_index=0,
                                     process_count=1))
    assert batch["image"].shape == (8, 6, 32, 32) and batch["image"].dtype == np.float32


def test_same_shards_for_any_worker_count(rxrx1_built, tmp_path):
    root, out, _ = rxrx1_built
    again = build_dataset(RxRx1(root), tmp_path / "again", options(image_size=(64, 64), num_shards=3, workers=2))
    manifest = json.loads((out / "manifest.json").read_text())
    for name in [s["file"] for s in manifest["shards"]] + ["metadata.parquet"]:
        assert (again.path / name).read_bytes() == (out / name).read_bytes(), name


def test_random_crops_are_seeded(rxrx1_built, tmp_path):
    root = rxrx1_built[0]
    random = CropSpec(size=24, mode="random", random_per_site=3)
    build = lambda out, seed: build_dataset(RxRx1(root, experiments=["RPE-02"]), tmp_path / out,  # noqa: E731
                                            options(crop=random, image_size=(64, 64), seed=seed))
    first, same, other = build("a", 5), build("b", 5), build("c", 6)
    a, b, c = (open_dataset(r.path).metadata for r in (first, same, other))
    assert len(a) == 12 * 3 and a.tile.max() == 2
    assert a[["crop_y", "crop_x"]].equals(b[["crop_y", "crop_x"]])
    assert not a[["crop_y", "crop_x"]].equals(c[["crop_y", "crop_x"]])
    assert a.crop_y.between(0, 40).all() and a.crop_x.between(0, 40).all()
    _, recs = all_records(first.path)
    rec = recs[7]
    site = np.stack([np.asarray(Image.open(fake_screens.rxrx1_file(root, "RPE-02", int(rec["plate"][5:]), rec["well"],
                                                                    rec["site"], ch))) for ch in range(1, 7)])
    y, x = rec["crop_y"], rec["crop_x"]
    np.testing.assert_array_equal(rec["image"], site[:, y:y + 24, x:x + 24])


def test_random_crops_of_sites_of_any_size(rxrx1_built, tmp_path):
    random = CropSpec(size=24, mode="random", random_per_site=2)
    report = build_dataset(RxRx1(rxrx1_built[0], experiments=["RPE-02"]), tmp_path / "any",
                           options(crop=random, image_size="any"))
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["crops"]["crops_per_site"] == 2 and report.num_records == 12 * 2


def test_rxrx3_core_jpeg2000_in_parquet(tmp_path):
    root, images = fake_screens.rxrx3_core(tmp_path / "src")
    report = build_dataset(RxRx3Core(root), tmp_path / "out", options(image_size=(64, 64)))
    ds, recs = all_records(report.path)
    assert report.num_sites == 5 and len(recs) == 20
    for rec in recs:
        key = f"{rec['experiment']}/{rec['plate']}/{rec['well']}_s1_"
        site = np.stack([images[key + str(c)] for c in range(1, 7)])
        y, x = rec["crop_y"], rec["crop_x"]
        np.testing.assert_array_equal(rec["image"], site[:, y:y + 32, x:x + 32])
    by_well = ds.metadata.drop_duplicates("well").set_index("well")
    assert by_well.loc["AA03", "perturbation"] == "TP53" and by_well.loc["C05", "perturbation"] == "RXCMPD-17"
    assert by_well.loc["C05", "concentration"] == 2.5 and np.isnan(by_well.loc["AA03", "concentration"])
    assert by_well.loc["C05", "smiles"] == "CCO" and by_well.loc["AA02", "perturbation_type"] == "CRISPR"
    assert by_well.is_control.to_dict() == {"AA02": True, "AA03": False, "AB04": False, "C05": False, "C06": True}
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["controls"] == ["EMPTY_control"] and manifest["site_format"]["dtypes"] == ["uint8"] * 6


@pytest.fixture(scope="module")
def jump_built(tmp_path_factory):
    root, images = fake_screens.jump(tmp_path_factory.mktemp("jump"))
    source = JumpCP(JumpCP.find_load_data(root / "workspace"), path_map=[(fake_screens.S3_ROOT, f"{root}/")],
                    wells=root / "well.csv.gz", perturbations=[root / "crispr.csv.gz"])
    report = build_dataset(source, tmp_path_factory.mktemp("out") / "jump", options())
    return root, images, report


def test_jump_channels_come_from_load_data_columns(jump_built):
    _, _, report = jump_built
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["channels"] == fake_screens.JUMP_CHANNELS  # column order, not a built-in mapping
    assert manifest["site_format"] == {"size": [64, 64], "dtypes": ["float32"] * 6}  # illumination-corrected
    assert manifest["sources"][0]["illumination_correction"] is True
    assert all(path.endswith("load_data_with_illum.csv") for path in manifest["sources"][0]["load_data"])


def test_jump_16bit_conversion_per_plate(jump_built):
    root, images, report = jump_built
    levels = json.loads((report.path / "conversion.json").read_text())
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["conversion"]["kind"] == "percentile" and manifest["conversion"]["low"] == 0.1
    assert manifest["conversion"]["levels_file"] == "conversion.json"
    assert levels["converted_channels"] == fake_screens.JUMP_CHANNELS
    assert set(levels["plates"]) == {f"{b}/{p}" for p, b in fake_screens.JUMP_PLATES.items()}
    ds, recs = all_records(report.path)
    assert len(recs) == 2 * 3 * 2 * 4
    for rec in recs[::5]:
        plate_levels = levels["plates"][f"{rec['experiment']}/{rec['plate']}"]
        well, site = rec["well"], rec["site"]
        y, x = rec["crop_y"], rec["crop_x"]
        for c, channel in enumerate(fake_screens.JUMP_CHANNELS):
            name = f"r{well}f{site:02d}p01-ch{c + 1}sk1fk1fl1.tiff"
            raw = images[str(root / "images" / rec["experiment"] / "images" / rec["plate"] / "Images" / name)]
            illum = np.load(root / "illum" / rec["plate"] / f"{rec['plate']}_Illum{channel}.npy")
            expected = to_uint8(raw.astype(np.float32) / illum, *plate_levels[c])
            np.testing.assert_array_equal(rec["image"][c], expected[y:y + 32, x:x + 32])
    low, high = plate_levels[0]
    assert 0 < low < high < 4096 / 0.8  # percentiles of the corrected 12-bit range, not the 16-bit one


def test_jump_perturbations_from_annotation_tables(jump_built):
    ds = open_dataset(jump_built[2].path)
    by_well = ds.metadata.drop_duplicates("well").set_index("well")
    assert by_well.perturbation.to_dict() == {"A01": "TP53", "A02": "JCP2022_033924", "B01": "non-targeting"}
    assert by_well.is_control.to_dict() == {"A01": False, "A02": True, "B01": True}
    assert by_well.loc["A01", "jcp2022"] == "JCP2022_800001"
    assert set(ds.metadata.experiment) == set(fake_screens.JUMP_PLATES.values())


def test_generic_csv_mixed_bit_depths(tmp_path):
    root = fake_screens.generic(tmp_path / "src")
    rule = ConversionRule(kind="fixed", low=0, high=4095)
    report = build_dataset(GenericCSV(root / "sites.csv", ["DNA", "Actin"], control_labels=("DMSO",)), tmp_path / "out",
                           options(conversion=rule))
    ds, recs = all_records(report.path)
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["channels"] == ["DNA", "Actin"] and manifest["site_format"]["dtypes"] == ["uint16", "uint8"]
    assert manifest["conversion"]["converted_channels"] == ["DNA"] and manifest["conversion"]["kind"] == "fixed"
    levels = json.loads((report.path / "conversion.json").read_text())["plates"]
    assert levels["run1/P1"] == [[0.0, 4095.0], None]
    assert len(recs) == 12 * 4 and ds.metadata.is_control.sum() == 6 * 4
    assert ds.metadata.compound.tolist() == ds.metadata.perturbation.tolist() and set(ds.metadata.dose_um) == {"0.1"}
    rec = recs[5]
    stem = root / "img" / rec["plate"] / f"{rec['well']}_{rec['site']}"
    dna, actin = np.asarray(Image.open(f"{stem}_dna.tif")), np.asarray(Image.open(f"{stem}_actin.png"))
    y, x = rec["crop_y"], rec["crop_x"]
    np.testing.assert_array_equal(rec["image"][0], to_uint8(dna, 0, 4095)[y:y + 32, x:x + 32])
    np.testing.assert_array_equal(rec["image"][1], actin[y:y + 32, x:x + 32])


def test_to_uint8_rule():
    x = np.array([-5, 0, 100, 200, 300], np.float32)
    np.testing.assert_array_equal(to_uint8(x, 0, 200), [0, 0, 128, 255, 255])  # round(127.5) = 128
