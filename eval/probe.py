"""Linear probes on every transformer block at once, scored by balanced accuracy.

Input: a (num_blocks, N, D) stack of pooled features, integer labels (N,) and boolean
train/val/test masks (N,). Features are standardised with train statistics per block; for each
block and each L2 strength a probe is fitted on train; the L2 strength is picked per block on val,
the best block is the one with the best val score, and every block reports its test score at its
chosen L2 so the report shows where the signal lives in the network. The test predictions at the
chosen L2 come back too (`ProbeReport.test_predictions`, rows `test_index`), e.g. for bootstrap
intervals (eval/bootstrap.py).

Two probes:
- `ridge_probes`: closed-form one-vs-rest least squares (as big_vision's fewshot_lsr): one
  eigendecomposition per block serves every L2 value; the fast default (48 blocks x 20k x 1664
  in minutes on a 2-core CPU).
- `logistic_probes`: multinomial logistic regression trained with optax for all blocks and all L2
  values together (vmap over both), the paper's probe; best on an accelerator.

L2 values are per-sample penalties: the objective is mean loss + l2/2 |W|^2, so the same grid means
the same thing for any train size. Intercepts are not penalised.
`split_by_group` builds train/val/test masks that hold out whole wells or experiments.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from eval.efaar import single_threaded_lapack

RIDGE_L2 = tuple(10.0 ** np.arange(-4, 3))           # 1e-4 .. 1e2
LOGISTIC_L2 = (1e-5, 1e-4, 1e-3, 1e-2)


@dataclasses.dataclass
class ProbeReport:
    l2_grid: np.ndarray      # (L,)
    val_by_l2: np.ndarray    # (blocks, L) val balanced accuracy
    best_l2: np.ndarray      # (blocks,) chosen on val
    val: np.ndarray          # (blocks,) val balanced accuracy at best_l2
    test: np.ndarray         # (blocks,) test balanced accuracy at best_l2
    best_block: int          # argmax of val (first on ties)
    test_predictions: np.ndarray | None = None   # (blocks, n_test) int32 predicted class at best_l2
    test_index: np.ndarray | None = None         # (n_test,) rows of the test set, in prediction order

    def to_dict(self) -> dict:
        return {"best_block": self.best_block, "best_block_val": float(self.val[self.best_block]),
                "best_block_test": float(self.test[self.best_block]),
                "l2_grid": self.l2_grid.tolist(), "best_l2": self.best_l2.tolist(),
                "val": self.val.tolist(), "test": self.test.tolist(),
                "val_by_l2": self.val_by_l2.tolist()}


def balanced_accuracy(labels, predictions, num_classes: int):
    """Mean per-class recall over the classes present in `labels` (sklearn balanced_accuracy)."""
    support = jnp.bincount(labels, length=num_classes)
    hits = jnp.bincount(labels, weights=(labels == predictions).astype(jnp.float32), length=num_classes)
    present = support > 0
    return jnp.sum(jnp.where(present, hits / jnp.maximum(support, 1), 0.0)) / jnp.sum(present)


def _check(features, labels, train, val, test) -> tuple[np.ndarray, ...]:
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be (num_blocks, N, D), got shape {features.shape}")
    n = features.shape[1]
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(f"labels must be non-negative integers of shape ({n},), got {labels.dtype} "
                         f"{labels.shape}")
    masks = []
    for name, m in (("train", train), ("val", val), ("test", test)):
        m = np.asarray(m, bool)
        if m.shape != (n,) or not m.any():
            raise ValueError(f"{name} mask must be a non-empty boolean array of shape ({n},)")
        masks.append(np.flatnonzero(m))
    if len(np.intersect1d(masks[0], masks[1])) or len(np.intersect1d(masks[0], masks[2])):
        raise ValueError("train rows overlap val or test rows")
    return features, labels.astype(np.int32), *masks


def _standardize(x, train_idx):
    xt = x[train_idx]
    mean = xt.mean(axis=0)
    std = xt.std(axis=0)
    return (x - mean) / jnp.where(std > 1e-6 * jnp.max(std), std, 1.0)


def _strongest_best(val_by_l2, l2_grid):
    """Index of the best validation score, the largest L2 among ties: on small validation sets
    scores tie often, and the most regularised probe is the stable choice."""
    order = jnp.argsort(-jnp.asarray(l2_grid))                 # largest L2 first
    return order[jnp.argmax(jnp.take(val_by_l2, order, axis=-1), axis=-1)]


def _pick(val_by_l2, l2_grid) -> tuple[np.ndarray, np.ndarray]:
    best = np.asarray(_strongest_best(np.asarray(val_by_l2), np.asarray(l2_grid)))
    return best, np.asarray(l2_grid)[best]


# --- closed-form ridge --------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_system(x, labels, train_idx, num_classes: int):
    """Standardised block and the matrix to eigendecompose: Z^T Z (primal, n >= d) or Z Z^T."""
    z = _standardize(x.astype(jnp.float32), train_idx)
    zt, yt = z[train_idx], labels[train_idx]
    prior = jnp.bincount(yt, length=num_classes) / len(yt)                   # the intercept
    return z, prior, (zt.T @ zt if zt.shape[0] >= zt.shape[1] else zt @ zt.T)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_scores(z, labels, prior, evals, q, train_idx, val_idx, test_idx, l2_grid, num_classes: int):
    """Val accuracy for every L2, and the test accuracy and predictions at the best one, given the
    eigenpairs."""
    zt, yt = z[train_idx], labels[train_idx]
    n, d = zt.shape
    lam = l2_grid * n
    evals = jnp.maximum(evals, 0.0)
    if n >= d:   # primal: (Z^T Z + lam)^-1 Z^T Y
        # One-hot targets centred on train give the unpenalised intercept; since z is centred on
        # train, z^T (Y - mean Y) = z^T Y = the per-class sums of the train rows.
        rhs = q.T @ jax.ops.segment_sum(zt, yt, num_classes).T                # (D, C)
        project = lambda rows: rows @ q
    else:        # dual: Z^T (Z Z^T + lam)^-1 (Y - mean Y)
        rhs = q.T @ (jax.nn.one_hot(yt, num_classes) - prior)                 # (n, C)
        project = lambda rows: (rows @ zt.T) @ q

    def predict(proj, l2):
        return jnp.argmax((proj / (evals + l2)) @ rhs + prior, axis=-1)

    pv = project(z[val_idx])
    yv = labels[val_idx]
    val_scores = jax.lax.map(lambda l2: balanced_accuracy(yv, predict(pv, l2), num_classes), lam)
    test_pred = predict(project(z[test_idx]), lam[_strongest_best(val_scores, l2_grid)])
    return val_scores, balanced_accuracy(labels[test_idx], test_pred, num_classes), test_pred


_eigh = jax.jit(jnp.linalg.eigh)


def ridge_probes(features, labels, train, val, test, l2_grid: Sequence[float] = RIDGE_L2,
                 num_classes: int | None = None) -> ProbeReport:
    """Closed-form ridge (one-vs-rest least squares) probes for every block.

    Blocks are processed one at a time through the same compiled functions, so the host stack can
    be (48, 20k, 1664) float32 (6.4 GB) without a second copy.
    """
    features, labels, tr, va, te = _check(features, labels, train, val, test)
    num_classes = int(num_classes or labels.max() + 1)
    grid = jnp.asarray(l2_grid, jnp.float32)
    y, tr, va, te = (jnp.asarray(a) for a in (labels, tr, va, te))
    vals, tests, preds = [], [], []
    for block in features:
        z, prior, system = _ridge_system(jnp.asarray(block), y, tr, num_classes=num_classes)
        # LAPACK's eigh on one thread (see single_threaded_lapack); jax dispatches asynchronously,
        # so wait for the result while the limit is still in place.
        with single_threaded_lapack():
            evals, q = jax.block_until_ready(_eigh(system))
        v, t, p = _ridge_scores(z, y, prior, evals, q, tr, va, te, grid, num_classes=num_classes)
        vals.append(np.asarray(v))
        tests.append(float(t))
        preds.append(np.asarray(p, np.int32))
    return _report(np.asarray(l2_grid), np.stack(vals), np.asarray(tests), np.stack(preds), np.asarray(te))


def _report(grid, val_by_l2, test, test_predictions=None, test_index=None) -> ProbeReport:
    best, best_l2 = _pick(val_by_l2, grid)
    val = val_by_l2[np.arange(len(best)), best]
    return ProbeReport(grid, val_by_l2, best_l2, val, test, int(np.argmax(val)), test_predictions, test_index)


# --- multinomial logistic regression ------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def _logistic_blocks(x, labels, train_idx, val_idx, test_idx, l2_grid, learning_rate, key,
                     num_classes: int, steps: int, batch_size: int):
    """Trains (blocks x L2) probes together; returns val accuracy (blocks, L), test accuracy
    (blocks, L) and test predictions (blocks, L, n_test)."""
    z = jax.vmap(_standardize, in_axes=(0, None))(x.astype(jnp.float32), train_idx)   # (B, N, D)
    num_blocks, _, d = z.shape
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params = {"w": jnp.zeros((num_blocks, len(l2_grid), d, num_classes)),
              "b": jnp.zeros((num_blocks, len(l2_grid), num_classes))}
    opt_state = tx.init(params)

    def loss_fn(p, rows):
        zb, yb = z[:, rows], labels[rows]                                           # (B, n, D)
        logits = jnp.einsum("bnd,bldc->blnc", zb, p["w"]) + p["b"][:, :, None]
        targets = jnp.broadcast_to(yb, logits.shape[:-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=-1)  # (B, L)
        penalty = 0.5 * l2_grid * jnp.sum(p["w"] ** 2, axis=(-2, -1))
        return jnp.sum(ce + penalty)   # sum over independent probes: each gets its own gradient

    def step(carry, step_key):
        p, s = carry
        rows = (jax.random.choice(step_key, train_idx, (batch_size,), replace=False)
                if batch_size < len(train_idx) else train_idx)
        grads = jax.grad(loss_fn)(p, rows)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))

    def accuracy(idx):
        logits = jnp.einsum("bnd,bldc->blnc", z[:, idx], params["w"]) + params["b"][:, :, None]
        pred = jnp.argmax(logits, axis=-1)                                           # (B, L, n)
        score = lambda p: balanced_accuracy(labels[idx], p, num_classes)
        return jax.vmap(jax.vmap(score))(pred), pred

    return accuracy(val_idx)[0], *accuracy(test_idx)


def logistic_probes(features, labels, train, val, test, l2_grid: Sequence[float] = LOGISTIC_L2,
                    num_classes: int | None = None, steps: int = 300, learning_rate: float = 1e-2,
                    batch_size: int | None = None, blocks_per_step: int | None = None,
                    seed: int = 0) -> ProbeReport:
    """Multinomial logistic-regression probes (softmax CE + l2/2 |W|^2), Adam with cosine decay.

    All blocks of a chunk (`blocks_per_step`, default all) and all L2 values train together in one
    jitted scan. batch_size=None uses the full train set each step.
    """
    features, labels, tr, va, te = _check(features, labels, train, val, test)
    num_classes = int(num_classes or labels.max() + 1)
    grid = jnp.asarray(l2_grid, jnp.float32)
    chunk = blocks_per_step or len(features)
    batch = int(min(batch_size or len(tr), len(tr)))
    vals, tests, preds = [], [], []
    for start in range(0, len(features), chunk):
        v, t, p = _logistic_blocks(jnp.asarray(features[start:start + chunk]), jnp.asarray(labels),
                                   jnp.asarray(tr), jnp.asarray(va), jnp.asarray(te), grid,
                                   learning_rate, jax.random.key(seed), num_classes=num_classes,
                                   steps=steps, batch_size=batch)
        vals.append(np.asarray(v))
        tests.append(np.asarray(t))
        preds.append(np.asarray(p, np.int32))
    val_by_l2, test_by_l2 = np.concatenate(vals), np.concatenate(tests)
    best, _ = _pick(val_by_l2, l2_grid)
    rows = np.arange(len(best))
    return _report(np.asarray(l2_grid), val_by_l2, test_by_l2[rows, best],
                   np.concatenate(preds)[rows, best], np.asarray(te))


# --- splits -------------------------------------------------------------------------------------

def split_by_group(metadata: pd.DataFrame, by: str | Sequence[str],
                   fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test masks that keep every group (a well: ['experiment', 'plate', 'well']; an
    experiment: 'experiment') whole inside one split. Groups are shuffled with `seed` and dealt
    out by the given fractions of the number of groups."""
    cols = [by] if isinstance(by, str) else list(by)
    missing = [c for c in cols if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata has no column(s) {missing}; columns are {list(metadata.columns)}")
    if len(fractions) != 3 or min(fractions) <= 0:
        raise ValueError(f"fractions must be 3 positive numbers (train, val, test), got {fractions}")
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(metadata[cols]))
    g = len(uniques)
    if g < 3:
        raise ValueError(f"need at least 3 distinct groups of {cols} to split, got {g}")
    perm = np.random.default_rng(seed).permutation(g)
    cum = np.cumsum(fractions) / np.sum(fractions)
    n_train = min(max(1, int(round(cum[0] * g))), g - 2)
    n_val = min(max(1, int(round(cum[1] * g)) - n_train), g - n_train - 1)
    split_of_group = np.empty(g, np.int8)
    split_of_group[perm[:n_train]] = 0
    split_of_group[perm[n_train:n_train + n_val]] = 1
    split_of_group[perm[n_train + n_val:]] = 2
    split = split_of_group[codes]
    return split == 0, split == 1, split == 2
