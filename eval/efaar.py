"""EFAAR map building: PCA, centerscale, TVN and aggregation, equal to efaar_benchmarking 1.0.

Embeddings (one row per well or crop) go through
  embed_by_pca          StandardScaler per batch on all rows, then exact PCA (sklearn `fit_transform`);
  centerscale_on_controls / tvn_on_controls   batch correction fitted on control rows;
  aggregate             mean or median per perturbation, control rows dropped;
and `build_map` chains them. Every function takes plain numpy arrays (plus label arrays for
batches / perturbations) and returns numpy arrays in the input's float dtype, as sklearn does, so a
float64 input reproduces the EFAAR goldens to ~1e-12 and a float32 input runs at float32 speed.

The PCA is the heavy part at genome scale (322k rows x 1664 features per block): it streams row
chunks (standardise, accumulate z^T z, project), so the standardised copy of the input is never
materialised (peak memory ~ input + output + one chunk). On CPU the chunks go through reused numpy
buffers (syrk for z^T z) in the input's memory order, so a column-major matrix (as
eval.map_benchmark reads a parquet file) is streamed as it is; on an accelerator through jitted jax
kernels (`backend`; jax is imported only then). The rest works on (rows x components) matrices and
stays in numpy.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import linalg, sparse
import threadpoolctl

CHUNK_ROWS = 32768  # rows per streamed chunk: ~200 MB of float32 at 1664 features


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, features) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _codes(labels, n: int, name: str) -> tuple[np.ndarray, int]:
    """Integer codes 0..B-1 for a label array (None -> one group)."""
    if labels is None:
        return np.zeros(n, np.int32), 1
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} has shape {labels.shape}, expected ({n},) to match the rows")
    codes, uniques = pd.factorize(labels)
    if (codes < 0).any():
        raise ValueError(f"{name} contains missing values (NaN/None)")
    return codes.astype(np.int32), len(uniques)


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    """The process's BLAS libraries, found once (numpy's and scipy's, both loaded by this module's imports):
    a fresh `threadpool_limits` walks every loaded shared object in Python, 0.1-0.4 s in a process that
    has pandas and pyarrow loaded."""
    return threadpoolctl.ThreadpoolController()


def single_threaded_lapack() -> contextlib.AbstractContextManager:
    """OpenBLAS's threaded symmetric eigensolver (dsytrd's level-2 steps) is slower than one thread
    for d ~ 100-2000, and 10-40x slower when the cores are shared (measured 0.4 s vs 16 s for
    d = 1664 on a busy 2-core box); level-3 BLAS elsewhere keeps all threads."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _precision(dtype) -> contextlib.AbstractContextManager:
    """float64 inputs need jax's x64 mode; scoped so the caller's jax config is untouched."""
    import jax
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def _chunks(n: int, chunk_rows: int):
    """Near-equal row slices, so the jitted kernels see at most two shapes."""
    count = max(1, -(-n // chunk_rows))
    size = -(-n // count)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --- StandardScaler statistics ------------------------------------------------------------------

def _constant_features(var: np.ndarray, mean: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sklearn's `_is_constant_feature`: variance indistinguishable from rounding noise."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


def _scaler(mean: np.ndarray, var: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) as StandardScaler stores them: scale 1 for constant features."""
    scale = np.sqrt(var)
    scale[_constant_features(var, mean, np.reshape(count, (-1,) + (1,) * (var.ndim - 1)))] = 1.0
    return mean, scale


def _pieces(codes: np.ndarray, num_groups: int, chunk_rows: int):
    """(rows, group) pieces of at most chunk_rows rows from one group each. `rows` is a slice (a
    view, no copy) when the group's rows are contiguous, as in batch-sorted data, else indices."""
    for g in range(num_groups):
        idx = np.flatnonzero(codes == g)
        if len(idx) == 0:
            raise ValueError(f"batch #{g} has no rows")
        contiguous = idx[-1] - idx[0] + 1 == len(idx)
        for start in range(0, len(idx), chunk_rows):
            part = idx[start:start + chunk_rows]
            yield (slice(part[0], part[-1] + 1) if contiguous else part), g


def _use_jax(backend: str) -> bool:
    """'numpy' streams through host buffers (fastest on CPU: no host->device copies, and numpy's
    syrk does half the flops of a dot for z^T z); 'jax' runs jitted chunk kernels (accelerators);
    'auto' picks jax only when the process has imported jax and jax's default device is not a CPU
    (a process that never imported jax holds its data on the host, and is not made to import it)."""
    if backend not in ("auto", "numpy", "jax"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'jax', got {backend!r}")
    if backend == "auto":
        return "jax" in sys.modules and sys.modules["jax"].default_backend() != "cpu"
    return backend == "jax"


@functools.cache
def _jax_kernels():
    """The jitted chunk kernels of the jax backend (built, and jax imported, on first use)."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames="num_groups")
    def moments(x, codes, shift, num_groups: int):
        """Per-group row count, sum and sum of squares of x - shift[group]."""
        centered = x - shift[codes]
        count = jax.ops.segment_sum(jnp.ones(len(x), x.dtype), codes, num_groups)
        return (count, jax.ops.segment_sum(centered, codes, num_groups),
                jax.ops.segment_sum(centered * centered, codes, num_groups))

    @jax.jit
    def gram(x, codes, mean, inv_scale):
        z = (x - mean[codes]) * inv_scale[codes]
        return z.T @ z, z.sum(axis=0)

    @jax.jit
    def project(x, codes, mean, inv_scale, center, components):
        z = (x - mean[codes]) * inv_scale[codes]
        return (z - center) @ components.T

    return jnp, moments, gram, project


def _buffer_like(buf: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """A view of the head of a flat buffer shaped like `piece` (rows, d), in its memory order: pieces of a
    column-major matrix get a column-major view, so the elementwise passes and BLAS read and write
    contiguous columns rather than transposing."""
    m, d = piece.shape
    if piece.strides[0] < piece.strides[1]:
        return buf[:m * d].reshape(d, m).T
    return buf[:m * d].reshape(m, d)


def batch_moments(x: np.ndarray, codes: np.ndarray, num_groups: int, chunk_rows: int = CHUNK_ROWS,
                  backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group count, mean and biased variance of the rows of x (float64), streamed in chunks.

    Deviations are summed from a shift near the mean (the group's first chunk mean) and both the
    mean and the variance are corrected with them (sklearn's `_incremental_mean_and_var` does the
    same), so float32 keeps its precision even when batch offsets dwarf the spread.
    """
    dt, d = x.dtype, x.shape[1]
    count = np.zeros(num_groups)
    shift, dev, sq = np.zeros((num_groups, d)), np.zeros((num_groups, d)), np.zeros((num_groups, d))
    if _use_jax(backend):
        jnp, moments_kernel, _, _ = _jax_kernels()
        with _precision(dt):
            for g in range(num_groups):   # shift: the mean of each group's first rows
                rows = np.flatnonzero(codes == g)[:chunk_rows]
                shift[g] = x[rows].mean(axis=0, dtype=np.float64) if len(rows) else 0.0
            shift_j = jnp.asarray(shift, dt)
            for sl in _chunks(len(x), chunk_rows):
                c, s, s2 = moments_kernel(jnp.asarray(x[sl]), jnp.asarray(codes[sl]), shift_j, num_groups)
                count, dev, sq = count + np.asarray(c), dev + np.asarray(s), sq + np.asarray(s2)
        shift = shift.astype(dt).astype(np.float64)   # the kernel subtracted the rounded shift
    else:
        buf = np.empty(min(chunk_rows, len(x)) * d, dt)
        seen = np.zeros(num_groups, bool)
        for rows, g in _pieces(codes, num_groups, chunk_rows):
            piece = x[rows]
            if not seen[g]:
                seen[g] = True
                shift[g] = piece.mean(axis=0, dtype=np.float64).astype(dt)
            z = _buffer_like(buf, piece)
            np.subtract(piece, shift[g].astype(dt), out=z)
            count[g] += len(piece)
            dev[g] += z.sum(axis=0, dtype=np.float64)
            np.square(z, out=z)
            sq[g] += z.sum(axis=0, dtype=np.float64)
    mean = shift + dev / count[:, None]
    var = np.maximum((sq - dev ** 2 / count[:, None]) / count[:, None], 0.0)
    return count, mean, var


def centerscale_by_batch(features: np.ndarray, batches=None) -> np.ndarray:
    """StandardScaler fitted and applied per batch on all rows (EFAAR `centerscale_by_batch`)."""
    x = _as_float(features, "features")
    codes, nb = _codes(batches, len(x), "batches")
    count, mean, var = batch_moments(x, codes, nb)
    mean, scale = _scaler(mean, var, count)
    return ((x - mean[codes]) / scale[codes]).astype(x.dtype)


# --- PCA ----------------------------------------------------------------------------------------

def _n_components(n_components, explained: np.ndarray, limit: int) -> int:
    """sklearn semantics: int, None (all) or a variance fraction in (0, 1)."""
    if n_components is None:
        return limit
    if isinstance(n_components, float) and 0 < n_components < 1:
        ratio = np.cumsum(explained / explained.sum())
        return int(np.searchsorted(ratio, n_components, side="right") + 1)
    k = int(n_components)
    if not 1 <= k <= limit:
        raise ValueError(f"n_components={n_components} must be in [1, {limit}] (min(rows, features))")
    return k


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """sklearn >= 1.5 `svd_flip(u_based_decision=False)`: largest |loading| of each axis positive."""
    pivot = components[np.arange(len(components)), np.abs(components).argmax(axis=1)]
    return components * np.where(pivot < 0, -1.0, 1.0)[:, None]


@dataclasses.dataclass(frozen=True)
class PCAFit:
    components: np.ndarray          # (k, d), rows are principal axes (sklearn `components_`)
    explained_variance: np.ndarray  # (k,)
    center: np.ndarray              # (d,) mean of the (standardised) rows


def _pca_on_standardized(x, codes, num_groups, mean, scale, n_components, chunk_rows,
                         backend="auto") -> tuple[np.ndarray, PCAFit]:
    """Exact PCA of z = (x - mean[codes]) / scale[codes] without materialising z.

    The covariance is accumulated chunk by chunk, eigendecomposed in float64 and the top-k axes are
    sign-fixed like sklearn. This is sklearn's `covariance_eigh` solver; sklearn's `full` solver
    gives the same axes, and its `randomized` solver (chosen for > 1000 features) approximates them.
    """
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {n}")
    dt = x.dtype
    inv = 1.0 / scale
    gram, total = np.zeros((d, d)), np.zeros(d)
    if _use_jax(backend):
        jnp, _, gram_kernel, project_kernel = _jax_kernels()
        with _precision(dt):
            mean_j, inv_j = jnp.asarray(mean, dt), jnp.asarray(inv, dt)
            for sl in _chunks(n, chunk_rows):
                g, s = gram_kernel(jnp.asarray(x[sl]), jnp.asarray(codes[sl]), mean_j, inv_j)
                gram, total = gram + np.asarray(g), total + np.asarray(s)
    else:
        buf = np.empty(min(chunk_rows, n) * d, dt)
        for rows, g in _pieces(codes, num_groups, chunk_rows):
            z = _standardize_into(buf, x[rows], mean[g], inv[g])
            gram += z.T @ z          # same buffer on both sides: numpy calls syrk
            total += z.sum(axis=0, dtype=np.float64)
    center = total / n
    evals, components = _top_axes((gram - n * np.outer(center, center)) / (n - 1), n_components, n)
    out = np.empty((n, len(evals)), dt)
    if _use_jax(backend):
        with _precision(dt):
            comp_j, center_j = jnp.asarray(components, dt), jnp.asarray(center, dt)
            for sl in _chunks(n, chunk_rows):
                out[sl] = np.asarray(project_kernel(jnp.asarray(x[sl]), jnp.asarray(codes[sl]),
                                                    mean_j, inv_j, center_j, comp_j))
    else:
        axes = np.ascontiguousarray(components.T, dt)
        for rows, g in _pieces(codes, num_groups, chunk_rows):
            out[rows] = _standardize_into(buf, x[rows], mean[g], inv[g]) @ axes
        out -= (center @ components.T).astype(dt)    # centring after the matmul saves a pass
    return out, PCAFit(components, evals, center)


def _top_axes(cov: np.ndarray, n_components, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(variances, sign-fixed axes (k, d)) of the k largest eigenpairs of a covariance, float64.

    When k is known up front only those eigenpairs are computed (LAPACK MRRR), which makes the
    eigendecomposition of a 1664-dim covariance per block cheaper.
    """
    d = len(cov)
    limit = min(n, d)
    is_fraction = isinstance(n_components, float) and 0 < n_components < 1
    k = None if is_fraction else _n_components(n_components, None, limit)
    with single_threaded_lapack():
        if k is not None and k < d:
            evals, evecs = linalg.eigh(cov, subset_by_index=[d - k, d - 1], driver="evr")
        else:
            evals, evecs = np.linalg.eigh(cov)
    evals, evecs = np.maximum(evals[::-1], 0.0), evecs[:, ::-1]
    k = k or _n_components(n_components, evals, limit)
    return evals[:k], _flip_signs(evecs[:, :k].T)


def _standardize_into(buf: np.ndarray, piece: np.ndarray, mean: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """(piece - mean) * inv written into the head of a reused flat buffer (no allocation per chunk)."""
    z = _buffer_like(buf, piece)
    np.subtract(piece, mean.astype(buf.dtype), out=z)
    z *= inv.astype(buf.dtype)
    return z


def pca(features: np.ndarray, n_components=128, chunk_rows: int = CHUNK_ROWS,
        backend: str = "auto") -> np.ndarray:
    """`sklearn.decomposition.PCA(n_components).fit_transform(features)`, exact and sign-matched."""
    x = _as_float(features, "features")
    d = x.shape[1]
    out, _ = _pca_on_standardized(x, np.zeros(len(x), np.int32), 1, np.zeros((1, d)), np.ones((1, d)),
                                  n_components, chunk_rows, backend)
    return out


GRAM_COLS = 128       # columns per Gram block of ColumnPCA (one GEMM per block and row chunk)
GRAM_ROWS = 1 << 15   # rows per float32 GEMM (and worker job) of ColumnPCA; their results are summed in float64


class ColumnPCA:
    """`embed_by_pca` (StandardScaler per batch on all rows, then exact PCA) fed one column at a time.

    Written for speed on CPU: a parquet file is decoded column by column (eval.map_benchmark), so the
    features arrive that way. Each column is written into a column-major workspace and standardised
    per batch while it is in cache (float64 batch mean; float32 centring by the rounded mean, whose
    residual enters the variance and the PCA centre exactly, as the streaming path's shift does), and
    each group of GRAM_COLS finished columns gets its block of the Gram matrix,
    Z[:, :j1]^T Z[:, j0:j1], on a worker thread with one BLAS thread (float32 GEMMs of GRAM_ROWS rows,
    one job each, summed in float64), so the BLAS work of one group overlaps the decoding of the next.
    `complete` (once every column is in) drops the jobs the worker has not started and runs what is left
    as one task per block on every core, each with one BLAS thread; every block is summed over the same
    row chunks in the same order whoever computes it, so the Gram matrix (and the map) is the same bits
    from run to run, whatever the worker had got through. Measured on the 162,000 x 1,664 case of
    docs/eval.md, read + standardise + Gram in 3.8 s against 4.0 s one after the other, the Gram alone
    6.4 s on one core. `finish` eigendecomposes and projects.
    When a batch's rows are not contiguous the workspace holds the rows batch-sorted (a stable sort) and
    `finish` returns them in input order.

    `put(j, pieces)` copies column j from `pieces` (1-D arrays in row order, e.g. parquet chunks);
    `put(j)` standardises column j already in the workspace (`storage`, given up by the caller).
    Both return False, leaving the column unfinished, if it holds a NaN or an infinity.
    """

    def __init__(self, codes: np.ndarray, num_groups: int, num_features: int, dtype=np.float32,
                 storage: np.ndarray | None = None, background: bool = True):
        codes = np.asarray(codes)
        n, d = len(codes), int(num_features)
        if n < 2:
            raise ValueError(f"PCA needs at least 2 rows, got {n}")
        count = np.bincount(codes, minlength=num_groups)
        if (count == 0).any():
            raise ValueError(f"batch #{int(np.flatnonzero(count == 0)[0])} has no rows")
        edges = np.flatnonzero(np.diff(codes)) + 1
        if len(edges) + 1 == num_groups:          # every batch one run of rows: kept in input order
            self.order = None
            bounds, groups = np.concatenate([[0], edges, [n]]), codes[np.concatenate([[0], edges])]
        else:                                     # interleaved: the workspace is batch-sorted
            self.order = np.argsort(codes, kind="stable")
            bounds, groups = np.concatenate([[0], np.cumsum(count)]), np.arange(num_groups)
        self.segments = [(int(a), int(b), int(g)) for a, b, g in zip(bounds[:-1], bounds[1:], groups)]
        self.counts = np.diff(bounds).astype(np.float64)   # rows per segment
        if storage is None:
            storage = np.empty((d, n), dtype).T
        if storage.shape != (n, d) or not storage.flags.f_contiguous:
            raise ValueError(f"storage must be a column-major ({n}, {d}) array, got {storage.shape}")
        self.z, self.dtype = storage, storage.dtype
        self.gram, self.total = np.zeros((d, d)), np.zeros(d)
        self._ready, self._queued, self._jobs, self._complete = 0, 0, [], False
        self._pool = self._limits = None
        if background:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gram")
            # the worker's GEMMs run on one BLAS thread beside the decoding; OpenBLAS's threads wait for
            # each other, so two of them on a core that the decoder holds are slower than one
            self._limits = single_threaded_lapack()

    def put(self, j: int, pieces: Sequence[np.ndarray] | None = None) -> bool:
        col = self.z[:, j]
        src = col                                 # the column's values, in workspace row order
        if pieces is not None:
            src = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            if self.order is not None:
                np.take(src, self.order, out=col)
                src = col
            elif src.dtype != self.dtype:
                col[:] = src
                src = col
        elif self.order is not None:
            col[:] = col[self.order]
        sums = np.array([np.add.reduce(src[a:b], dtype=np.float64) for a, b, _ in self.segments])
        if not np.isfinite(sums).all():
            return False
        counts = self.counts
        mean = sums / counts
        shift = mean.astype(self.dtype)
        residual = mean - shift                   # mean of the centred rows of each segment
        sq = np.empty(len(counts))
        for i, ((a, b, _), s) in enumerate(zip(self.segments, shift)):
            seg = col[a:b]
            np.subtract(src[a:b], s, out=seg)     # the copy into the workspace is the centring
            sq[i] = np.dot(seg, seg)
        var = np.maximum(sq / counts - residual ** 2, 0.0)
        _, scale = _scaler(mean, var, counts)
        inv = 1.0 / scale
        for (a, b, _), f in zip(self.segments, inv.astype(self.dtype)):
            col[a:b] *= f
        self.total[j] = float(np.sum(counts * residual * inv))
        return True

    def ready(self, j1: int) -> None:
        """Columns < j1 are finished: with a worker, queue their Gram blocks, GRAM_COLS columns at a time
        (`complete` does the rest)."""
        self._ready = max(self._ready, j1)
        n = self.z.shape[0]
        while self._pool is not None and self._ready - self._queued >= GRAM_COLS:
            j0, self._queued = self._queued, self._queued + GRAM_COLS
            for r in range(0, n, GRAM_ROWS):   # a job per row chunk: `close` waits for one chunk at most
                rows = slice(r, min(n, r + GRAM_ROWS))
                self._jobs.append((self._pool.submit(self._gram_block, j0, self._queued, rows), j0, self._queued, rows))

    def _gram_block(self, j0: int, j1: int, rows: slice) -> None:
        """Rows `rows` of the Gram columns j0:j1: a GEMM for Z[:, :j0]^T Z[:, j0:j1] and a SYRK (numpy's
        `a.T @ a`) for the square, whose lower half is not computed (over the 128-column blocks a plain
        Z[:, :j1]^T Z[:, j0:j1] would compute 4.7% more of the matrix, d = 1664)."""
        z = self.z
        square = z[rows, j0:j1]
        if j0:
            self.gram[:j0, j0:j1] += z[rows, :j0].T @ square
        self.gram[j0:j1, j0:j1] += square.T @ square

    def _gram_chunks(self, j0: int, j1: int, rows: Sequence[slice]) -> None:
        for r in rows:
            self._gram_block(j0, j1, r)

    def close(self) -> list[tuple[int, int, slice]]:
        """Stops the worker: the queued Gram jobs it has not started are dropped and returned as
        (j0, j1, rows) in queue order, the one it is computing is waited for (`complete` calls it; call it
        when abandoning). The jobs are cancelled from the last one back, so the worker, which takes them in
        order, cannot start one behind a cancelled one: it ran exactly the jobs before the first dropped."""
        dropped = []
        try:
            for job, j0, j1, rows in reversed(self._jobs):
                if not job.cancel():
                    break
                dropped.append((j0, j1, rows))
            for job, *_ in self._jobs:
                if not job.cancelled():
                    job.result()
        finally:
            self._jobs = []
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            if self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None
        return dropped[::-1]

    def complete(self) -> None:
        """Finishes the Gram matrix once every column is in. The work left (the row chunks of the block the
        worker was in, every later GRAM_COLS block) runs as one task per block on one thread per core, each
        with one BLAS thread, largest first; a block's row chunks run in order on one thread. Every Gram
        entry is thus the same float32 GEMM or SYRK sums added in the same order whatever the worker had
        done: the result does not depend on the timing (nor on the number of cores). Idempotent."""
        if self._complete:
            return
        dropped = self.close()
        tasks: dict[tuple[int, int], list[slice]] = {}
        for j0, j1, rows in dropped:
            tasks.setdefault((j0, j1), []).append(rows)
        n, d = self.z.shape
        chunks = [slice(r, min(n, r + GRAM_ROWS)) for r in range(0, n, GRAM_ROWS)]
        for j0 in range(self._queued, d, GRAM_COLS):
            tasks[(j0, min(d, j0 + GRAM_COLS))] = chunks
        order = sorted(tasks, key=lambda block: -block[1] * sum(r.stop - r.start for r in tasks[block]))
        workers = max(1, min(os.cpu_count() or 1, len(order)))
        with single_threaded_lapack(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda block: self._gram_chunks(*block, tasks[block]), order))
        self._queued = d
        self._complete = True

    def finish(self, n_components) -> np.ndarray:
        """The (rows, k) PCA embeddings in input row order; the workspace is released."""
        n, d = self.z.shape
        self.complete()
        gram = np.triu(self.gram) + np.triu(self.gram, 1).T
        center = self.total / n
        evals, components = _top_axes((gram - n * np.outer(center, center)) / (n - 1), n_components, n)
        axes = np.ascontiguousarray(components.T, self.dtype)                  # (d, k)
        out = np.empty((n, len(evals)), self.dtype)

        step = 8192   # rows per chunk: 20 for 162,000 rows, so the threads end together

        def project(r: int) -> None:
            np.matmul(self.z[r:r + step], axes, out=out[r:r + step])
        # row chunks on one thread per core, each with one BLAS thread: OpenBLAS's own threads wait for
        # each other, so a core taken by other work here (another thread of the caller's) stalls them
        # all; independent chunks just share the cores
        workers = min(os.cpu_count() or 1, -(-n // step))
        with single_threaded_lapack(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(project, range(0, n, step)))
        out -= (center @ components.T).astype(self.dtype)
        self.z = None
        if self.order is not None:
            ordered = np.empty_like(out)
            ordered[self.order] = out
            out = ordered
        return out


def embed_by_pca(features: np.ndarray, batches=None, n_components=128,
                 chunk_rows: int = CHUNK_ROWS, backend: str = "auto", overwrite: bool = False) -> np.ndarray:
    """EFAAR `embed_by_pca`: centerscale per batch on all rows, then PCA(n_components).

    n_components: int, None (all) or a fraction of variance to keep, as in sklearn.
    Streams row chunks (peak memory ~ input + output + one chunk); `backend` see `_use_jax`.
    overwrite=True lets a caller that no longer needs `features` (a column-major float array, as
    eval.map_benchmark reads a parquet file) have it standardised in place (`ColumnPCA`): the same
    map to float32 rounding, about a second less per GB on CPU. Other inputs take the streaming path.
    """
    x = _as_float(features, "features")
    codes, nb = _codes(batches, len(x), "batches")
    if overwrite and x is features and x.flags.f_contiguous and x.flags.writeable and not _use_jax(backend):
        pca = ColumnPCA(codes, nb, x.shape[1], storage=x, background=False)
        for j in range(x.shape[1]):
            if not pca.put(j):
                raise ValueError(f"features column {j} holds NaN or infinite values")
        return pca.finish(n_components)
    count, mean, var = batch_moments(x, codes, nb, chunk_rows, backend)
    mean, scale = _scaler(mean, var, count)
    out, _ = _pca_on_standardized(x, codes, nb, mean, scale, n_components, chunk_rows, backend)
    return out


# --- batch correction on controls ---------------------------------------------------------------

def _control_mask(is_control, n: int) -> np.ndarray:
    mask = np.asarray(is_control, bool)
    if mask.shape != (n,):
        raise ValueError(f"is_control has shape {mask.shape}, expected ({n},)")
    return mask


def _fit_scaler(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = rows.mean(axis=0, dtype=np.float64)
    var = rows.var(axis=0, dtype=np.float64)
    return _scaler(mean, var, len(rows))


def _scale_on(x: np.ndarray, fit_rows: np.ndarray, where: str) -> np.ndarray:
    if len(fit_rows) == 0:
        raise ValueError(f"no control rows {where}")
    mean, scale = _fit_scaler(fit_rows)
    return (x - mean.astype(x.dtype)) / scale.astype(x.dtype)   # stays in the input dtype


def centerscale_on_controls(embeddings: np.ndarray, is_control, batches=None) -> np.ndarray:
    """StandardScaler fitted on control rows (per batch if given), applied to all rows of it."""
    x = _as_float(embeddings, "embeddings").copy()
    ctrl = _control_mask(is_control, len(x))
    if batches is None:
        return _scale_on(x, x[ctrl], "in the data")
    codes, nb = _codes(batches, len(x), "batches")
    for b in range(nb):
        rows = codes == b
        x[rows] = _scale_on(x[rows], x[rows & ctrl], f"in batch #{b}")
    return x


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """cov^(-1/2) of a symmetric positive-definite matrix (scipy `fractional_matrix_power(-0.5)`)."""
    with single_threaded_lapack():
        evals, evecs = np.linalg.eigh(cov)
    return (evecs / np.sqrt(evals)) @ evecs.T


def tvn_on_controls(embeddings: np.ndarray, is_control, batches=None, overwrite: bool = False) -> np.ndarray:
    """Typical variation normalisation, EFAAR `tvn_on_controls`.

    Global centerscale on controls, PCA (all components) fitted on controls and applied to all rows,
    centerscale on controls again, then per batch X_b <- X_b (cov(controls_b) + 0.5 I)^(-1/2)
    (CORAL-style whitening without per-batch re-centring). The steps work in place on a copy of the
    input (on the input itself with overwrite=True) and one more array of its size: the same operations
    as out-of-place ones, without a fresh allocation per step.
    """
    x = _as_float(embeddings, "embeddings")
    if not (overwrite and x is embeddings and x.flags.writeable):
        x = x.copy()
    ctrl = _control_mask(is_control, len(x))
    _scale_in_place(x, x[ctrl], "in the data")
    controls = x[ctrl]
    if len(controls) < 2:
        raise ValueError(f"TVN needs at least 2 control rows, got {len(controls)}")
    _, fit = _pca_on_standardized(controls, np.zeros(len(controls), np.int32), 1,
                                  np.zeros((1, x.shape[1])), np.ones((1, x.shape[1])), None, CHUNK_ROWS,
                                  backend="numpy")
    x -= fit.center.astype(x.dtype)
    y = x @ fit.components.T.astype(x.dtype)
    _scale_in_place(y, y[ctrl], "in the data")
    if batches is None:
        return y
    codes, nb = _codes(batches, len(y), "batches")
    ridge = 0.5 * np.eye(y.shape[1])
    out = x if x.shape == y.shape else np.empty_like(y)    # x is free again: the whitened rows go there
    for b in range(nb):
        rows = codes == b
        batch_controls = y[rows & ctrl]
        if len(batch_controls) < 2:
            raise ValueError(f"TVN needs at least 2 control rows per batch; batch #{b} has "
                             f"{len(batch_controls)}")
        cov = np.cov(batch_controls, rowvar=False, ddof=1) + ridge
        whiten = _inverse_sqrt(cov).astype(y.dtype)
        idx = np.flatnonzero(rows)
        if idx[-1] - idx[0] + 1 == len(idx):                 # contiguous rows: no gather
            np.matmul(y[idx[0]:idx[-1] + 1], whiten, out=out[idx[0]:idx[-1] + 1])
        else:
            out[idx] = y[idx] @ whiten
    return out


def _scale_in_place(x: np.ndarray, fit_rows: np.ndarray, where: str) -> None:
    """`_scale_on` written into x."""
    if len(fit_rows) == 0:
        raise ValueError(f"no control rows {where}")
    mean, scale = _fit_scaler(fit_rows)
    x -= mean.astype(x.dtype)
    x /= scale.astype(x.dtype)


# --- aggregation --------------------------------------------------------------------------------

def group_means(x: np.ndarray, codes: np.ndarray, num_groups: int, rows: np.ndarray | None = None,
                dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the rows of x (N, ...) per group: `codes` (integers 0..num_groups-1) label the rows
    `rows` of x (default all). One sparse indicator matmul, summed in float64 (no sorted copy of the
    rows), returned in `dtype` (default x's floating dtype). Returns (means (G, ...), row counts (G,)).
    The project's one group mean: the EFAAR aggregation, well means of crops, replicate profiles."""
    x = np.asarray(x)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    counts = np.bincount(codes, minlength=num_groups)
    if (counts == 0).any():
        raise ValueError(f"group #{int(np.flatnonzero(counts == 0)[0])} has no rows")
    indicator = sparse.csr_matrix((np.ones(len(rows)), (codes, rows)), shape=(num_groups, len(x)))
    sums = indicator @ x.reshape(len(x), -1)
    out_dtype = dtype or (x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
    means = (sums / counts[:, None]).astype(out_dtype, copy=False)
    return means.reshape((num_groups,) + x.shape[1:]), counts


def aggregate(embeddings: np.ndarray, perturbations, method: str = "mean",
              drop: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
    """One row per perturbation (sorted labels, as pandas groupby), rows labelled in `drop` removed.

    Returns (features (P, d), labels (P,)). The mean is `group_means`; the median stacks the groups of each replicate count and takes np.median.
    """
    if method not in ("mean", "median"):
        raise ValueError(f"aggregation method must be 'mean' or 'median', got {method!r}")
    x = _as_float(embeddings, "embeddings")
    labels = np.asarray(perturbations)
    if labels.shape != (len(x),):
        raise ValueError(f"perturbations has shape {labels.shape}, expected ({len(x)},)")
    rows = np.flatnonzero(~pd.Index(labels).isin(list(drop)))
    if len(rows) == 0:
        raise ValueError("no rows left to aggregate after dropping controls")
    codes, uniq = pd.factorize(labels[rows], sort=True)
    if method == "mean":
        return group_means(x, codes, len(uniq), rows)[0], np.asarray(uniq)
    counts = np.bincount(codes)
    grouped = x[rows[np.argsort(codes, kind="stable")]]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.empty((len(uniq), x.shape[1]), x.dtype)
    for size in np.unique(counts):  # one vectorised median per replicate count
        groups = np.flatnonzero(counts == size)
        out[groups] = np.median(grouped[starts[groups][:, None] + np.arange(size)], axis=1)
    return out, np.asarray(uniq)


# --- the whole map ------------------------------------------------------------------------------

CORRECTIONS = ("tvn", "centerscale", "none")


@dataclasses.dataclass
class PerturbationMap:
    embeddings: np.ndarray  # (rows, k) well-level embeddings after PCA and batch correction
    features: np.ndarray    # (P, k) aggregated map, controls removed
    labels: np.ndarray      # (P,) perturbation of each map row, sorted


def correct(embeddings: np.ndarray, is_control, batches, correction: str, overwrite: bool = False) -> np.ndarray:
    """Batch correction by name: 'tvn', 'centerscale' (both on controls, per batch) or 'none'.
    overwrite=True lets TVN work in the embeddings' memory."""
    if correction == "tvn":
        return tvn_on_controls(embeddings, is_control, batches, overwrite=overwrite)
    if correction == "centerscale":
        return centerscale_on_controls(embeddings, is_control, batches)
    if correction == "none":
        return _as_float(embeddings, "embeddings")
    raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")


def build_map(features: np.ndarray, perturbations, control, batches=None, *, pca_components=128,
              pca_batches=None, correction: str = "tvn", method: str = "mean",
              drop: Sequence = (), overwrite_features: bool = False) -> PerturbationMap:
    """EFAAR map: embed_by_pca -> correction on controls -> aggregate (controls and `drop` removed).

    features: (rows, d) well/crop embeddings; perturbations: (rows,) labels; control: the control
    label; batches: (rows,) batch labels for the correction (and the PCA pre-scaling unless
    `pca_batches` is given, as EFAAR's notebook uses plates there). pca_components=0 skips PCA.
    overwrite_features=True: `features` may be overwritten (embed_by_pca's `overwrite`; TVN's when PCA is skipped).
    """
    labels = np.asarray(perturbations)
    is_control = labels == control
    if not is_control.any():
        raise ValueError(f"control label {control!r} does not occur in the perturbations")
    if pca_components == 0:
        emb = _as_float(features, "features")
    else:
        emb = embed_by_pca(features, batches if pca_batches is None else pca_batches, pca_components,
                           overwrite=overwrite_features)
    emb = correct(emb, is_control, batches, correction, overwrite=overwrite_features or pca_components != 0)
    feats, map_labels = aggregate(emb, labels, method, drop=[control, *drop])
    return PerturbationMap(emb, feats, map_labels)
