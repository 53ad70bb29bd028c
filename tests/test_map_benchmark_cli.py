"""`python -m eval.map_benchmark` end to end on generated parquet files, and its error messages."""
import json

import numpy as np
import pandas as pd
import pytest

from eval import map_benchmark
from tests.reference_data import ANNOTATIONS, GOLDEN, require


def _run(tmp_path, features, annotations, *extra, perturbation_col="gene", control="non-targeting"):
    out = tmp_path / "map" / "report.json"
    code = map_benchmark.main(["--embeddings", str(features), "--perturbation_col", perturbation_col,
                               "--batch_col", "batch", "--control", control, "--annotations",
                               str(annotations), "--out", str(out.parent), *extra])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_golden_raw_features_reproduce_efaar_recall(tmp_path):
    g = np.load(require(GOLDEN) / "golden.npz")
    df = pd.DataFrame(g["X"], columns=[f"feature_{i}" for i in range(g["X"].shape[1])])
    df["gene"], df["batch"] = g["genes"], g["batch"]
    df.to_parquet(tmp_path / "x.parquet")
    code, report = _run(tmp_path, tmp_path / "x.parquet", require(ANNOTATIONS), "--pca_components", "16",
                        "--correction", "tvn", "--aggregate", "mean", "--plot", str(tmp_path / "r.png"))
    assert code == 0
    with open(GOLDEN / "golden_results.json") as f:
        assert report["recall"] == json.load(f)["known_relationship_benchmark"]
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert report["map"]["perturbations"] == 300 and report["map"]["dims"] == 16
    rc = report["consistency"]["replicate_consistency"]
    assert rc["replicates"] == "batch" and 0 <= rc["ks_statistic"] <= 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """30 genes in 6 complexes (shared effect), 3 batches with offsets, 12 controls per batch."""
    root = tmp_path_factory.mktemp("screen")
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(30)]
    complex_effect = rng.standard_normal((6, 24)) * 3
    rows = []
    for b in range(3):
        offset = rng.standard_normal(24) * 5
        for i, gene in enumerate(genes):
            for _ in range(2):
                rows.append((gene, f"b{b}", complex_effect[i // 5] + offset + rng.standard_normal(24)))
        rows += [("ctrl", f"b{b}", offset + rng.standard_normal(24)) for _ in range(12)]
    df = pd.DataFrame(np.stack([r[2] for r in rows]).astype(np.float32),
                      columns=[f"feature_{i}" for i in range(24)])
    df["gene"], df["batch"] = [r[0] for r in rows], [r[1] for r in rows]
    df["well_id"] = [f"w{i}" for i in range(len(df))]
    df.to_parquet(root / "screen.parquet")
    ann = root / "annotations"
    ann.mkdir()
    pairs = [(genes[c * 5 + i], genes[c * 5 + j]) for c in range(6) for i in range(5) for j in range(i)]
    (ann / "SyntheticComplex.txt").write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    (ann / "Unrelated.txt").write_text("entity1,entity2\nG00,G29\nG01,G28\n")
    (ann / "README.txt").write_text("not a table\n")
    return root, ann, df


def test_synthetic_screen_recalls_its_complexes(tmp_path, synthetic):
    root, ann, _ = synthetic
    code, report = _run(tmp_path, root / "screen.parquet", ann, "--control", "ctrl",
                        "--pca_components", "8", "--correction", "centerscale", "--aggregate", "median",
                        "--thresholds", "0.05,0.95", "0.2,0.8", control="ctrl")
    assert code == 0
    rec = {r["source"]: r for r in report["recall"]}
    assert set(rec) == {"SyntheticComplex", "Unrelated"}
    assert rec["SyntheticComplex"]["query_distribution_size"] == 60
    assert rec["SyntheticComplex"]["null_distribution_size"] == 30 * 29 // 2
    # the 60 complex pairs are the most similar of the 435: the top 5% (21 pairs) holds only
    # 21 of them, the top 20% all of them (random would give 0.10 and 0.40)
    assert rec["SyntheticComplex"]["recall_0.05_0.95"] == 21 / 60
    assert rec["SyntheticComplex"]["recall_0.2_0.8"] == 1.0
    assert report["consistency"]["perturbation_consistency"]["fraction_consistent"] > 0.9
    # JUMP-CP's mAP (copairs): every gene has its complex's effect, so all are told from the controls, and
    # each gene's 4 listed partners are its nearest genes; the 2 unrelated pairs are not retrieved
    mean_ap = report["mean_average_precision"]
    assert mean_ap["activity"]["num_perturbations"] == 30 and mean_ap["activity"]["fraction_retrieved"] == 1.0
    by_source = mean_ap["consistency"]["sources"]
    assert by_source["SyntheticComplex"]["mean_average_precision"] == 1.0
    assert by_source["SyntheticComplex"]["fraction_retrieved"] == 1.0
    assert by_source["Unrelated"]["num_groups"] == 4 and by_source["Unrelated"]["fraction_retrieved"] == 0.0
    code, report = _run(tmp_path, root / "screen.parquet", ann, "--sources", "Unrelated",
                        "--correction", "none", "--pca_components", "0", control="ctrl")
    assert code == 0 and [r["source"] for r in report["recall"]] == ["Unrelated"]


def test_metadata_join_filter_and_well_averaging(tmp_path, synthetic):
    root, ann, df = synthetic
    feats = pd.concat([df[["well_id"] + [c for c in df if c.startswith("feature_")]]] * 2)  # 2 tiles/well
    feats.to_parquet(tmp_path / "tiles.parquet")
    meta = df[["well_id", "gene", "batch"]].assign(kind=np.where(df.gene == "G29", "drop", "keep"))
    meta.to_csv(tmp_path / "meta.csv", index=False)
    code, report = _run(tmp_path, tmp_path / "tiles.parquet", ann, "--metadata", str(tmp_path / "meta.csv"),
                        "--average_by", "well_id", "--where", "kind=keep", "--pca_components", "8",
                        control="ctrl")
    assert code == 0
    assert report["map"]["rows"] == len(df) - 6 and report["map"]["perturbations"] == 29


@pytest.mark.parametrize("mutate, extra, message", [
    (lambda d: d.drop(columns=["batch"]), [], "no column 'batch'"),
    (lambda d: d[["gene", "batch"]], [], "no 'feature_\\*' columns"),
    (lambda d: d.assign(feature_3=np.where(d.index == 5, np.nan, d.feature_3)), [], "NaN"),
    (lambda d: d, ["--control", "EMPTY_control"], "'EMPTY_control' does not occur"),
])
def test_bad_inputs_exit_with_a_clear_message(tmp_path, synthetic, capsys, mutate, extra, message):
    _, ann, df = synthetic
    mutate(df).to_parquet(tmp_path / "bad.parquet")
    code, _ = _run(tmp_path, tmp_path / "bad.parquet", ann, *extra, control="ctrl")
    assert code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


# --- the parquet reader: features column by column into one array, the same as the pandas path ------------

def _pandas_reference(path, metadata_path=None, join_on="well_id", where=(), average_by=None, dtype=None):
    """load_embeddings as it was written with pandas (whole frame read, merged, filtered, averaged)."""
    df = pd.read_parquet(path)
    cols = [c for c in df.columns if str(c).startswith("feature_")]
    if metadata_path:
        meta = pd.read_csv(metadata_path)
        meta = meta.drop(columns=[c for c in meta.columns if c in df.columns and c != join_on])
        df = df.merge(meta, on=join_on, how="inner")
    for cond in where:
        col, _, value = cond.partition("=")
        df = df[df[col].astype(str) == value]
    if average_by:
        meta_cols = [c for c in df.columns if c not in cols]
        df = df.groupby(average_by, sort=False).agg(
            {**{c: "mean" for c in cols}, **{c: "first" for c in meta_cols if c != average_by}}).reset_index()
    x = df[cols].to_numpy()
    x = x.astype(dtype) if dtype else (x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64))
    return x, df.drop(columns=cols).reset_index(drop=True), cols


def _same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0].dtype == want[0].dtype and got[2] == want[2]
    pd.testing.assert_frame_equal(got[1], want[1])


@pytest.fixture()
def wells(tmp_path):
    """A float32 wells table written by pandas: interleaved metadata, a non-range index, 3 row groups."""
    rng = np.random.default_rng(3)
    n = 90
    df = pd.DataFrame(rng.standard_normal((n, 6)).astype(np.float32), columns=[f"feature_{i}" for i in range(6)],
                      index=np.arange(n) + 1000)
    df.insert(2, "well_id", [f"w{i % 30}" for i in range(n)])
    df["gene"] = rng.choice(["g1", "g2", "ctrl"], n)
    df["plate"] = rng.integers(0, 3, n)
    path = tmp_path / "wells.parquet"
    df.to_parquet(path, row_group_size=32)
    meta = pd.DataFrame({"well_id": [f"w{i}" for i in range(0, 30, 2)], "kind": ["a", "b", "a"] * 5,
                         "gene": "shadowed"})
    meta.to_csv(tmp_path / "meta.csv", index=False)
    return path, tmp_path / "meta.csv"


@pytest.mark.parametrize("kwargs", [
    {}, {"dtype": "float64"}, {"where": ["gene=g1"]}, {"where": ["plate=2", "gene=ctrl"]}, {"average_by": "well_id"},
    {"metadata": True}, {"metadata": True, "where": ["kind=a"], "average_by": "well_id"},
])
def test_parquet_reader_equals_the_pandas_path(wells, monkeypatch, kwargs):
    path, meta_csv = wells
    monkeypatch.setattr(map_benchmark, "READ_BYTES", 90 * 4 * 4)   # 4 columns per read: several groups
    kwargs = dict(kwargs)
    if kwargs.pop("metadata", False):
        kwargs["metadata_path"] = str(meta_csv)
    got = map_benchmark.load_embeddings(str(path), **kwargs)
    _same(got, _pandas_reference(str(path), **kwargs))
    if not kwargs:
        assert got[0].flags.f_contiguous and got[0].dtype == np.float32   # read as it is stored, column-major


def test_parquet_reader_dtypes_and_nulls(tmp_path, capsys):
    n = 40
    rng = np.random.default_rng(0)
    base = {"gene": [f"g{i % 4}" for i in range(n)], "batch": ["b0", "b1"] * (n // 2)}
    cases = {
        "mixed": {"feature_0": rng.standard_normal(n).astype(np.float32), "feature_1": rng.standard_normal(n)},
        "ints": {"feature_0": rng.integers(0, 9, n), "feature_1": rng.integers(0, 9, n).astype(np.int32)},
        "bools": {"feature_0": rng.random(n) > 0.5, "feature_1": rng.standard_normal(n).astype(np.float32)},
        "half": {"feature_0": rng.standard_normal(n).astype(np.float16)},
    }
    for name, cols in cases.items():
        pd.DataFrame({**cols, **base}).to_parquet(tmp_path / f"{name}.parquet")
        for dtype in (None, "float32"):
            _same(map_benchmark.load_embeddings(str(tmp_path / f"{name}.parquet"), dtype=dtype),
                  _pandas_reference(str(tmp_path / f"{name}.parquet"), dtype=dtype))
    nulls = pd.DataFrame({"feature_0": pd.array([1.0, None, 3.0] * 10, dtype="Float32"),
                          "feature_1": pd.array([1, 2, None] * 10, dtype="Int64"), "gene": "g", "batch": "b"})
    nulls.to_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"20 rows have NaN/inf features \(columns \['feature_0', 'feature_1'\]\)"):
        map_benchmark.load_embeddings(str(tmp_path / "nulls.parquet"))
    pd.DataFrame({"feature_0": ["a", "b"], "gene": "g"}).to_parquet(tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"feature columns are not numeric: \['feature_0'\]"):
        map_benchmark.load_embeddings(str(tmp_path / "text.parquet"))
    (tmp_path / "not.parquet").write_text("feature_0,gene\n1,g\n")
    with pytest.raises(ValueError, match="cannot read as parquet"):
        map_benchmark.load_embeddings(str(tmp_path / "not.parquet"))


def test_parquet_reader_peak_memory_is_the_matrix_not_the_file(tmp_path):
    """The memory-mapped read drops the file's pages after each group of columns: the peak RSS of a process
    reading a ~300 MB parquet grows by about the matrix (measured 1.4x: matrix, one group of columns,
    allocator caches), not by matrix + file (measured 2.8x when the pages are kept)."""
    import subprocess
    import sys
    from pathlib import Path
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    rows, cols = 100_000, 512
    rng = np.random.default_rng(0)
    table = {f"feature_{j}": rng.standard_normal(rows, dtype=np.float32) for j in range(cols)}
    path = tmp_path / "wide.parquet"
    pd.DataFrame({**table, "gene": np.repeat(["a", "b"], rows // 2)}).to_parquet(path)
    del table
    code = ("import re; from eval import map_benchmark as m\n"
            "def kb(k): return int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS')\n"
            f"x, *_ = m._read_parquet_features({str(path)!r}, None)\n"
            "print(x.nbytes, (kb('VmHWM') - base) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    matrix, grown = map(int, out.stdout.split())
    assert path.stat().st_size > 0.9 * matrix
    assert grown < 2.0 * matrix, (grown, matrix)


def test_streamed_pca_equals_the_read_then_pca_path(tmp_path, monkeypatch, capsys):
    """A plain parquet run decodes its features straight into efaar.ColumnPCA (standardised per column, Gram
    blocks on a worker thread): the same PCA as reading the matrix and then `embed_by_pca`, within float32
    rounding, for contiguous and interleaved batches, several row groups and groups of columns, float32 and
    float64 files; the command's report equals the one from the same table as CSV (the read-then-PCA path);
    a NaN still gets the whole read's message; the command line's early workspace has the file's shape and is
    the one the PCA fills."""
    from eval import efaar
    rng = np.random.default_rng(5)
    n, d = 600, 40
    genes = np.array([f"g{i}" for i in range(20)] + ["non-targeting"])
    monkeypatch.setattr(map_benchmark, "READ_BYTES", n * 4 * 6)        # 6 columns per read
    monkeypatch.setattr(efaar, "GRAM_COLS", 16)                         # several Gram blocks, one partial
    monkeypatch.setattr(efaar, "GRAM_ROWS", 256)                        # several row chunks per block
    for layout, dtype in (("contiguous", np.float32), ("interleaved", np.float32), ("interleaved", np.float64)):
        batch = np.repeat(np.arange(3), n // 3) if layout == "contiguous" else rng.integers(0, 3, n)
        x = (rng.standard_normal((n, d)) + 50 * batch[:, None] + rng.standard_normal(d)).astype(dtype)
        df = pd.DataFrame(x, columns=[f"feature_{j}" for j in range(d)])
        df["gene"], df["batch"] = rng.choice(genes, n), [f"b{b}" for b in batch]
        path = tmp_path / f"{layout}_{np.dtype(dtype).name}.parquet"
        df.to_parquet(path, row_group_size=250)
        source = map_benchmark._ParquetFeatures(str(path), None)
        streamed = map_benchmark._streamed_pca(source, df["batch"].to_numpy(), 8)
        reference = efaar.embed_by_pca(x, df["batch"].to_numpy(), 8, backend="numpy")
        assert streamed.dtype == dtype and streamed.shape == reference.shape
        signs = np.sign((streamed * reference).sum(axis=0))
        tol = 1e-3 if dtype == np.float32 else 1e-9
        assert np.abs(streamed * signs - reference).max() < tol * np.abs(reference).max(), layout
    df.to_csv(tmp_path / "same.csv", index=False)
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "Pairs.txt").write_text("entity1,entity2\n" + "".join(f"g{i},g{i + 1}\n" for i in range(0, 19, 2)))
    _, from_parquet = _run(tmp_path, path, tables, "--no_mean_average_precision")
    _, from_csv = _run(tmp_path, tmp_path / "same.csv", tables, "--no_mean_average_precision")
    assert from_parquet["recall"] == from_csv["recall"]
    numbers = {k: v for k, v in from_csv["consistency"]["replicate_consistency"].items() if k != "replicates"}
    assert {k: from_parquet["consistency"]["replicate_consistency"][k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    df.loc[7, "feature_3"] = np.nan
    df.to_parquet(tmp_path / "nan.parquet")
    code, _ = _run(tmp_path, tmp_path / "nan.parquet", tables)
    assert code == 2
    assert "nan.parquet: 1 rows have NaN/inf features (columns ['feature_3'])" in capsys.readouterr().err
    map_benchmark._early_workspace(["--embeddings", str(path), "--perturbation_col", "gene"])
    workspace = map_benchmark._WORKSPACE[0]
    assert workspace.shape == (n, d) and workspace.dtype == np.float64 and workspace.flags.f_contiguous
    map_benchmark._streamed_pca(map_benchmark._ParquetFeatures(str(path), None), df["batch"].to_numpy(), 8)
    assert not map_benchmark._WORKSPACE                                  # taken by the PCA
    for extra in (["--where", "gene=g1"], ["--pca_components=0"], ["--dtype", "float32"]):
        map_benchmark._early_workspace(["--embeddings", str(path), *extra])
        assert not map_benchmark._WORKSPACE, extra
