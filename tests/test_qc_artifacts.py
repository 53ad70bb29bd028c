"""Image-quality artefacts of the synthetic screen: per-crop `qc` labels, rates, and that each artefact
does to its crop what its name says (compared with the same crop rendered without artefacts)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data import cell_renderer
from data.synthetic_screen import generate_screen
from maejax.input_pipeline import iterate_records

FRACTION = 0.5


def _crops(path):
    images, metas = zip(*iterate_records(path, 1024))
    return np.concatenate(images), pd.concat(metas, ignore_index=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny screen without and with artefacts on half of the crops (no batch effects: an
    out-of-focus plate would already be blurred)."""
    root = tmp_path_factory.mktemp("qc")
    clean = _crops(generate_screen(root / "clean", preset="tiny", seed=5, batch_effect_size=0.0))
    spoiled = _crops(generate_screen(root / "spoiled", preset="tiny", seed=5, artifact_fraction=FRACTION,
                                     batch_effect_size=0.0))
    return clean, spoiled


def test_qc_labels_and_rate(pair):
    (_, clean_meta), (_, meta) = pair
    assert set(clean_meta.qc) == {"ok"}
    assert set(meta.qc) == set(cell_renderer.QC_LABELS)             # every kind occurs
    spoiled = (meta.qc != "ok").mean()
    n = len(meta)
    assert abs(spoiled - FRACTION) < 4 * np.sqrt(FRACTION * (1 - FRACTION) / n), (spoiled, n)
    assert (meta.num_cells[meta.qc == "empty"] == 0).all()
    same = ["experiment", "plate", "well", "tile", "perturbation"]
    assert clean_meta[same].equals(meta[same])


def test_only_spoiled_crops_change(pair):
    (clean, _), (images, meta) = pair
    ok = (meta.qc == "ok").to_numpy()
    np.testing.assert_array_equal(images[ok], clean[ok])            # artefacts draw from their own stream
    changed = (images[~ok] != clean[~ok]).reshape((~ok).sum(), -1).mean(axis=1)
    assert (changed > 0.05).all(), changed.min()


def _high_frequency(x):
    x = x.astype(np.float32)
    return np.abs(np.diff(x, axis=-1)).mean(axis=(1, 2, 3))


def test_each_artifact_has_its_signature(pair):
    (clean, _), (images, meta) = pair
    kind = meta.qc.to_numpy()
    blur = kind == "blur"
    assert (_high_frequency(images[blur]) < 0.8 * _high_frequency(clean[blur])).all()
    sat = kind == "saturation"
    assert ((images[sat] == 255).mean(axis=(1, 2, 3)) > (clean[sat] == 255).mean(axis=(1, 2, 3)) + 0.01).all()
    debris = kind == "debris"
    brighter = images[debris].astype(np.int16) - clean[debris]
    assert ((brighter > 50).mean(axis=(1, 2, 3)) > 0.01).all()      # a bright particle covers part of the crop
    empty = kind == "empty"
    # Background and noise only: dimmer than the same crop with its cells, nothing bright.
    assert (images[empty].mean(axis=(1, 2, 3)) < clean[empty].mean(axis=(1, 2, 3))).all()
    assert (np.percentile(images[empty], 99, axis=(1, 2, 3)) < 60).all()


def test_bad_artifact_parameters(tmp_path):
    with pytest.raises(ValueError, match="artifact_fraction must be in \\[0, 1\\], got 1.5"):
        generate_screen(tmp_path / "x", preset="tiny", artifact_fraction=1.5)
    with pytest.raises(ValueError, match="unknown image artefact 'smudge'"):
        cell_renderer.add_artifact(np.zeros((2, 8, 8), np.float32), "smudge", np.random.default_rng(0))
