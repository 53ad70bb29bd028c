"""Known-relationship recall equals EFAAR 1.0 (golden_results.json), and its table handling."""
import json

import numpy as np
import pytest

from eval import plots, recall
from tests.reference_data import ANNOTATIONS, GOLDEN, require


@pytest.fixture(scope="module")
def golden():
    g = dict(np.load(require(GOLDEN) / "golden.npz"))
    with open(GOLDEN / "golden_results.json") as f:
        g["results"] = json.load(f)
    return g


def test_known_relationship_benchmark_equals_golden(golden):
    got = recall.known_relationship_benchmark(golden["map_features"], golden["map_genes"],
                                              require(ANNOTATIONS))
    assert got == golden["results"]["known_relationship_benchmark"]   # exact: sizes and floats


def test_compute_recall_equals_golden(golden):
    got = recall.compute_recall(golden["recall_null"], golden["recall_query"], recall.RECALL_THRESHOLDS)
    assert got == golden["results"]["compute_recall"]


def test_real_tables_parse_to_efaar_pair_counts():
    counts = {s: len(recall.load_relationships(require(ANNOTATIONS), s)[0])
              for s in recall.BENCHMARK_SOURCES}
    assert counts == {"CORUM": 37649, "HuMAP": 58538, "Reactome": 18565, "SIGNOR": 11617,
                      "StringDB": 58059}
    assert recall.discover_sources(ANNOTATIONS) == list(recall.BENCHMARK_SOURCES)


@pytest.fixture()
def table_dir(tmp_path):
    (tmp_path / "SyntheticComplex.txt").write_text(
        "entity1,entity2\nB,A\nA,B\nA,A\nC,D\nD,C\nA,C\nX,Y\n")
    (tmp_path / "NoPair.txt").write_text("entity1,entity2\nA,X\n")   # A is in the test maps, X is not
    (tmp_path / "notes.txt").write_text("this is not a relationship table\n")
    return tmp_path


def test_tables_are_undirected_deduplicated_without_self_pairs(table_dir):
    e1, e2 = recall.load_relationships(table_dir, "SyntheticComplex")
    assert sorted(zip(e1, e2)) == [("A", "B"), ("A", "C"), ("C", "D"), ("X", "Y")]


def test_discovery_skips_files_that_are_not_relationship_tables(table_dir):
    assert recall.discover_sources(table_dir) == ["NoPair", "SyntheticComplex"]
    (table_dir / "Wide.txt").write_text("a,b,c\n1,2,3\n")   # a table, but not a relationship table: an error
    with pytest.raises(ValueError, match="Wide.txt: expected the header 'entity1,entity2', found 'a,b,c'"):
        recall.discover_sources(table_dir)


def test_header_spaces_and_byte_order_mark_are_tolerated(tmp_path):
    (tmp_path / "Spaced.txt").write_text("\ufeffentity1, entity2\nB, A\n", encoding="utf-8")
    assert recall.discover_sources(tmp_path) == ["Spaced"]
    e1, e2 = recall.load_relationships(tmp_path, "Spaced")
    assert (e1.tolist(), e2.tolist()) == (["A"], ["B"])


def test_sources_without_usable_pairs_are_dropped(table_dir):
    feats = np.eye(4)[[0, 0, 1, 2]] + np.arange(4)[:, None] * 0.1
    got = recall.known_relationship_benchmark(feats, ["A", "B", "C", "D"], table_dir)
    assert [r["source"] for r in got] == ["SyntheticComplex"]
    assert got[0]["query_distribution_size"] == 3 and got[0]["null_distribution_size"] == 6


def test_recall_against_a_naive_implementation(table_dir):
    rng = np.random.default_rng(0)
    labels = [f"G{i}" for i in range(40)]
    feats = rng.standard_normal((40, 8))
    pairs = [(f"G{i}", f"G{j}") for i, j in rng.integers(0, 40, (60, 2)) if i != j]
    (table_dir / "Random.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    thresholds = [(0.1, 0.9), (0.02, 0.98)]
    got = recall.known_relationship_benchmark(feats, labels, table_dir, ["Random"], thresholds)[0]

    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = unit @ unit.T
    null = np.sort(cos[np.triu_indices(40, 1)])
    canon = {tuple(sorted((int(a[1:]), int(b[1:])))) for a, b in pairs}
    query = np.array([cos[i, j] for i, j in canon])
    left, right = np.searchsorted(null, query, "left") / len(null), np.searchsorted(null, query, "right") / len(null)
    assert got["query_distribution_size"] == len(canon)
    for lo, hi in thresholds:
        assert got[f"recall_{lo}_{hi}"] == np.mean((right <= lo) | (left >= hi))


def test_recall_from_order_statistics_equals_the_sorted_null():
    """recall_table reads a few order statistics of a partitioned null; compute_recall searches a sorted
    one. Same counts with ties, queries equal to the cut values, thresholds on exact ranks, 0 and 1."""
    rng = np.random.default_rng(3)
    thresholds = [(0.05, 0.95), (0.1, 0.9), (0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (1 / 3, 2 / 3)]
    for n in (1, 2, 3, 7, 20, 100, 1000, 4999):
        for ties in (False, True):
            null = rng.standard_normal(n).astype(np.float32)
            if ties:
                null = np.round(null, 1)
            picks = rng.choice(null, 30)
            query = np.concatenate([picks, np.nextafter(picks, np.float32(9)), np.nextafter(picks, np.float32(-9)),
                                    rng.standard_normal(30).astype(np.float32), [null.min(), null.max()]])
            want = [{"source": "S", **recall.compute_recall(null, query, thresholds)}]
            sims = recall.RelationshipSimilarities(null.copy(), {"S": query})
            assert recall.recall_table(sims, thresholds) == want, (n, ties)
            assert not sims._sorted                                  # partitioned, not sorted
            np.testing.assert_array_equal(sims.sorted_null, np.sort(null))
            assert recall.recall_table(sims, thresholds) == want     # and from the sorted null


def test_upper_triangle_in_row_blocks_matches_triu():
    x = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = (unit @ unit.T)[np.triu_indices(37, 1)]
    np.testing.assert_allclose(recall.upper_triangle_cosines(x, row_block=8), ref, atol=1e-6)
    i, j = np.array([0, 5, 36, 20]), np.array([1, 2, 35, 30])
    pos = recall.pair_positions(i, j, 37)
    np.testing.assert_allclose(ref[pos], (unit @ unit.T)[i, j], atol=1e-6)


def test_tables_are_parsed_once_per_process(table_dir):
    recall.load_relationships(table_dir, "SyntheticComplex")
    before = recall._parse_table.cache_info().hits
    recall.load_relationships(table_dir, "SyntheticComplex")
    assert recall._parse_table.cache_info().hits == before + 1


def test_bad_inputs_raise_clear_errors(table_dir):
    (table_dir / "Wide.txt").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Missing.txt"):
        recall.load_relationships(table_dir, "Missing")
    with pytest.raises(ValueError, match="header 'entity1,entity2'"):
        recall.load_relationships(table_dir, "Wide")
    with pytest.raises(ValueError, match="unique"):
        recall.known_relationship_benchmark(np.eye(3), ["A", "A", "B"], table_dir)


def test_similarity_plot_is_written(golden, tmp_path):
    sims = recall.relationship_similarities(golden["map_features"], golden["map_genes"],
                                            require(ANNOTATIONS), ["CORUM", "SIGNOR"])
    path = plots.plot_similarity_distribution(sims, tmp_path / "recall.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
