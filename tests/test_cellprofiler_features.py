"""CellProfiler-grade features (eval/cellprofiler.py): objects of known size and intensity are found and
measured, crops without cells give NaN that selection imputes, pycytominer-style selection drops what it
should, a crop's features do not depend on the crops measured with it, the screen measures a subset of
crops per well and the spawn pool returns the same values."""
from __future__ import annotations

import numpy as np
import pytest

from data import workers as workers_lib
from eval import cellprofiler as cp

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi"]
NUCLEI = ((20, 20, 6), (44, 42, 5))   # centre y, centre x, radius
CELL_RADIUS = 12


def _disc(cy, cx, r, shape=(64, 64)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _two_cells(channels=CHANNELS, dna=200, body=90, bg=10):
    """Two round cells (radius 12) with round nuclei (radii 6 and 5) of uniform intensity."""
    img = np.full((len(channels), 64, 64), bg, np.uint8)
    for cy, cx, r in NUCLEI:
        img[1:][:, _disc(cy, cx, CELL_RADIUS)] = body
        img[0][_disc(cy, cx, r)] = dna
    return img


@pytest.fixture(scope="module")
def measured():
    noise = np.random.default_rng(0).normal(20, 3, (6, 64, 64)).clip(0, 255).astype(np.uint8)
    images = np.stack([_two_cells(), np.zeros((6, 64, 64), np.uint8), np.full((6, 64, 64), 40, np.uint8), noise])
    feats, names = cp.cellprofiler_features(images, CHANNELS)
    return feats, {n: i for i, n in enumerate(names)}


def test_known_objects_are_counted_and_measured(measured):
    feats, col = measured
    assert feats.dtype == np.float32 and feats.shape == (4, len(col))
    assert feats[0, col["Count_Nuclei"]] == 2
    nuclei, _ = cp.segment(_two_cells()[None], CHANNELS)
    dna = _two_cells()[0]
    for cy, cx, r in NUCLEI:                                      # each disc found within ~1 px of its edge
        k = nuclei[0, cy, cx]
        assert k > 0 and np.pi * r ** 2 <= (nuclei[0] == k).sum() <= np.pi * (r + 1.5) ** 2
    ids = [nuclei[0, cy, cx] for cy, cx, _ in NUCLEI]
    # cp-measure's values are exact for the segmented objects; the crop's value is their median
    assert feats[0, col["Nuclei_AreaShape_Area"]] == np.median([(nuclei[0] == k).sum() for k in ids])
    means = [dna[nuclei[0] == k].mean() / 255 for k in ids]
    assert feats[0, col["Nuclei_Intensity_MeanIntensity_DNA"]] == pytest.approx(np.median(means), rel=1e-5)
    assert feats[0, col["Nuclei_Intensity_MedianIntensity_DNA"]] == pytest.approx(200 / 255, rel=1e-6)
    assert feats[0, col["Nuclei_Intensity_MaxIntensity_DNA"]] == pytest.approx(200 / 255, rel=1e-6)
    # cells: the lower of three Otsu classes on the smoothed bodies, so the edge blur joins them (+1 px)
    assert np.pi * CELL_RADIUS ** 2 <= feats[0, col["Cells_AreaShape_Area"]] <= np.pi * (CELL_RADIUS + 1) ** 2
    assert feats[0, col["Cytoplasm_Intensity_MedianIntensity_ER"]] == pytest.approx(90 / 255, rel=0.02)
    assert feats[0, col["Nuclei_AreaShape_Eccentricity"]] < 0.3              # round
    assert 2 * 5.5 <= feats[0, col["Nuclei_AreaShape_MaxFeretDiameter"]] <= 2 * 7.0
    for family in ("Nuclei_Texture_", "Cytoplasm_Texture_", "Cells_RadialDistribution_",
                   "Image_Correlation_Pearson_DNA_ER", "Image_Correlation_Manders_"):
        assert any(n.startswith(family) for n in col), family
    assert not any(p in n for n in col for p in cp.POSITIONAL)                # no object positions


def test_crops_without_cells_give_nan_and_selection_imputes(measured):
    feats, col = measured
    for row in (1, 2, 3):                                                     # black, flat, noise
        assert feats[row, col["Count_Nuclei"]] == 0
        others = np.delete(feats[row], col["Count_Nuclei"])
        assert np.isnan(others).all()
    rng = np.random.default_rng(0)
    x = np.repeat(feats[:1], 40, axis=0) * rng.uniform(0.5, 1.5, (40, feats.shape[1]))
    x[:, col["Count_Nuclei"]] = rng.integers(0, 9, 40)
    x[[3, 17, 30]] = feats[1]                                                  # 7.5% empty crops
    sel, names = cp.select_features(x, list(col))
    assert np.isfinite(sel).all() and sel.shape == (40, len(names)) and len(names) > 10


def test_select_features_drops_constant_correlated_sparse_and_nan_columns():
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(3, 200))
    x = np.stack([a, 2 * a + 1, b, np.full(200, 3.0), c, b.copy(), np.repeat([0.0, 1.0], [199, 1])], 1)
    x[:20, 4] = np.nan                                   # 10% NaN: dropped
    x[:5, 2] = np.nan                                    # 2.5% NaN: kept, imputed with the median
    names = ["a", "a2", "b", "const", "c_nan", "b_copy", "rare"]
    sel, kept = cp.select_features(x, names)
    assert kept in (["a", "b"], ["a2", "b"], ["a", "b_copy"], ["a2", "b_copy"])
    assert len({"a", "a2"} & set(kept)) == 1 and len({"b", "b_copy"} & set(kept)) == 1
    j = kept.index("b") if "b" in kept else None
    if j is not None:
        assert np.allclose(sel[:5, j], np.median(b[5:]))
    sel2, kept2 = cp.select_features(x, names, corr_threshold=1.01)       # correlation step off
    assert set(kept2) == {"a", "a2", "b", "b_copy"}
    z = cp.standardize(sel2)
    assert np.allclose(z.mean(0), 0, atol=1e-6) and np.allclose(z.std(0), 1, atol=1e-5)


def test_other_channel_names_and_a_single_channel():
    img = _two_cells(channels=["a", "b"])
    feats, names = cp.cellprofiler_features(img[None], ["a", "b"])            # nuclei from the first
    col = {n: i for i, n in enumerate(names)}
    assert feats[0, col["Count_Nuclei"]] == 2 and "Image_Correlation_Pearson_a_b" in col
    feats1, names1 = cp.cellprofiler_features(img[None, :1], ["a"])
    assert feats1[0, names1.index("Count_Nuclei")] == 2
    with pytest.raises(ValueError, match="channel names"):
        cp.cellprofiler_features(img[None], ["a"])


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from data.synthetic_screen import generate_screen
    return generate_screen(tmp_path_factory.mktemp("cp") / "screen", preset="tiny", seed=2)


def test_a_crop_is_measured_the_same_alone_or_in_a_batch(screen):
    from maejax.input_pipeline import open_dataset
    ds = open_dataset(screen)
    images = ds.reader.read_many(range(7))
    together, names = cp.cellprofiler_features(images, ds.channels)
    alone = np.concatenate([cp.cellprofiler_features(images[i:i + 1], ds.channels)[0] for i in (0, 4, 6)])
    np.testing.assert_allclose(alone, together[[0, 4, 6]], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (together[:, names.index("Count_Nuclei")] > 0).sum() >= 5        # 32 x 32 crops, 2-6 cells


@pytest.mark.filterwarnings("ignore::RuntimeWarning")        # cp-measure: 0/0 in an empty ring sector
def test_shared_radial_geometry_gives_the_library_values(screen):
    from maejax.input_pipeline import open_dataset
    ds = open_dataset(screen)
    images = ds.reader.read_many(range(4))
    _, cells = cp.segment(images, ds.channels)
    core, _ = cp._functions()
    labels = cells[0]
    plain = [core["radial_distribution"](labels, images[0, c] / 255.0) for c in range(3)]
    with cp._shared_radial_geometry():
        shared = [core["radial_distribution"](labels, images[0, c] / 255.0) for c in range(3)]
    for p, s in zip(plain, shared):
        assert p.keys() == s.keys()
        for k in p:
            np.testing.assert_array_equal(p[k], s[k])


def test_screen_subset_and_pool(screen, monkeypatch):
    import pandas as pd
    monkeypatch.setattr(workers_lib, "MIN_CHUNKS_PER_WORKER", 1)   # a pool even for this small screen
    meta = pd.read_parquet(screen / "metadata.parquet")
    wells = meta.groupby(["experiment", "plate", "well"]).ngroups
    feats, rows, names = cp.cellprofiler_screen(str(screen), max_crops_per_well=1, workers=1, select=False)
    assert len(rows) == wells == len(feats) and rows.groupby(["experiment", "plate", "well"]).size().max() == 1
    assert list(rows["record_id"]) == sorted(rows["record_id"])
    pooled, _, _ = cp.cellprofiler_screen(str(screen), max_crops_per_well=1, workers=2, select=False)
    np.testing.assert_allclose(pooled, feats, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert list(cp.crops_per_well(meta, 2)) == list(np.flatnonzero(
        meta.groupby(["experiment", "plate", "well"]).cumcount() < 2))
    assert len(cp.crops_per_well(meta, None)) == len(meta)


def test_optional_families_granularity_and_zernike(monkeypatch):
    monkeypatch.setitem(cp.MEASUREMENTS, "granularity", ("Cells",))
    monkeypatch.setitem(cp.MEASUREMENTS, "zernike", ("Nuclei",))
    img = np.stack([_two_cells(), np.roll(_two_cells(), 3, axis=2)])
    feats, names = cp.cellprofiler_features(img, CHANNELS)
    col = {n: i for i, n in enumerate(names)}
    assert {"Cells_Granularity_1_Mito", "Cells_Granularity_2_DNA", "Nuclei_AreaShape_Zernike_0_0"} <= set(col)
    assert np.isfinite(feats[:, col["Cells_Granularity_1_Mito"]]).all()
    alone = cp.cellprofiler_features(img[1:], CHANNELS)[0]            # Zernike per crop: slot-independent
    np.testing.assert_allclose(alone[0], feats[1], rtol=1e-5, atol=1e-6, equal_nan=True)
