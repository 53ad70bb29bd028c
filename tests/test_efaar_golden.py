"""EFAAR map building equals the efaar_benchmarking 1.0 goldens (golden.npz)."""
import numpy as np
import pytest

from eval import efaar
from tests.reference_data import GOLDEN, require

CONTROL = "non-targeting"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(require(GOLDEN) / "golden.npz"))


def _cosines(x):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return u @ u.T


def _sign_aligned(ours, ref):
    """Flip each column of `ours` to the sign of `ref` (PCA axes are defined up to sign)."""
    return ours * np.sign(np.sum(ours * ref, axis=0))


def test_pca_matches_sklearn_fit_transform(golden):
    emb = efaar.embed_by_pca(golden["X"], golden["batch"], n_components=16)
    ref = golden["emb_pca"]
    assert emb.shape == ref.shape and emb.dtype == np.float64
    assert np.abs(_sign_aligned(emb, ref) - ref).max() < 1e-10          # measured 1.3e-12
    assert np.abs(_cosines(emb) - _cosines(ref)).max() < 1e-10
    # sklearn >= 1.5 sign convention is reproduced too, not only up to sign
    assert np.abs(emb - ref).max() < 1e-10


def test_centerscale_on_controls_per_batch(golden):
    ctrl = golden["genes"] == CONTROL
    out = efaar.centerscale_on_controls(golden["emb_pca"], ctrl, golden["batch"])
    assert np.abs(out - golden["emb_cs"]).max() < 1e-12                  # measured 0.0
    b0 = (golden["batch"] == "b0") & ctrl
    np.testing.assert_allclose(out[b0].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(out[b0].std(0), 1, atol=1e-12)


def test_tvn_on_controls_per_batch(golden):
    ctrl = golden["genes"] == CONTROL
    out = efaar.tvn_on_controls(golden["emb_pca"], ctrl, golden["batch"])
    assert np.abs(_sign_aligned(out, golden["emb_tvn"]) - golden["emb_tvn"]).max() < 1e-11  # 8.6e-14
    assert np.abs(_cosines(out) - _cosines(golden["emb_tvn"])).max() < 1e-11


def test_aggregate_mean_and_median(golden):
    feats, labels = efaar.aggregate(golden["emb_tvn"], golden["genes"], "mean", drop=[CONTROL])
    assert (labels == golden["map_genes"]).all()
    assert np.abs(feats - golden["map_features"]).max() < 1e-13          # measured 0.0
    med, _ = efaar.aggregate(golden["emb_tvn"], golden["genes"], "median", drop=[CONTROL])
    rows = golden["genes"] == labels[7]
    np.testing.assert_array_equal(med[7], np.median(golden["emb_tvn"][rows], axis=0))


def test_build_map_from_raw_features(golden):
    pmap = efaar.build_map(golden["X"], golden["genes"], CONTROL, golden["batch"], pca_components=16)
    assert (pmap.labels == golden["map_genes"]).all()
    ref = golden["map_features"]
    assert np.abs(_cosines(pmap.features) - _cosines(ref)).max() < 1e-10   # measured ~1e-12
    assert pmap.embeddings.shape == golden["emb_tvn"].shape


def test_float32_input_stays_float32_and_close(golden):
    emb = efaar.embed_by_pca(golden["X"].astype(np.float32), golden["batch"], n_components=16)
    assert emb.dtype == np.float32
    assert np.abs(_sign_aligned(emb, golden["emb_pca"]) - golden["emb_pca"]).max() < 1e-3


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_streamed_chunks_and_backends_agree(golden, backend):
    """Chunked streaming (genome scale) and the jax kernels (accelerators) give the same PCA,
    also when batches are interleaved rather than contiguous."""
    x, b = golden["X"], golden["batch"]
    one = efaar.embed_by_pca(x, b, 16, backend="numpy", chunk_rows=len(x))
    chunked = efaar.embed_by_pca(x, b, 16, chunk_rows=500, backend=backend)
    assert np.abs(one - chunked).max() < 1e-11
    perm = np.random.default_rng(0).permutation(len(x))
    shuffled = efaar.embed_by_pca(x[perm], b[perm], 16, chunk_rows=700, backend=backend)
    assert np.abs(shuffled - one[perm]).max() < 1e-11
    # a column-major matrix (as eval.map_benchmark reads parquet files) is streamed in its own order
    for rows in (slice(None), perm):
        fortran = efaar.embed_by_pca(np.asfortranarray(x[rows]), b[rows], 16, chunk_rows=500, backend=backend)
        assert np.abs(fortran - one[rows]).max() < 1e-11



def test_in_place_pca_equals_the_streamed_one(golden):
    """embed_by_pca(overwrite=True) on a column-major matrix (eval.map_benchmark's parquet read) standardises
    it in place and gives the streamed PCA: float64 to 1e-11 with contiguous and interleaved batches, float32
    within its rounding even under batch offsets 1,000x the spread; other inputs are left untouched."""
    x, b = golden["X"], golden["batch"]
    streamed = efaar.embed_by_pca(x, b, 16, backend="numpy")
    perm = np.random.default_rng(0).permutation(len(x))
    for rows in (slice(None), perm):
        owned = np.asfortranarray(x[rows])
        in_place = efaar.embed_by_pca(owned, b[rows], 16, overwrite=True, chunk_rows=500, backend="numpy")
        assert np.abs(in_place - streamed[rows]).max() < 1e-11
        assert not np.array_equal(owned, x[rows])          # it was used as the workspace
    kept = np.asfortranarray(x)
    efaar.embed_by_pca(kept, b, 16, backend="numpy")       # overwrite defaults to False
    assert np.array_equal(kept, x)
    row_major = np.ascontiguousarray(x)
    efaar.embed_by_pca(row_major, b, 16, overwrite=True, backend="numpy")   # not column-major: streamed
    assert np.array_equal(row_major, x)
    offsets = 1000 * np.abs(x).max() * (1 + np.arange(b.max() + 1 if b.dtype.kind in "iu" else len(set(b))))
    codes = np.unique(b, return_inverse=True)[1]
    shifted = x + offsets[codes][:, None]
    exact = efaar.embed_by_pca(shifted, b, 16, backend="numpy")            # float64: shift-invariant
    assert np.abs(exact - streamed).max() < 1e-8
    rounded = shifted.astype(np.float32)                    # the float32 input, and its exact PCA
    exact = efaar.embed_by_pca(rounded.astype(np.float64), b, 16, backend="numpy")
    f32 = efaar.embed_by_pca(np.asfortranarray(rounded), b, 16, overwrite=True, backend="numpy")
    f32_streamed = efaar.embed_by_pca(rounded, b, 16, backend="numpy")
    assert f32.dtype == np.float32
    scale = np.abs(exact).max()
    assert np.abs(_sign_aligned(f32, exact) - exact).max() < 1e-3 * scale
    assert np.abs(_sign_aligned(f32, exact) - exact).max() <= 2 * np.abs(_sign_aligned(f32_streamed, exact) - exact).max()

def test_variance_fraction_components(golden):
    emb = efaar.pca(golden["X"], n_components=0.5)
    full = efaar.pca(golden["X"], n_components=None)
    var = full.var(axis=0)
    k = int(np.searchsorted(np.cumsum(var / var.sum()), 0.5, side="right") + 1)
    assert emb.shape[1] == k


def test_errors_name_the_problem(golden):
    with pytest.raises(ValueError, match="does not occur"):
        efaar.build_map(golden["X"], golden["genes"], "no-such-control", golden["batch"])
    with pytest.raises(ValueError, match="mean' or 'median"):
        efaar.aggregate(golden["X"], golden["genes"], "mode")
    with pytest.raises(ValueError, match="correction must be"):
        efaar.correct(golden["X"], golden["genes"] == CONTROL, golden["batch"], "combat")
    with pytest.raises(ValueError, match="n_components"):
        efaar.pca(golden["X"], n_components=64)


def test_column_pca_gram_is_the_same_bits_however_the_worker_got_on(monkeypatch):
    """ColumnPCA's Gram matrix is Z^T Z of the standardised float32 columns, and bit for bit the same whatever
    the worker had done when `complete` came: all of it, nothing (no worker), part of a block (its other row
    chunks then run in order), a block just begun. `complete` runs the rest as one task per block (the
    partial last group included), largest first, and twice adds nothing."""
    import threading
    rng = np.random.default_rng(2)
    n, d = 300, 50
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.standard_normal(d)
    codes = np.repeat([0, 1, 2], n // 3)
    monkeypatch.setattr(efaar, "GRAM_COLS", 8)                 # 6 whole blocks and 2 columns
    monkeypatch.setattr(efaar, "GRAM_ROWS", 128)               # 3 row chunks per block
    gate, hold = threading.Event(), [None]
    block, chunks, tasks = efaar.ColumnPCA._gram_block, efaar.ColumnPCA._gram_chunks, []

    def held_block(self, j0, j1, rows):   # the held job waits until complete() has been called
        if (j0, rows.start) == hold[0] and threading.current_thread().name.startswith("gram"):
            gate.wait(10)
        block(self, j0, j1, rows)
    monkeypatch.setattr(efaar.ColumnPCA, "_gram_block", held_block)
    monkeypatch.setattr(efaar.ColumnPCA, "_gram_chunks",
                        lambda self, j0, j1, rows: (tasks.append((j0, j1, rows[0].start)), chunks(self, j0, j1, rows)))
    whole = [(j0, j0 + 8, 0) for j0 in range(8, 48, 8)] + [(48, 50, 0)]
    reference = None
    # (worker?, held job (block start, first row), the tasks complete() ran: (j0, j1, first row))
    for background, held, expected, cores in ((False, None, [(0, 8, 0)] + whole, 1), (True, None, [(48, 50, 0)], 1),
                                              (True, (0, 0), [(0, 8, 128)] + whole, 1), (True, (0, 256), whole, 1),
                                              (True, (8, 0), [(8, 16, 128)] + whole[1:], 1),
                                              (False, None, [(0, 8, 0)] + whole, 3)):
        monkeypatch.setattr(efaar.os, "cpu_count", lambda: cores)   # the tasks' threads
        gate.clear()
        hold[0] = held
        pca = efaar.ColumnPCA(codes, 3, d, np.float32, background=background)
        for j in range(d):
            assert pca.put(j, [x[:, j]])
            pca.ready(j + 1)
        if held is None:
            gate.set()
            for job, *_ in pca._jobs:                  # let the worker finish every queued job
                job.result()
        else:
            threading.Timer(0.2, gate.set).start()   # later jobs are still queued when complete() drops them
        pca.complete()
        pca.complete()
        assert sorted(tasks) == sorted(expected), (background, held)
        if cores == 1:   # largest first (GEMM width times rows)
            assert tasks == sorted(expected, key=lambda t: -t[1] * (n - t[2]))
        tasks.clear()
        gram = np.triu(pca.gram)
        z = pca.z.astype(np.float64)
        np.testing.assert_allclose(gram + np.triu(gram, 1).T, z.T @ z, rtol=1e-5, atol=1e-3)
        if reference is None:
            reference = gram
        np.testing.assert_array_equal(gram, reference)
