"""The synthetic screen: layout, determinism, ground truth, and that the planted biology and batch effects are real."""
from __future__ import annotations

import collections
import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest

from data import cell_renderer, synthetic_screen, workers as workers_lib
from data.arrayrecord_writer import shard_file_names
from data.synthetic_screen import CONTROL_LABEL, generate_screen, tile_site
from maejax.input_pipeline import iterate_records, open_dataset

# Small but with enough genes and experiments for statistics: ~40 genes, ~130 sites, a few s to build.
BIOLOGY = dict(preset="tiny", pathways_per_family=1, complexes_per_pathway=2, complex_size_min=3,
               complex_size_max=4, num_null_genes=4, num_experiments=3, control_wells=6, site_size=96,
               crop_size=48, annotation_missing=0.0, annotation_false=0.0)


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
        assert sorted(wells[wells != CONTROL_LABEL]) == genes      # every gene on every plate (one gene set)
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
    assert list(complex_pairs.columns) == ["entity1", "entity2"]
    expected = {tuple(sorted((a, b))) for genes in truth["complexes"].values()
                for a in genes for b in genes if a < b}
    assert {tuple(p) for p in truth["true_pairs"]["SyntheticComplex"]} == expected
    pathway_true = {tuple(p) for p in truth["true_pairs"]["SyntheticPathway"]}
    assert pathway_true and not pathway_true & expected          # no double counting
    for gene in truth["null_genes"]:
        assert not np.any(truth["genes"][gene]["effect"]) and truth["genes"][gene]["family"] is None
    assert len(truth["experiments"]) == 2 and len(truth["experiments"]["SYN-01"]["gain"]) == 6
    families = collections.Counter(g["family"] for g in truth["genes"].values() if g["family"])
    assert set(families) == set(synthetic_screen.FAMILIES) and len(set(families.values())) == 1  # equal shares
    oracle = pd.read_parquet(tiny / "oracle.parquet")
    assert len(oracle) == open_dataset(tiny).metadata.groupby(["experiment", "plate", "well"]).ngroups
    assert [c[2:] for c in oracle.columns if c.startswith("z_")] == truth["phenotype_features"]


def test_annotation_noise_rates():
    """The written tables miss `annotation_missing` of the true pairs and list `annotation_false` false ones."""
    cfg = synthetic_screen.ScreenConfig()
    biology = synthetic_screen.make_biology(cfg, np.random.default_rng([0, 0]))
    true = synthetic_screen._pairs(biology.complexes().values())
    written = synthetic_screen.noisy_pairs(true, biology.genes, cfg, np.random.default_rng(1))
    listed_true = set(written) & set(true)
    missing = 1 - len(listed_true) / len(true)
    false = 1 - len(listed_true) / len(written)
    n = len(true)
    assert abs(missing - cfg.annotation_missing) < 3 * np.sqrt(0.2 * 0.8 / n), missing
    assert abs(false - cfg.annotation_false) < 0.01, false
    exact = synthetic_screen.noisy_pairs(true, biology.genes, dataclasses.replace(
        cfg, annotation_missing=0.0, annotation_false=0.0), np.random.default_rng(1))
    assert exact == sorted(true)


def test_default_screen_scale():
    """>= 400 genes (fast: >= 200), annotated pairs well under 5% of all pairs, plates that fit."""
    for preset, least in (("demo", 400), ("fast", 200)):
        cfg = synthetic_screen.ScreenConfig(**synthetic_screen.PRESETS[preset])
        biology = synthetic_screen.make_biology(cfg, np.random.default_rng([0, 0]))
        g = len(biology.genes)
        complexes = biology.complexes()
        pathway_genes = {p: [x for k in ks for x in complexes[k]] for p, ks in biology.pathways().items()}
        pairs = set(synthetic_screen._pairs(complexes.values())) | set(synthetic_screen._pairs(pathway_genes.values()))
        assert g >= least, (preset, g)
        assert len(pairs) / (g * (g - 1) / 2) < 0.04, preset
        sites = synthetic_screen.make_sites(cfg, biology, np.random.default_rng([0, 2]))
        assert len(sites.z) >= g * cfg.num_experiments   # every gene in every experiment


def test_same_seed_gives_identical_records(tmp_path, tiny):
    again = generate_screen(tmp_path / "again", preset="tiny", seed=5)
    for name in shard_file_names(2):
        assert (again / name).read_bytes() == (tiny / name).read_bytes()
    other = generate_screen(tmp_path / "other", preset="tiny", seed=6)
    assert (other / shard_file_names(2)[0]).read_bytes() != (tiny / shard_file_names(2)[0]).read_bytes()


def test_worker_processes_give_identical_output(tmp_path, screen, monkeypatch):
    monkeypatch.setattr(workers_lib, "MIN_CHUNKS_PER_WORKER", 1)   # a pool even for this small screen
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
    # Simple per-crop statistics read only some families (not spatial organisation or co-localisation).
    assert same_complex > all_pairs + 0.15, (same_complex, all_pairs)



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
    synthetic_screen.main(["--out", str(out), "--preset", "tiny", "--seed", "3", "--num_channels", "8",
                           "--num_experiments", "1", "--preview"])
    ds = open_dataset(out)
    assert ds.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi", "DNA_2", "ER_2"]
    assert ds.manifest["params"]["seed"] == 3 and list(ds.manifest["experiments"]) == ["SYN-01"]
    assert (out / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("params, message", [
    (dict(site_size=100, crop_size=32), "not a multiple"),
    (dict(bogus=1), "unknown screen parameters \\['bogus'\\]"),
    (dict(preset="huge"), "unknown preset"),
    (dict(pathways_per_family=0), "pathways_per_family"),
    (dict(plates_per_experiment=3, pathways_per_family=30, complex_size_min=8, complex_size_max=8),
     "multiple of"),
])
def test_bad_parameters(tmp_path, params, message):
    params = {"preset": "tiny", **params}
    with pytest.raises(ValueError, match=message):
        generate_screen(tmp_path / "x", **params)


# --- each phenotype family produces its intended signal -------------------------------------------

def render_signal(z_overrides: dict[str, float], sites: int = 6, seed: int = 0):
    """Noise-free stain images (sites, C, 128, 128) and cells of sites whose parameters are 0 (control)
    except `z_overrides`, with no batch effect."""
    cfg = synthetic_screen.ScreenConfig(batch_effect_size=0.0)
    acq = synthetic_screen.make_acquisition(cfg, np.random.default_rng(0))
    names = synthetic_screen.feature_names(cfg.num_channels)
    z = np.zeros((sites, len(names)))
    for k, v in z_overrides.items():
        z[:, names.index(k)] = v
    fraction = np.full(sites, 0.2)
    pheno, intensity = synthetic_screen.site_phenotypes(cfg, z, fraction, acq, np.zeros(sites, int))
    rng = np.random.default_rng(seed)
    cells = cell_renderer.sample_cells(pheno, cfg.site_size, rng)
    compartments = cell_renderer.render_compartments(cells, sites, cfg.site_size)
    stains = cell_renderer.mix_stains(compartments, pheno, cfg.num_channels, rng) * intensity[:, :, None, None]
    return stains, compartments, cells


def channel(name):
    return cell_renderer.STAINS.index(name)


def test_intensity_family_moves_one_stain_level():
    base, _, _ = render_signal({})
    up, _, _ = render_signal({"intensity_Mito": 3.0})
    ratio = up.mean((0, 2, 3)) / base.mean((0, 2, 3))
    assert abs(ratio[channel("Mito")] - np.exp(3 * 0.06)) < 0.01
    assert np.allclose(np.delete(ratio, channel("Mito")), 1.0, atol=1e-6)


def test_morphology_family_changes_nucleus_size():
    _, small, _ = render_signal({"nucleus_size": -3.0})
    _, large, _ = render_signal({"nucleus_size": 3.0})
    nucleus = cell_renderer.COMPARTMENTS.index("nucleus")
    assert large[:, nucleus].mean() > 1.3 * small[:, nucleus].mean()


def test_relocalisation_keeps_total_stain():
    """More RNA in the nucleus, same RNA in all: the nuclear share rises at constant total intensity."""
    base, comp, _ = render_signal({})
    moved, comp_moved, _ = render_signal({"rna_nuclear_fraction": 4.0})
    nucleus = cell_renderer.COMPARTMENTS.index("nucleus")
    rna = cell_renderer.COMPARTMENTS.index("rna")
    share = lambda c: (c[:, rna] * (c[:, nucleus] > 0.5)).sum() / c[:, rna].sum()
    assert share(comp_moved) > share(comp) + 0.1
    assert abs(comp_moved[:, rna].sum() / comp[:, rna].sum() - 1) < 0.02


def test_subpopulation_matches_the_mean_of_a_uniform_shift():
    """A share of cells in another state moves the all-cell mean of log nucleus size by the same amount
    as a uniform shift, but its spread grows."""
    shift = 3.0 * 0.03
    _, _, control = render_signal({}, sites=12)
    _, _, sub = render_signal({"subpop_nucleus": 3.0}, sites=12)
    _, _, uniform = render_signal({"nucleus_size": shift / 0.04}, sites=12)
    log_size = lambda c: np.log(np.sqrt(c.fields["nucleus_a"] * c.fields["nucleus_b"]))
    d_sub = log_size(sub).mean() - log_size(control).mean()
    d_uniform = log_size(uniform).mean() - log_size(control).mean()
    assert abs(d_sub - shift) < 0.03 and abs(d_uniform - shift) < 0.03, (d_sub, d_uniform)
    assert log_size(sub).std() > 1.3 * log_size(uniform).std()


def test_spatial_family_clusters_cells():
    def nearest(c):
        from scipy.spatial import cKDTree
        d = []
        for s in np.unique(c.site):
            pts = np.stack([c.x[c.site == s], c.y[c.site == s]], 1)
            d.append(cKDTree(pts).query(pts, k=2)[0][:, 1])
        return np.concatenate(d)
    _, _, grid = render_signal({"clustering": -2.0})
    _, _, colonies = render_signal({"clustering": 8.0})
    assert nearest(colonies).mean() < 0.85 * nearest(grid).mean()
    _, _, aligned = render_signal({"alignment": 8.0})
    axis_spread = lambda c: np.mean([np.abs(np.mean(np.exp(2j * c.fields["nucleus_angle"][c.site == s])))
                                     for s in np.unique(c.site)])
    assert axis_spread(aligned) > axis_spread(grid) + 0.3


def test_colocalisation_changes_correlation_not_level():
    base, comp, _ = render_signal({})
    coloc, comp_c, _ = render_signal({"coloc_mito_er": 8.0})
    mito, er = channel("Mito"), channel("ER")
    inside = comp[:, cell_renderer.COMPARTMENTS.index("mito")] > 0.05
    corr = lambda x: np.corrcoef(x[:, mito][inside], x[:, er][inside])[0, 1]
    assert corr(coloc) > corr(base) + 0.1, (corr(coloc), corr(base))
    assert abs(coloc[:, mito].mean() / base[:, mito].mean() - 1) < 0.05


def test_oracle_of_each_family_recovers_its_genes(screen):
    """On the oracle (true well parameters), a family's columns move for that family's genes only."""
    truth = json.loads((screen / "ground_truth.json").read_text())
    oracle = pd.read_parquet(screen / "oracle.parquet")
    cols = [c for c in oracle.columns if c.startswith("z_")]
    params = truth["phenotype_params"]
    gene_means = oracle.groupby("perturbation")[cols].mean()
    for family in truth["families"]:
        fam_cols = [f"z_{k}" for k, p in params.items() if p["family"] == family]
        strength = np.sqrt((gene_means[fam_cols] ** 2).mean(axis=1))
        members = [g for g, v in truth["genes"].items() if v["family"] == family]
        others = [g for g, v in truth["genes"].items() if v["family"] != family]
        assert strength[members].min() > strength[others].max(), family
