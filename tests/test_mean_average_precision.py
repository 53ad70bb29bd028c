"""JUMP-CP's mAP (eval/mean_average_precision.py) on cases with a known answer, checked against direct calls
of copairs (its public API, in the community's standard set-ups), and carried by both reports
(eval.map_benchmark.evaluate_map and eval.screen's per-block rows)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from copairs import map as copairs_map
from copairs.map.normalization import expected_ap
from copairs.matching import assign_reference_index

from eval import map_benchmark, screen
from eval import mean_average_precision as map_lib

NULL_SIZE = 5000     # enough for BH at 0.05 over these few tests; keeps the nulls fast
COLUMNS = ["mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"]


def assert_same_as_copairs(by, ap: pd.DataFrame, column: str, *, seed: int, tmp_path) -> None:
    """Our table (`by`, indexed by perturbation or gene) equals copairs' mean_average_precision of its
    average precisions `ap`, grouped by `column`, with the same null size, threshold and seed."""
    direct = copairs_map.mean_average_precision(ap, [column], null_size=NULL_SIZE, threshold=0.05, seed=seed,
                                                progress_bar=False, cache_dir=tmp_path / "nulls")  # not ~/.copairs
    direct = direct.set_index(column).loc[by.index]
    pd.testing.assert_frame_equal(by[COLUMNS], direct[COLUMNS], check_names=False)


def _well_screen(seed: int = 0):
    """3 batches x (12 control rows + 2 rows of each of 12 perturbations): A0-A5 sit far from the controls
    along two shared directions (A0-A2, A3-A5), N0-N5 are drawn like the controls."""
    rng = np.random.default_rng(seed)
    d = 16
    directions = rng.standard_normal((2, d))
    directions *= 10 / np.linalg.norm(directions, axis=1, keepdims=True)
    perts = [f"A{i}" for i in range(6)] + [f"N{i}" for i in range(6)]
    x, labels, batches = [], [], []
    for b in range(3):
        for _ in range(12):
            x.append(rng.standard_normal(d)), labels.append("ctrl"), batches.append(f"b{b}")
        for p in perts:
            for _ in range(2):
                effect = directions[int(p[1]) // 3] if p[0] == "A" else 0.0
                x.append(effect + rng.standard_normal(d)), labels.append(p), batches.append(f"b{b}")
    return np.asarray(x, np.float32), np.asarray(labels), np.asarray(batches)


def test_activity_known_answer_equals_copairs(tmp_path):
    x, labels, batches = _well_screen()
    table = map_lib.phenotypic_activity(x, labels, "ctrl", batches, null_size=NULL_SIZE, seed=3)
    by = table.set_index("perturbation")
    active, inert = by.loc[[f"A{i}" for i in range(6)]], by.loc[[f"N{i}" for i in range(6)]]
    # replicates far from the controls rank first: AP 1 for every row, retrieved after BH
    assert (active["mean_average_precision"] == 1.0).all() and active["below_corrected_p"].all()
    # like the controls: near the random AP of 5 positives among 5 + 12 (the batch's controls), not retrieved
    baseline = expected_ap(5, 12)
    assert abs(inert["mean_average_precision"].mean() - baseline) < 0.1, (inert, baseline)
    assert not inert["below_corrected_p"].any()

    # the same numbers from copairs directly, set up as its phenotypic-activity example and JUMP-CP's
    # gene notebooks: controls get their own reference index, negatives are controls of the same batch
    meta = pd.DataFrame({"Metadata_pert": labels, "Metadata_batch": batches})
    meta = assign_reference_index(meta, "Metadata_pert == 'ctrl'", reference_col="Metadata_ref")
    ap = copairs_map.average_precision(meta, x, pos_sameby=["Metadata_pert", "Metadata_ref"], pos_diffby=[],
                                       neg_sameby=["Metadata_batch"], neg_diffby=["Metadata_pert", "Metadata_ref"],
                                       progress_bar=False)
    assert_same_as_copairs(by, ap.query("Metadata_pert != 'ctrl'"), "Metadata_pert", seed=3, tmp_path=tmp_path)


def _gene_map(seed: int = 0):
    """24 genes in six annotated groups of 4 (every pair within a group listed): C0-C2 share a profile
    per group, R0-R2 are independent random profiles."""
    rng = np.random.default_rng(seed)
    d = 32
    features, labels, pairs = [], [], []
    for name in ["C0", "C1", "C2", "R0", "R1", "R2"]:
        centre = rng.standard_normal(d)
        members = [f"{name}_{i}" for i in range(4)]
        for _ in members:
            features.append(centre + 0.3 * rng.standard_normal(d) if name[0] == "C" else rng.standard_normal(d))
        labels += members
        pairs += [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    return np.asarray(features, np.float32), np.asarray(labels), pairs


def _write_table(folder, name, pairs):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    return folder


def test_consistency_known_answer_equals_copairs_multilabel(tmp_path):
    features, labels, pairs = _gene_map()
    ann = _write_table(tmp_path / "ann", "Groups", pairs)
    table = map_lib.phenotypic_consistency(features, labels, ann, "Groups", null_size=NULL_SIZE, seed=1)
    by = table.set_index("gene")
    assert table.attrs["num_genes"] == 24 and len(table) == 24 and (by["num_partners"] == 3).all()
    shared = by[by.index.str.startswith("C")]
    random = by[by.index.str.startswith("R")]
    # a shared profile puts the 3 partners first (AP 1); random profiles rank them as chance does
    assert (shared["mean_average_precision"] == 1.0).all() and shared["below_corrected_p"].all()
    baseline = expected_ap(3, 20)
    assert abs(random["mean_average_precision"].mean() - baseline) < 0.1, (random, baseline)
    assert not random["below_corrected_p"].any()

    # copairs' public multilabel API on the query/reference frame gives the same table
    genes = sorted(labels)
    partners = {g: sorted({b for a, b in pairs if a == g} | {a for a, b in pairs if b == g}) for g in genes}
    meta = pd.DataFrame({"Metadata_gene": genes * 2, "Metadata_role": ["query"] * 24 + ["reference"] * 24,
                         "Metadata_labels": [[g] for g in genes] + [partners[g] for g in genes]})
    rows = pd.Index(labels).get_indexer(genes * 2)
    ap = copairs_map.multilabel.average_precision(
        meta, features[rows], pos_sameby=["Metadata_labels"], pos_diffby=["Metadata_role"], neg_sameby=[],
        neg_diffby=["Metadata_labels", "Metadata_role", "Metadata_gene"], multilabel_col="Metadata_labels",
        progress_bar=False)
    assert_same_as_copairs(by, ap.query("Metadata_role == 'query'"), "Metadata_labels", seed=1, tmp_path=tmp_path)


def _crops(x, labels, batches):
    """One crop per well, in eval.screen's metadata layout; two 'blocks' (the features and a noisy copy)."""
    meta = pd.DataFrame({"experiment": batches, "plate": "P1", "well": [f"w{i}" for i in range(len(x))],
                         "perturbation": labels, "is_control": labels == "ctrl"})
    noisy = x + np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    return np.stack([x, noisy], axis=1), meta


def test_both_reports_carry_the_same_entry(tmp_path):
    x, labels, batches = _well_screen()
    genes = sorted(set(labels) - {"ctrl"})
    ann = _write_table(tmp_path / "ann", "Pairs", [("A0", "A1"), ("A0", "A2"), ("A1", "A2"), ("A3", "A4"),
                                                   ("A4", "A5"), ("N0", "N1"), ("N2", "N3"), ("A0", "N4")])
    _write_table(ann, "Hub", [("A0", g) for g in genes if g != "A0"] + [("N0", "N1")])
    features, meta = _crops(x, labels, batches)
    report = screen.evaluate_blocks(features, meta, str(ann), control="ctrl", pca_components=8, tasks=(),
                                    n_boot=0)
    for k, row in enumerate(report["blocks"]):
        entry = row["mean_average_precision"]
        mapped, _, _ = map_benchmark.evaluate_map(features[:, k], labels, "ctrl", batches, str(ann), pca_components=8,
                                                  correction="centerscale", thresholds=((0.05, 0.95),))
        assert entry == mapped["mean_average_precision"]       # one function, same numbers
        json.dumps(entry, allow_nan=False)
        assert entry["package"] == "copairs 0.5.5" and entry["null_size"] == map_lib.NULL_SIZE
        activity, consistency = entry["activity"], entry["consistency"]
        assert activity["num_perturbations"] == 12 == len(activity["per_perturbation"])
        assert set(activity["per_perturbation"][0]) == {"perturbation", *COLUMNS}
        assert set(consistency["sources"]) == {"Pairs", "Hub"} and consistency["genes"] == "all"
        hub = consistency["sources"]["Hub"]
        # A0 is paired with every other gene: no negative, so it is not scored (but stays in the universe)
        assert hub["num_genes"] == 12 and hub["num_groups"] == 11
        assert "A0" not in {g["group"] for g in hub["per_group"]}
        assert set(hub["per_group"][0]) == {"group", "num_partners", *COLUMNS}
    first = report["blocks"][0]["mean_average_precision"]["activity"]
    assert first["fraction_retrieved"] == 0.5 and first["mean_average_precision"] > 0.6   # the six A genes
    assert "mean_average_precision" not in screen.evaluate_blocks(
        features[:, :1], meta, str(ann), control="ctrl", pca_components=8, tasks=(), n_boot=0,
        mean_average_precision=False)["blocks"][0]


@pytest.mark.parametrize("genes", ["active", "bogus"])
def test_consistency_on_active_genes(tmp_path, genes):
    x, labels, batches = _well_screen()
    ann = _write_table(tmp_path / "ann", "Pairs", [("A0", "A1"), ("A1", "A2"), ("A3", "A4"), ("N0", "N1"),
                                                   ("N1", "N2")])
    pmap_args = dict(pca_components=0, correction="none")
    _, pmap, _ = map_benchmark.evaluate_map(x, labels, "ctrl", batches, str(ann), mean_average_precision=False,
                                            thresholds=((0.05, 0.95),), **pmap_args)
    call = lambda: map_lib.map_report(pmap.embeddings, labels, "ctrl", batches, pmap.features, pmap.labels, ann,
                                      ["Pairs"], consistency_genes=genes, null_size=NULL_SIZE)
    if genes == "bogus":
        with pytest.raises(ValueError, match="consistency_genes"):
            call()
        return
    cons = call()["consistency"]
    # only the six active A genes stay: A0-A1-A2 and A3-A4 are the annotated ones
    assert cons["genes"] == "active" and cons["num_genes"] == 6
    assert cons["sources"]["Pairs"]["num_genes"] == 5
