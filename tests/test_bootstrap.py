"""Bootstrap intervals (eval/bootstrap.py): the resampling equals explicit resampling, the point estimates
equal the plain statistics exactly, the intervals cover a known truth at about the nominal rate, shrink
with more units, and restrict to families; the probes return their test predictions; the per-block
report carries the intervals and the by-family breakdown."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from eval import bootstrap, probe, recall, screen, tasks
from eval.tasks import parse_task


# --- balanced accuracy --------------------------------------------------------------------------

def _balanced(y, pred):
    return np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


def _well_population(rng, n_classes=8, wells=6, rows=10, kappa=4.0):
    """Wells whose accuracy varies around a class mean (Beta), so rows of a well are correlated.
    Returns labels, predictions, well of each row, and the population balanced accuracy."""
    mu = np.linspace(0.3, 0.8, n_classes)
    p = rng.beta(mu * kappa, (1 - mu) * kappa, (wells, n_classes)).T.ravel()     # class-major wells
    labels = np.repeat(np.arange(n_classes), wells * rows)
    hit = rng.random(len(labels)) < np.repeat(p, rows)
    preds = np.where(hit, labels, (labels + 1) % n_classes)
    return labels, preds, np.repeat(np.arange(n_classes * wells), rows), float(mu.mean())


def test_balanced_accuracy_value_is_the_plain_statistic():
    rng = np.random.default_rng(0)
    labels, preds, wells, _ = _well_population(rng)
    value, lo, hi = bootstrap.balanced_accuracy_ci(labels, preds, wells, 8, n_boot=200)
    assert value == _balanced(labels, preds) == bootstrap.balanced_accuracy(labels, preds)
    assert value == pytest.approx(float(probe.balanced_accuracy(labels, preds, 8)), abs=1e-6)  # jax, float32
    assert lo < value < hi
    stacked = np.stack([preds, labels, np.zeros_like(labels)])
    values, los, his = bootstrap.balanced_accuracy_ci(labels, stacked, wells, 8, n_boot=200)
    assert values.shape == los.shape == his.shape == (3,)
    assert (values[0], los[0], his[0]) == (value, lo, hi)          # same resamples for every row
    assert values[1] == los[1] == his[1] == 1.0 and values[2] == pytest.approx(1 / 8)


def test_balanced_accuracy_resamples_equal_explicit_resampling():
    rng = np.random.default_rng(1)
    labels, preds, wells, _ = _well_population(rng, n_classes=4, wells=3, rows=5)
    wells = np.array([f"w{w}" for w in wells])                      # any hashable unit names
    _, samples = bootstrap.balanced_accuracy_samples(labels, preds[None], wells, n_boot=25, seed=7)
    counts = bootstrap.resample_counts(12, 25, seed=7)
    order = pd.unique(wells)                                        # groups numbered by first appearance
    for b in range(25):
        rows = np.concatenate([np.flatnonzero(wells == order[g]) for g in range(12) for _ in range(counts[b, g])])
        assert samples[0, b] == pytest.approx(_balanced(labels[rows], preds[rows]), abs=1e-12)


def test_balanced_accuracy_interval_covers_the_truth():
    rng = np.random.default_rng(2)
    covered, widths = [], []
    for sim in range(200):
        labels, preds, wells, truth = _well_population(rng)
        _, lo, hi = bootstrap.balanced_accuracy_ci(labels, preds, wells, n_boot=400, seed=sim)
        covered.append(lo <= truth <= hi)
        widths.append(hi - lo)
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)      # measured 0.94
    assert 0.1 < np.mean(widths) < 0.2


def test_balanced_accuracy_interval_shrinks_with_more_wells():
    rng = np.random.default_rng(3)
    few = bootstrap.balanced_accuracy_ci(*_well_population(rng, wells=4)[:3], n_boot=500)
    many = bootstrap.balanced_accuracy_ci(*_well_population(rng, wells=64)[:3], n_boot=500)
    assert (many[2] - many[1]) < 0.4 * (few[2] - few[1])


def test_balanced_accuracy_is_deterministic_and_checks_inputs():
    labels, preds, wells, _ = _well_population(np.random.default_rng(4))
    a = bootstrap.balanced_accuracy_ci(labels, preds, wells, n_boot=100, seed=5)
    assert a == bootstrap.balanced_accuracy_ci(labels, preds, wells, n_boot=100, seed=5)
    assert a != bootstrap.balanced_accuracy_ci(labels, preds, wells, n_boot=100, seed=6)
    frame = pd.DataFrame({"plate": wells // 10, "well": wells % 10})   # units as rows of a table
    assert bootstrap.balanced_accuracy_ci(labels, preds, frame, n_boot=100, seed=5) == a
    with pytest.raises(ValueError, match="must match"):
        bootstrap.balanced_accuracy_ci(labels, preds[:-1], wells)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        bootstrap.balanced_accuracy_ci(labels, preds, wells, 3)


# --- recall -------------------------------------------------------------------------------------

def _pair_population(rng, n, size, sb, sa, se, delta):
    """Similarities of all pairs of n genes: gene effects b shift every pair, known pairs (same complex
    of `size` genes) get delta plus gene activities a. Returns the upper-triangle null, the known mask
    and the population recall at (0.05, 0.95) for a map of n genes (null = the mixture of pairs)."""
    b, a = rng.standard_normal(n) * sb, rng.standard_normal(n) * sa
    i, j = np.triu_indices(n, 1)
    complex_of = np.arange(n) // size
    known = complex_of[i] == complex_of[j]
    null = b[i] + b[j] + se * rng.standard_normal(len(i)) + known * (delta + a[i] + a[j])
    s0, s1 = np.sqrt(2 * sb ** 2 + se ** 2), np.sqrt(2 * sb ** 2 + 2 * sa ** 2 + se ** 2)
    pi = (size - 1) / (n - 1)
    cdf = lambda x: (1 - pi) * norm.cdf(x, scale=s0) + pi * norm.cdf(x, loc=delta, scale=s1)
    q_lo, q_hi = (brentq(lambda x: cdf(x) - p, -30, 30) for p in (0.05, 0.95))
    truth = norm.sf(q_hi, loc=delta, scale=s1) + norm.cdf(q_lo, loc=delta, scale=s1)
    return null, known, truth


def _coverage(n, size, sb, sa, se, delta, sims, n_boot=200, seed=0):
    rng = np.random.default_rng(seed)
    covered, widths, values = [], [], []
    for sim in range(sims):
        null, known, truth = _pair_population(rng, n, size, sb, sa, se, delta)
        v, lo, hi = bootstrap.recall_ci(null, known, thresholds=((0.05, 0.95),), n_boot=n_boot,
                                        seed=sim)["recall_0.05_0.95"]
        covered.append(lo <= truth <= hi)
        widths.append(hi - lo)
        values.append(v)
    return np.mean(covered), np.mean(widths), 2 * norm.ppf(0.975) * np.std(values)


def test_recall_value_equals_compute_recall_exactly():
    rng = np.random.default_rng(5)
    null, known, _ = _pair_population(rng, 40, 5, 0.5, 1.0, 0.5, 2.0)
    got = bootstrap.recall_ci(null, known, n_boot=50)
    plain = recall.compute_recall(null, null[known])
    assert set(got) == {"recall_0.05_0.95", "recall_0.1_0.9"}
    for key, (value, lo, hi) in got.items():
        assert value == plain[key] and lo <= value <= hi
    by_position = bootstrap.recall_ci(null, np.flatnonzero(known), n_boot=50)
    assert by_position == got
    i, j = np.triu_indices(40, 1)
    assert bootstrap.recall_ci(null, known, (i, j), n_boot=50) == got
    with pytest.raises(ValueError, match="not the upper triangle"):
        bootstrap.recall_ci(null[:-1], known[:-1])


def test_recall_resamples_equal_explicit_gene_resampling():
    """A resample weighted by c_i c_j is the map of the drawn genes (copies of one gene not paired)."""
    rng = np.random.default_rng(6)
    n = 16
    null, known, _ = _pair_population(rng, n, 4, 0.5, 1.0, 0.5, 2.0)
    boot = bootstrap.PairBootstrap(null, n_boot=20, seed=3)
    samples = boot.samples({"q": np.flatnonzero(known)}, ((0.05, 0.95), (0.2, 0.7)))["q"]
    sim = np.zeros((n, n))
    sim[np.triu_indices(n, 1)] = null
    sim += sim.T
    complex_of = np.arange(n) // 4
    for b in range(20):
        genes = np.repeat(np.arange(n), boot.counts[b])
        a, c = np.triu_indices(len(genes), 1)
        a, c = genes[a], genes[c]
        distinct = a != c
        pair_null, is_known = sim[a, c][distinct], (complex_of[a] == complex_of[c])[distinct]
        if not is_known.any():
            assert all(np.isnan(s[1][b]) for s in samples.values())
            continue
        expected = recall.compute_recall(pair_null, pair_null[is_known], ((0.05, 0.95), (0.2, 0.7)))
        for key, (_, boots) in samples.items():
            assert boots[b] == pytest.approx(expected[key], abs=1e-12)


def test_recall_interval_covers_the_truth():
    # Complexes of 20 genes whose activity varies: each known pair shares a gene with 36 others, so
    # recall's variance is mostly gene-level, which resampling genes reproduces: near-nominal coverage.
    covered, width, spread = _coverage(100, 20, 0.3, 1.5, 0.3, 2.0, sims=150)
    assert 0.88 <= covered <= 0.99, covered                           # measured 0.97
    assert 0.9 < width / spread < 1.4, (width, spread)                # measured 1.16


def test_recall_interval_is_conservative_for_sparse_known_pairs():
    # Complexes of 3 (2 known partners per gene): the pair-level part of the variance dominates, and the
    # c_i c_j weights count it about 3 times (Var(c_i c_j) = 3 under resampling; the known bias of
    # bootstrapping a U-statistic by its units), so the interval is wider than the true spread
    # (measured 1.76x, coverage 1.0): conservative, not too narrow.
    covered, width, spread = _coverage(90, 3, 0.5, 0.5, 1.0, 2.0, sims=60)
    assert covered >= 0.95 and 1.3 < width / spread < 2.2, (covered, width, spread)


def test_recall_interval_shrinks_with_more_genes():
    rng = np.random.default_rng(7)
    widths = []
    for n in (60, 300):                                  # 20 and 100 complexes of 3
        null, known, _ = _pair_population(rng, n, 3, 0.3, 1.0, 0.5, 2.0)
        _, lo, hi = bootstrap.recall_ci(null, known, thresholds=((0.05, 0.95),), n_boot=300)["recall_0.05_0.95"]
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0], widths


def test_recall_restricted_to_a_family_of_genes():
    rng = np.random.default_rng(8)
    null, known, _ = _pair_population(rng, 60, 6, 0.3, 1.0, 0.5, 2.0)
    family = np.arange(60) < 12                                    # complexes 0 and 1
    got = bootstrap.recall_ci(null, known, genes=family, thresholds=((0.05, 0.95),), n_boot=200)
    i, j = np.triu_indices(60, 1)
    inside = known & family[i] & family[j]
    assert inside.sum() == 2 * 15
    assert got["recall_0.05_0.95"][0] == recall.compute_recall(null, null[inside], ((0.05, 0.95),))["recall_0.05_0.95"]
    assert bootstrap.recall_ci(null, known, genes=np.arange(12), thresholds=((0.05, 0.95),), n_boot=200) == got
    whole = bootstrap.recall_ci(null, known, thresholds=((0.05, 0.95),), n_boot=200)["recall_0.05_0.95"]
    assert got["recall_0.05_0.95"][2] - got["recall_0.05_0.95"][1] > whole[2] - whole[1]   # fewer pairs
    with pytest.raises(ValueError, match="no known pair"):
        bootstrap.recall_ci(null, known, genes=[0])


def test_known_pair_positions_reproduce_recall_table(tmp_path):
    rng = np.random.default_rng(9)
    labels = [f"G{i}" for i in range(30)]
    (tmp_path / "Complex.txt").write_text("entity1,entity2\n" + "".join(
        f"G{a},G{b}\n" for a in range(30) for b in range(a + 1, 30) if a // 5 == b // 5))
    (tmp_path / "Pathway.txt").write_text("entity1,entity2\nG1,G29\nG3,G17\nG17,G3\nX,G1\n")
    features = rng.standard_normal((30, 8)) + np.repeat(rng.standard_normal((6, 8)), 5, axis=0)
    table = recall.known_relationship_benchmark(features, labels, tmp_path)
    positions = bootstrap.known_pair_positions(labels, tmp_path)
    boot = bootstrap.PairBootstrap(recall.upper_triangle_cosines(features), n_boot=100)
    got = boot.recall(positions)
    assert [r["source"] for r in table] == list(got) == ["Complex", "Pathway"]
    for rec in table:
        assert len(positions[rec["source"]]) == rec["query_distribution_size"]
        for key in ("recall_0.05_0.95", "recall_0.1_0.9"):
            assert got[rec["source"]][key][0] == rec[key]                  # exactly today's number


# --- probes and tasks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(0)
    n, d, classes = 240, 10, 4
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d))
    blocks = [rng.standard_normal((n, d)) * 2 + s * centers[labels] for s in (0.0, 0.8, 2.5)]
    train, val, test = probe.split_by_group(pd.DataFrame({"well": np.arange(n) // 3}), "well", seed=1)
    return np.stack(blocks).astype(np.float32), labels, train, val, test


@pytest.mark.parametrize("fit", ["ridge", "logistic"])
def test_probes_return_their_test_predictions(stack, fit):
    feats, labels, train, val, test = stack
    if fit == "ridge":
        report = probe.ridge_probes(feats, labels, train, val, test)
    else:
        report = probe.logistic_probes(feats, labels, train, val, test, l2_grid=(1e-4, 1e-1), steps=60,
                                       learning_rate=0.05)
    np.testing.assert_array_equal(report.test_index, np.flatnonzero(test))
    assert report.test_predictions.shape == (3, test.sum()) and report.test_predictions.dtype == np.int32
    for k in range(3):
        assert _balanced(labels[test], report.test_predictions[k]) == pytest.approx(report.test[k], abs=1e-6)
    assert "test_predictions" not in report.to_dict()


GENES = [f"G{i}" for i in range(8)]
FAMILY = {g: ("kinase", "ribosome")[i % 2] for i, g in enumerate(GENES)}
EXPERIMENTS = ("E1", "E2", "E3")


@pytest.fixture(scope="module")
def crops():
    """3 experiments x 2 plates x (8 gene wells + 2 control wells) x 3 crops; block 0 noise, block 1
    gene signal (strong for the kinase family, weak for the ribosome family)."""
    rng = np.random.default_rng(0)
    rows = [dict(experiment=e, plate=p, well=f"W{w}", perturbation=g, is_control=g == "ctrl")
            for e in EXPERIMENTS for p in ("P1", "P2") for w, g in enumerate(GENES + ["ctrl", "ctrl"])
            for _ in range(3)]
    meta = pd.DataFrame(rows)
    d = 12
    vec = {g: rng.standard_normal(d) * (2.5 if FAMILY[g] == "kinase" else 0.6) for g in GENES}
    vec["ctrl"] = np.zeros(d)
    signal = np.stack([vec[g] for g in meta.perturbation])
    noise = lambda: rng.standard_normal((len(meta), d))
    return np.stack([noise(), noise() + signal], axis=1).astype(np.float32), meta


def test_run_task_reports_intervals_and_families(crops):
    feats, meta = crops
    out = tasks.run_task(parse_task("perturbation"), feats, meta, families=FAMILY, n_boot=300, seed=2)
    assert len(out["test_ci95"]) == 2 and out["best_block_test_ci95"] == out["test_ci95"][out["best_block"] - 1]
    for value, (lo, hi) in zip(out["test"], out["test_ci95"]):
        assert lo <= value + 1e-6 and value - 1e-6 <= hi
    assert out["bootstrap"] == {"unit": ["experiment", "plate", "well"], "num_units": 8, "n_boot": 300,
                                "level": 0.95}
    fam = out["by_family"]
    assert sorted(fam) == ["kinase", "ribosome"]
    assert fam["kinase"]["num_test"] == 4 * 3 and fam["kinase"]["genes"] == ["G0", "G2", "G4", "G6"]
    assert fam["kinase"]["value"][1] > fam["ribosome"]["value"][1]
    assert len(fam["kinase"]["ci95"]) == 2
    # the family value is the balanced accuracy over the family's test rows (same split, same probe)
    again = tasks.run_task(parse_task("perturbation"), feats, meta, families=FAMILY, n_boot=300, seed=2)
    assert again == out                                                             # deterministic
    plain = tasks.run_task(parse_task("perturbation"), feats, meta, seed=2, n_boot=0)
    assert {k: out[k] for k in plain} == plain and "test_ci95" not in plain
    qc_free = tasks.run_task(parse_task("experiment"), feats, meta, families=FAMILY, n_boot=100)
    assert "by_family" not in qc_free and len(qc_free["test_ci95"]) == 2          # not a gene task
    held_out = tasks.run_task(parse_task("functional_group:split=perturbations,level=crop"), feats, meta,
                              groups=FAMILY, families=FAMILY, n_boot=100)
    assert held_out["bootstrap"]["unit"] == ["perturbation"] and held_out["bootstrap"]["num_units"] == 2


def test_family_value_is_the_restricted_balanced_accuracy(crops):
    feats, meta = crops
    task = parse_task("perturbation")
    out = tasks.run_task(task, feats, meta, families=FAMILY, n_boot=50, seed=0)
    # redo the probe by hand to get the predictions
    x = tasks.efaar.centerscale_on_controls(feats[:, 1], meta.is_control.to_numpy(), meta.experiment.to_numpy())
    keep = ~meta.is_control.to_numpy()
    rows = meta[keep].reset_index(drop=True)
    y, _ = pd.factorize(rows.perturbation, sort=True)
    train, val, test = tasks.split_rows(task, rows, y, (0.8, 0.1, 0.1), 0)
    report = probe.ridge_probes(x[keep][None], y.astype(np.int32), train, val, test)
    pred = report.test_predictions[0]
    for name in ("kinase", "ribosome"):
        m = rows.perturbation[test].map(FAMILY).to_numpy() == name
        assert out["by_family"][name]["value"][1] == _balanced(y[test][m], pred[m])


# --- the per-block report -----------------------------------------------------------------------

def test_evaluate_blocks_reports_intervals_and_families(crops, tmp_path):
    feats, meta = crops
    pairs = [(a, b) for a in GENES for b in GENES if a < b and FAMILY[a] == FAMILY[b]]
    (tmp_path / "Family.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    (tmp_path / "Few.txt").write_text("entity1,entity2\nG0,G2\nG1,G4\nG2,G3\n")
    report = screen.evaluate_blocks(feats, meta, str(tmp_path), control="ctrl", pca_components=6,
                                    tasks=("perturbation", "experiment"), families=FAMILY, n_boot=200, seed=1)
    for row in report["blocks"]:
        assert [r["source"] for r in row["recall_ci"]] == [r["source"] for r in row["recall"]]
        for rec, ci in zip(row["recall"], row["recall_ci"]):
            assert ci["query_distribution_size"] == rec["query_distribution_size"]
            assert ci["recall_0.05_0.95"]["value"] == rec["recall_0.05_0.95"]             # exactly
            lo, hi = ci["recall_0.05_0.95"]["ci95"]
            assert lo <= rec["recall_0.05_0.95"] <= hi
        assert row["recall_mean_ci"]["recall_0.05_0.95"]["value"] == row["recall_mean"]["recall_0.05_0.95"]
        k = row["block"] - 1
        assert row["probes"]["perturbation"]["test_ci95"] == report["tasks"]["perturbation"]["test_ci95"][k]
        assert row["probe_test_ci95"] == row["probes"]["perturbation"]["test_ci95"]
        fam = row["by_family"]
        assert sorted(fam) == ["kinase", "ribosome"]
        kin = fam["kinase"]
        assert kin["recall"]["Family"]["query_distribution_size"] == 6          # 4 genes: 6 pairs
        assert set(kin["recall"]) == {"Family", "Few"} and kin["recall"]["Few"]["query_distribution_size"] == 1
        assert set(fam["ribosome"]["recall"]) == {"Family"}                        # no Few pair inside
        task_family = report["tasks"]["perturbation"]["by_family"]["kinase"]
        assert kin["probe"]["perturbation"]["value"] == task_family["value"][k]
        assert kin["probe"]["perturbation"]["ci95"] == task_family["ci95"][k]
        assert set(kin["probe"]) == {"perturbation"}                               # experiment: not per gene
    best = report["best"]
    assert best["by_family"]["kinase"]["probe"]["perturbation"]["value"] > \
        best["by_family"]["ribosome"]["probe"]["perturbation"]["value"]
    plain = screen.evaluate_blocks(feats, meta, str(tmp_path), control="ctrl", pca_components=6,
                                   tasks=("perturbation",), n_boot=0, seed=1)
    assert "recall_ci" not in plain["best"] and "by_family" not in plain["best"]
    assert plain["best"]["recall"] == report["best"]["recall"]
    path = tmp_path / "blocks.png"
    screen.plot_blocks(report, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
