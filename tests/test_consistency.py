"""Replicate consistency: EFAAR's benchmark equals the golden; KS/CvM respond to replicate signal."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval import consistency
from tests.reference_data import GOLDEN, require


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(require(GOLDEN) / "golden.npz"))


def test_perturbation_consistency_equals_golden(golden):
    genes = golden["genes"]
    negatives = pd.unique(genes[genes != "non-targeting"])[:50]   # how the golden was made
    table = consistency.perturbation_consistency(golden["emb_tvn"], genes, negatives,
                                                 drop=["non-targeting"])
    assert table["pert"].tolist() == golden["cons_pert"].tolist()
    assert np.abs(table["avgcossim"].to_numpy() - golden["cons_avgcossim"]).max() < 1e-13  # 3.3e-16
    np.testing.assert_array_equal(table["pval"].to_numpy(), golden["cons_pval"])
    summary = consistency.consistency_summary(table)
    assert summary["fraction_consistent"] == np.mean(golden["cons_pval"] <= 0.05)


def test_metric_is_mean_lower_triangle_cosine():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 4))
    labels = np.array(["a", "a", "a", "b", "b", "b", "c"])
    perts, metric = consistency.mean_replicate_cosines(x, labels)
    unit = x[:3] / np.linalg.norm(x[:3], axis=1, keepdims=True)
    cos = unit @ unit.T
    assert perts.tolist() == ["a", "b", "c"]
    assert metric[0] == pytest.approx(cos[np.tril_indices(3, -1)].mean(), abs=1e-15)
    assert np.isnan(metric[2])   # a single replicate has no pairs


def _screen(signal, seed=0, perts=60, batches=3, reps=2, dim=16):
    rng = np.random.default_rng(seed)
    effect = rng.standard_normal((perts, dim))
    rows = [(p, b) for p in range(perts) for b in range(batches) for _ in range(reps)]
    p, b = np.array(rows).T
    x = signal * effect[p] + rng.standard_normal((len(rows), dim))
    return x, np.array([f"g{i}" for i in p]), b


def test_ks_and_cvm_grow_with_replicate_signal():
    weak = consistency.replicate_consistency(*_screen(0.0))
    strong = consistency.replicate_consistency(*_screen(1.5))
    assert weak["ks_statistic"] < 0.1 and weak["ks_pvalue"] > 1e-3
    assert strong["ks_statistic"] > 0.5 and strong["cvm_statistic"] > 10 * weak["cvm_statistic"]
    assert strong["median_replicate_cosine"] > strong["median_null_cosine"] + 0.3
    # 60 perturbations x 3 batch profiles -> 3 cross-batch pairs each
    assert strong["num_replicate_pairs"] == 60 * 3


def test_replicate_pairs_only_across_replicate_units():
    x, perts, batch = _screen(1.0, perts=4, batches=2, reps=3)
    within_and_across = consistency.replicate_pair_cosines(x, perts)
    across = consistency.replicate_pair_cosines(x, perts, batch)
    assert len(within_and_across) == 4 * 15 and len(across) == 4 * 1


def test_random_group_null_detects_signal():
    x, perts, _ = _screen(1.5)
    table = consistency.perturbation_consistency_vs_random(x, perts)
    assert consistency.consistency_summary(table)["fraction_consistent"] > 0.9
    x, perts, _ = _screen(0.0)
    table = consistency.perturbation_consistency_vs_random(x, perts)
    assert consistency.consistency_summary(table)["fraction_consistent"] < 0.2


def test_missing_negative_controls_raise():
    x, perts, _ = _screen(1.0, perts=5)
    with pytest.raises(ValueError, match="negative-control"):
        consistency.perturbation_consistency(x, perts, ["not-there"])


def test_a_perturbation_with_one_replicate_gets_no_p_value():
    """As in EFAAR: no replicate pairs, no metric and no p-value, so it never counts as consistent."""
    x = np.random.default_rng(0).normal(size=(9, 4))
    labels = np.array(["n1", "n1", "n2", "n2", "a", "a", "b", "b", "solo"])
    table = consistency.perturbation_consistency(x, labels, ["n1", "n2"])
    solo = table.set_index("pert").loc["solo"]
    assert np.isnan(solo["avgcossim"]) and np.isnan(solo["pval"])
    assert consistency.consistency_summary(table)["num_perturbations"] == 2


def _sample_pairs():
    """Samples in every regime of scipy's KS and CvM p-values: small (exact), large with weak and strong
    shifts (asymptotic, our closed forms or scipy's fallback), float32 and float64, ties."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for shift in (0.0, 0.01, 0.02, 0.05, 0.3, 5.0):
            for n1, n2 in ((60000, 60000), (12000, 10001), (300, 20000), (5000, 5000), (30, 25)):
                yield rng.normal(shift, 1, n1).astype(dtype), rng.normal(0, 1, n2).astype(dtype)
    yield np.round(rng.normal(0, 1, 20000), 1), np.round(rng.normal(0.05, 1, 15000), 1)   # many ties
    yield np.repeat([0.0, 1.0], 8000), np.repeat([0.0, 1.0], [3000, 12000])


def test_two_sample_tests_equal_scipy_stats_bit_for_bit():
    from scipy import stats
    ours_only = 0
    for x, y in _sample_pairs():
        ks, cvm = stats.ks_2samp(x, y), stats.cramervonmises_2samp(x, y)
        expected = {"ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
                    "cvm_statistic": float(cvm.statistic), "cvm_pvalue": float(cvm.pvalue)}
        assert consistency.two_sample_tests(x, y) == expected, (len(x), len(y), x.dtype)
        ours_only += max(len(x), len(y)) > 10_000 and \
            consistency._ks_2samp_asymptotic(np.sort(x), np.sort(y)) is not None
    assert ours_only == 23   # the closed forms were exercised (the rest is scipy's own call)


def test_two_sample_tests_on_screen_sizes_do_not_import_scipy_stats():
    code = ("import sys, numpy as np; from eval import consistency; r = np.random.default_rng(0); "
            "out = consistency.two_sample_tests(r.normal(0.1, 1, 60000), r.normal(0, 1, 60000)); "
            "assert 'scipy.stats' not in sys.modules, 'imported scipy.stats'; print(out['ks_pvalue'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])   # the checkout, whatever pytest's directory
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1e-10


def test_replicate_consistency_tests_float32_cosines_in_float64():
    """The CvM statistic of float32 embeddings' cosines is scipy's on the cosines as float64 (in float32 scipy
    keeps about three digits of it)."""
    from scipy import stats
    x, perts, batch = _screen(0.3, perts=300, batches=4, reps=2)
    x = x.astype(np.float32)
    out = consistency.replicate_consistency(x, perts, batch, null_pairs=12_000)
    rep = consistency.replicate_pair_cosines(x, perts, batch)
    null = consistency.non_replicate_pair_cosines(x, perts, 12_000, batch)
    assert rep.dtype == null.dtype == np.float32 and len(null) == out["num_null_pairs"]
    cvm = stats.cramervonmises_2samp(rep.astype(np.float64), null.astype(np.float64))
    assert out["cvm_statistic"] == float(cvm.statistic) and out["cvm_pvalue"] == float(cvm.pvalue)
    assert out["cvm_statistic"] != float(stats.cramervonmises_2samp(rep, null).statistic)
