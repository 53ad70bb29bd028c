"""The synthetic screen: layout, determinism, ground truth, and that the planted biology and batch effects are real."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from data import synthetic_screen
from data.arrayrecord_writer import shard_file_names
from data.synthetic_screen import CONTROL_LABEL, generate_screen, tile_site
from maejax.input_pipeline import iterate_records, open_dataset

# Small but with enough genes and experiments for statistics: ~90 sites, ~2 s to build.
BIOLOGY = dict(preset="tiny", num_pathways=3, num_complexes=6, complex_size_min=3, complex_size_max=4,
               num_null_genes=4, num_experiments=3, control_wells=4, site_size=96, crop_size=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_screen(tmp_path_factory.mktemp("screen") / "tiny", preset="tiny", seed=5)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return generate_screen(tmp_path_factory.mktemp("screen") / "bio", seed=0, **BIOLOGY)


def test_layout(tiny):
    ds = open_dataset(tiny)
    cfg = synthetic_screen.ScreenConfig(**synthetic_screen.PRESETS["tiny"])
    meta, manifest = ds.metadata, ds.manifest
    assert ds.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi"]
    assert ds.crop_shape == (6, cfg.crop_size, cfg.crop_size)
    assert manifest["tiling"] == {"site_size": 64, "crop_size": 32, "tiles_per_side": 2, "order": "row-major"}
    assert manifest["controls"] == [CONTROL_LABEL] and CONTROL_LABEL in manifest["perturbations"]
    assert manifest["params"]["seed"] == 5 and manifest["params"]["preset"] == "tiny"
    assert all(re.fullmatch(r"GENE\d{4}", p) for p in manifest["perturbations"] if p != CONTROL_LABEL)
    assert len(manifest["shards"]) == cfg.num_shards

    sites = meta.groupby(["experiment", "plate", "well", "site"])
    assert (sites.size() == 4).all() and all(sorted(g.tile) == [0, 1, 2, 3] for _, g in sites)
    plates = meta.groupby(["experiment", "plate"])
    assert len(plates) == cfg.num_experiments * cfg.plates_per_experiment
    genes = [p for p in manifest["perturbations"] if p != CONTROL_LABEL]
    for _, plate in plates:
        wells = plate.groupby("well").perturbation.first()
        assert (wells == CONTROL_LABEL).sum() == cfg.control_wells  # negative controls on every plate
        assert sorted(wells[wells != CONTROL_LABEL]) == genes      # every gene on every plate
    assert meta.groupby(["experiment", "plate", "well"]).perturbation.nunique().max() == 1
    assert meta.num_cells.sum() > 0


def test_tiles_are_row_major():
    image = np.arange(2 * 6 * 6).reshape(2, 6, 6)
    tiles = tile_site(image, 3)
    assert tiles.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(tiles[1], image[:, 0:3, 3:6])  # row 0, column 1
    np.testing.assert_array_equal(tiles[2], image[:, 3:6, 0:3])  # row 1, column 0


def test_ground_truth_and_annotations(tiny):
    truth = json.loads((tiny / "ground_truth.json").read_text())
    complex_pairs = pd.read_csv(tiny / "annotations" / "SyntheticComplex.txt")
    pathway_pairs = pd.read_csv(tiny / "annotations" / "SyntheticPathway.txt")
    assert list(complex_pairs.columns) == ["entity1", "entity2"]
    expected = {tuple(sorted((a, b))) for genes in truth["complexes"].values()
                for a in genes for b in genes if a < b}
    assert set(map(tuple, complex_pairs.values)) == expected
    assert expected <= set(map(tuple, pathway_pairs.values))
    annotated = set(complex_pairs.values.ravel()) | set(pathway_pairs.values.ravel())
    assert not annotated & set(truth["null_genes"])
    for gene in truth["null_genes"]:
        assert not np.any(truth["genes"][gene]["phenotype"])
    assert len(truth["experiments"]) == 2 and len(truth["experiments"]["SYN-01"]["gain"]) == 6
    assert all(len(ks) >= 1 for ks in truth["pathways"].values())


def test_same_seed_gives_identical_records(tmp_path, tiny):
    again = generate_screen(tmp_path / "again", preset="tiny", seed=5)
    for name in shard_file_names(2):
        assert (again / name).read_bytes() == (tiny / name).read_bytes()
    other = generate_screen(tmp_path / "other", preset="tiny", seed=6)
    assert (other / shard_file_names(2)[0]).read_bytes() != (tiny / shard_file_names(2)[0]).read_bytes()


def test_worker_processes_give_identical_output(tmp_path, screen):
    parallel = generate_screen(tmp_path / "parallel", seed=0, workers=2, **BIOLOGY)
    num_sites = open_dataset(screen).metadata.groupby(["experiment", "plate", "well", "site"]).ngroups
    assert num_sites > 2 * synthetic_screen.CHUNK_SITES  # several chunks in flight
    for name in shard_file_names(2) + ["metadata.parquet", "ground_truth.json"]:
        assert (parallel / name).read_bytes() == (screen / name).read_bytes()


def test_images_look_like_fluorescence(tiny):
    images = np.concatenate([b for b, _ in iterate_records(tiny, 64)])
    background = np.percentile(images, 20, axis=(0, 2, 3))
    foreground = np.percentile(images, 99, axis=(0, 2, 3))
    assert (background < 40).all()                     # dark background
    assert (foreground > background + 40).all()        # bright structures in every channel
    assert (images == 255).mean() < 0.01               # little saturation


def well_profiles(dataset_dir):
    """Per-well mean of per-crop statistics (mean, std, mean log intensity per channel)."""
    stats, metas = [], []
    for images, meta in iterate_records(dataset_dir, 256):
        x = images.astype(np.float32)
        stats.append(np.concatenate([x.mean((2, 3)), x.std((2, 3)), np.log1p(x).mean((2, 3))], axis=1))
        metas.append(meta)
    meta = pd.concat(metas)
    keys = ["experiment", "plate", "well"]
    profiles = pd.DataFrame(np.concatenate(stats)).groupby([meta[k].to_numpy() for k in keys]).mean()
    wells = meta.groupby(keys)[["perturbation", "is_control"]].first()
    return profiles.to_numpy(), wells.reset_index()


def center_on_controls(profiles, wells):
    out = np.empty_like(profiles)
    for _, rows in wells.groupby("experiment").groups.items():
        rows = np.asarray(rows)
        controls = profiles[rows[wells.is_control.to_numpy()[rows]]]
        out[rows] = (profiles[rows] - controls.mean(0)) / (controls.std(0) + 1e-6)
    return out


def experiment_share(profiles, experiments):
    """Fraction of the (standardised) variance explained by the experiment."""
    x = (profiles - profiles.mean(0)) / (profiles.std(0) + 1e-9)
    between = sum((experiments == e).sum() * (x[experiments == e].mean(0) ** 2).sum() for e in np.unique(experiments))
    return between / (x ** 2).sum()


def test_same_complex_genes_look_alike(screen):
    profiles, wells = well_profiles(screen)
    corrected = center_on_controls(profiles, wells)
    genes = ~wells.is_control.to_numpy()
    per_gene = pd.DataFrame(corrected[genes]).groupby(wells.perturbation[genes].to_numpy()).mean()
    unit = per_gene.to_numpy() / np.linalg.norm(per_gene.to_numpy(), axis=1, keepdims=True)
    cos = pd.DataFrame(unit @ unit.T, index=per_gene.index, columns=per_gene.index)
    pairs = pd.read_csv(screen / "annotations" / "SyntheticComplex.txt").to_numpy()
    same_complex = np.mean([cos.loc[a, b] for a, b in pairs])
    all_pairs = cos.to_numpy()[np.triu_indices(len(cos), 1)].mean()
    assert same_complex > all_pairs + 0.3, (same_complex, all_pairs)

    truth = json.loads((screen / "ground_truth.json").read_text())
    norms = np.linalg.norm(per_gene, axis=1)
    null = per_gene.index.isin(truth["null_genes"])
    assert norms[null].mean() < 0.5 * norms[~null].mean()  # null genes look like controls


def test_batch_effects_need_correction(screen, tmp_path):
    profiles, wells = well_profiles(screen)
    genes = ~wells.is_control.to_numpy()
    experiments = wells.experiment.to_numpy()[genes]
    raw = experiment_share(profiles[genes], experiments)
    corrected = experiment_share(center_on_controls(profiles, wells)[genes], experiments)
    assert raw > 0.3 and corrected < raw / 4, (raw, corrected)

    flat = generate_screen(tmp_path / "flat", seed=0, batch_effect_size=0.0, **BIOLOGY)
    profiles, wells = well_profiles(flat)
    genes = ~wells.is_control.to_numpy()
    flat_share = experiment_share(profiles[genes], wells.experiment.to_numpy()[genes])
    assert flat_share < 0.1, flat_share  # the differences were the batch effects


def test_cli_overrides_and_preview(tmp_path):
    out = tmp_path / "cli"
    synthetic_screen.main(["--out", str(out), "--preset", "tiny", "--seed", "3", "--num-channels", "8",
                           "--num-experiments", "1", "--preview"])
    ds = open_dataset(out)
    assert ds.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi", "DNA_2", "ER_2"]
    assert ds.manifest["params"]["seed"] == 3 and list(ds.manifest["experiments"]) == ["SYN-01"]
    assert (out / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("params, message", [
    (dict(site_size=100, crop_size=32), "not a multiple"),
    (dict(bogus=1), "unknown screen parameters \\['bogus'\\]"),
    (dict(preset="huge"), "unknown preset"),
    (dict(num_pathways=5, num_complexes=3), "num_pathways"),
])
def test_bad_parameters(tmp_path, params, message):
    params = {"preset": "tiny", **params}
    with pytest.raises(ValueError, match=message):
        generate_screen(tmp_path / "x", **params)
