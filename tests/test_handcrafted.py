"""Hand-crafted baseline features: exact intensity statistics, texture, nuclei shape, no NaNs."""
import numpy as np
import pytest

from eval import handcrafted

H = W = 64


def _discs(centers_radii, shape=(H, W), fg=200, bg=10):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, bg, np.uint8)
    for cy, cx, ry, rx in centers_radii:
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = fg
    return img


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, H, W), dtype=np.uint8)
    images[0] = 0                                                       # empty
    images[1] = 77                                                      # constant
    images[2, 0] = _discs([(15, 15, 5, 5), (40, 45, 6, 6), (50, 12, 4, 4)])   # 3 round nuclei
    images[3, 0] = _discs([(30, 30, 3, 12)])                            # 1 elongated nucleus
    feats, names = handcrafted.handcrafted_features(images, ["dna", "rna", "actin"])
    return images, feats, {n: i for i, n in enumerate(names)}


def test_shapes_names_and_no_nans(batch):
    images, feats, col = batch
    assert feats.shape == (5, len(col)) and feats.dtype == np.float32
    assert "dna_object_count" in col and "actin_correlation_d4" in col
    assert np.isfinite(feats).all()
    assert (feats[0] == 0).all()                        # empty image: every feature is zero
    assert feats[1, col["rna_intensity_mean"]] == pytest.approx(77 / 255)
    assert feats[1, col["rna_intensity_std"]] == 0 and feats[1, col["dna_object_count"]] == 0


def test_intensity_statistics_are_exact(batch):
    images, feats, col = batch
    x = images.astype(np.float64) / 255
    for c, name in enumerate(["dna", "rna", "actin"]):
        np.testing.assert_allclose(feats[:, col[f"{name}_intensity_mean"]], x[:, c].mean((1, 2)), atol=1e-6)
        np.testing.assert_allclose(feats[:, col[f"{name}_intensity_std"]], x[:, c].std((1, 2)), atol=1e-6)
        for q in handcrafted.PERCENTILES:
            np.testing.assert_allclose(feats[:, col[f"{name}_intensity_p{q}"]],
                                       np.percentile(x[:, c], q, axis=(1, 2)), atol=1e-6)


def test_texture_matches_direct_cooccurrence(batch):
    images, feats, col = batch
    x = images[4, 1].astype(np.float64) / 255
    for d in handcrafted.OFFSETS:
        pairs = [(x[:, :-d], x[:, d:]), (x[:-d, :], x[d:, :])]
        contrast = np.mean([np.mean((a - b) ** 2) for a, b in pairs])
        corr = np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])
        assert feats[4, col[f"rna_contrast_d{d}"]] == pytest.approx(contrast, rel=1e-4)
        assert feats[4, col[f"rna_correlation_d{d}"]] == pytest.approx(corr, abs=1e-4)
    y = x.reshape(32, 2, 32, 2).mean((1, 3))
    energy = np.mean(np.diff(y, axis=1) ** 2) + np.mean(np.diff(y, axis=0) ** 2)
    assert feats[4, col["rna_gradient_energy_s2"]] == pytest.approx(energy, rel=1e-4)


def test_nuclei_count_area_and_eccentricity(batch):
    images, feats, col = batch
    assert feats[2, col["dna_object_count"]] == 3
    areas = np.array([np.pi * 25, np.pi * 36, np.pi * 16]) / (H * W)
    assert feats[2, col["dna_area_mean"]] == pytest.approx(areas.mean(), rel=0.1)
    assert feats[3, col["dna_object_count"]] == 1
    assert feats[2, col["dna_eccentricity_mean"]] < 0.4 < 0.9 < feats[3, col["dna_eccentricity_mean"]]
    assert 0.6 < feats[2, col["dna_extent_mean"]] <= 1.0   # a disc fills pi/4 of its box


def test_objects_never_connect_across_images():
    """Two images whose discs touch the same pixels must still count one object each."""
    img = _discs([(32, 32, 8, 8)])
    feats, names = handcrafted.handcrafted_features(np.stack([img, img])[:, None])
    assert feats[:, names.index("ch0_object_count")].tolist() == [1, 1]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        handcrafted.handcrafted_features(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="channel names"):
        handcrafted.handcrafted_features(np.zeros((2, 3, 64, 64), np.uint8), ["a"])


def test_features_are_per_image_across_internal_chunks():
    """Batches larger than the internal chunk give each image the features it gets alone."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (handcrafted.CHUNK_IMAGES + 40, 2, 16, 16), dtype=np.uint8)
    whole, _ = handcrafted.handcrafted_features(images)
    parts = [handcrafted.handcrafted_features(images[i:i + 7])[0] for i in range(0, len(images), 7)]
    np.testing.assert_allclose(whole, np.concatenate(parts), rtol=1e-5, atol=1e-6)
