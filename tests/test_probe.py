"""Block-wise linear probes: ridge equals its closed form, logistic learns, splits hold groups out."""
import numpy as np
import pandas as pd
import pytest

from eval import probe

CLASSES = 4


@pytest.fixture(scope="module")
def stack():
    """3 blocks with increasing class signal, 300 samples from 100 wells."""
    rng = np.random.default_rng(0)
    n, d = 300, 12
    labels = rng.integers(0, CLASSES, n)
    centers = rng.standard_normal((CLASSES, d))
    blocks = [rng.standard_normal((n, d)) * 2 + s * centers[labels] for s in (0.0, 0.7, 2.5)]
    meta = pd.DataFrame({"well": np.arange(n) // 3})
    train, val, test = probe.split_by_group(meta, "well", seed=1)
    return np.stack(blocks).astype(np.float32), labels, train, val, test


def _balanced(y, pred):
    return np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


def _numpy_ridge_val(x, y, train, val, l2):
    mu, sd = x[train].mean(0), x[train].std(0)
    z = (x - mu) / sd
    onehot = np.eye(CLASSES)[y[train]]
    prior = onehot.mean(0)
    w = np.linalg.solve(z[train].T @ z[train] + l2 * train.sum() * np.eye(x.shape[1]),
                        z[train].T @ (onehot - prior))
    return _balanced(y[val], np.argmax(z[val] @ w + prior, axis=1))


def test_ridge_equals_closed_form_for_every_l2(stack):
    feats, labels, train, val, test = stack
    grid = (1e-3, 1e-1, 10.0)
    report = probe.ridge_probes(feats, labels, train, val, test, l2_grid=grid)
    for b in range(3):
        x = feats[b].astype(np.float64)
        expected = [_numpy_ridge_val(x, labels, train, val, l2) for l2 in grid]
        np.testing.assert_allclose(report.val_by_l2[b], expected, atol=1e-6)


def test_ridge_dual_form_when_features_outnumber_samples(stack):
    feats, labels, train, val, test = stack
    wide = np.concatenate([feats, np.random.default_rng(2).standard_normal((3, 300, 300))], axis=2)
    wide = wide.astype(np.float32)
    report = probe.ridge_probes(wide, labels, train, val, test, l2_grid=(1.0,))
    expected = _numpy_ridge_val(wide[2].astype(np.float64), labels, train, val, 1.0)
    assert report.val[2] == pytest.approx(expected, abs=1e-6)


def test_best_block_is_the_most_separable(stack):
    feats, labels, train, val, test = stack
    report = probe.ridge_probes(feats, labels, train, val, test)
    assert report.best_block == 2
    assert report.test[0] < 0.45 < 0.9 < report.test[2]     # chance is 0.25
    d = report.to_dict()
    assert d["best_block"] == 2 and len(d["test"]) == 3 and d["best_block_test"] == report.test[2]


def test_logistic_probes_train_all_blocks_together(stack):
    feats, labels, train, val, test = stack
    report = probe.logistic_probes(feats, labels, train, val, test, l2_grid=(1e-4, 1e-1), steps=150,
                                   learning_rate=0.05)
    ridge = probe.ridge_probes(feats, labels, train, val, test)
    assert report.val_by_l2.shape == (3, 2)
    assert report.best_block == 2 and report.test[2] > 0.9
    assert abs(report.test[2] - ridge.test[2]) < 0.1
    chunked = probe.logistic_probes(feats, labels, train, val, test, l2_grid=(1e-4, 1e-1), steps=150,
                                    learning_rate=0.05, blocks_per_step=2)
    np.testing.assert_allclose(chunked.val_by_l2, report.val_by_l2, atol=1e-6)


def test_minibatch_logistic_probe(stack):
    feats, labels, train, val, test = stack
    report = probe.logistic_probes(feats[2:], labels, train, val, test, l2_grid=(1e-4,), steps=200,
                                   learning_rate=0.05, batch_size=64)
    assert report.test[0] > 0.85


def test_balanced_accuracy_weights_classes_equally():
    y = np.array([0, 0, 0, 0, 1, 2, 2])
    pred = np.array([0, 0, 0, 0, 0, 2, 1])
    assert float(probe.balanced_accuracy(y, pred, 5)) == pytest.approx((1 + 0 + 0.5) / 3)


def test_split_keeps_groups_whole():
    meta = pd.DataFrame({"experiment": np.repeat(["e1", "e2", "e3", "e4", "e5"], 4),
                         "well": np.tile(["A01", "A02", "B01", "B02"], 5)})
    train, val, test = probe.split_by_group(meta, "experiment", fractions=(0.6, 0.2, 0.2), seed=3)
    assert (train.astype(int) + val + test == 1).all()
    for mask in (train, val, test):
        assert mask.any()
        assert not set(meta.experiment[mask]) & set(meta.experiment[~mask])
    assert train.sum() == 12
    wells = probe.split_by_group(meta, ["experiment", "well"], seed=0)
    assert sum(m.sum() for m in wells) == 20 and wells[0].sum() == 12


def test_bad_inputs_raise(stack):
    feats, labels, train, val, test = stack
    with pytest.raises(ValueError, match="overlap"):
        probe.ridge_probes(feats, labels, train, train, test)
    with pytest.raises(ValueError, match="num_blocks, N, D"):
        probe.ridge_probes(feats[0], labels, train, val, test)
    with pytest.raises(ValueError, match="no column"):
        probe.split_by_group(pd.DataFrame({"a": [1, 2, 3]}), "plate")
