"""Mean average precision (mAP), the JUMP-CP community's retrieval metric, beside EFAAR's recall.

Everything is computed by `copairs` (Kalinin et al. 2025, "A versatile information retrieval framework
for evaluating profile strength and similarity"; the package the JUMP-CP papers use): its average
precision, its null distributions and p-values, and its Benjamini-Hochberg correction. This module
only says which pairs are positives and which are negatives, in the community's standard forms:

Phenotypic activity (replicate-level profiles: the map's rows, i.e. wells, after PCA and the batch
correction): can a perturbation's replicates be told from the negative controls? As copairs'
phenotypic-activity example and the JUMP-CP gene notebooks (Chandrasekaran et al. 2024, cpg0016):
  controls get a unique `reference` index (copairs.matching.assign_reference_index), perturbations -1;
  copairs.map.average_precision(pos_sameby=[perturbation, reference], pos_diffby=[],
                                neg_sameby=[batch], neg_diffby=[perturbation, reference])
  so each replicate row ranks its perturbation's other replicates against the control rows of its own
  batch (JUMP: its own plate; here the correction unit), control rows dropped, then
  copairs.map.mean_average_precision(sameby=[perturbation]) -> mAP, p-value, BH-corrected p-value.

Phenotypic consistency (perturbation-level profiles: the aggregated map), per relationship table.
EFAAR's tables list gene pairs, so a gene's annotation group is its annotated partners: does gene g's
profile retrieve its partners before the other annotated genes? Standard per-query AP over
  positives  the genes paired with g in the table,
  negatives  the other annotated genes: the universe is the map's genes with >= 1 partner among them
             (as JUMP-CP keeps only annotated perturbations); by default every map gene, so the
             universe is the same for every block and model; `consistency_genes="active"` first keeps
             the phenotypically active genes only, as the JUMP-CP consistency analyses do.
In copairs' terms this is copairs.map.multilabel.average_precision on a query/reference frame (every
gene twice: a `query` row labelled [g], a `reference` row labelled with its partners;
pos_sameby=[labels], pos_diffby=[role], neg_sameby=[], neg_diffby=[labels, role, gene]) with the query
rows kept, then copairs.map.mean_average_precision(sameby=[gene]) -> one mAP (the gene's AP),
p-value and BH-corrected p-value per gene. (A single-copy multilabel frame would drop every gene
within two hops of g from its negatives, since copairs' negatives share no label at all.) The same
APs come ~10x faster from the pairs themselves: positives the annotated pairs, negatives all other
pairs of annotated genes, through copairs' own similarity, rank-list and AP functions
(`pairs_average_precision`, the steps of copairs.map.average_precision after its pair search);
tests/test_mean_average_precision.py checks both give the same table.

Fraction retrieved = share of the tested perturbations (genes) with corrected p < threshold (0.05).
Settings as the JUMP-CP gene analyses: cosine similarity, null_size 20,000, threshold 0.05.

copairs caches null distributions on disk keyed by (seed, null_size, positives, total) but draws each
with a seed that depends on its position in the first call's list, so a shared cache makes p-values
depend on earlier calls; by default every call gets a fresh temporary cache (a pure function of its
inputs); pass `cache_dir` to share nulls between calls (eval.screen shares one per run of blocks).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from copairs import compute
from copairs import map as copairs_map
from copairs.map.average_precision import build_rank_lists
from copairs.map.normalization import normalize_ap
from copairs.matching import UnpairedException, assign_reference_index

from eval import recall

NULL_SIZE = 20_000     # JUMP-CP's cpg0016 gene notebooks (copairs' examples use 1e6 for small screens)
THRESHOLD = 0.05       # on the BH-corrected p-value
DISTANCE = "cosine"
BATCH_SIZE = 20_000    # copairs' pair batch for the similarities

ACTIVITY_PAIRS = dict(pos_sameby=["perturbation", "reference"], pos_diffby=[],
                      neg_sameby=["batch"], neg_diffby=["perturbation", "reference"])
RECORD_KEYS = ("mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p")


@contextlib.contextmanager
def null_cache(cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """`cache_dir` itself, or a temporary folder removed on exit (copairs' null-distribution cache)."""
    if cache_dir is not None:
        yield str(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="copairs-nulls-") as path:
        yield path


# --- phenotypic activity ------------------------------------------------------------------------

def activity_metadata(perturbations, control, batches=None,
                      drop: Sequence = ()) -> tuple[pd.DataFrame, np.ndarray]:
    """copairs metadata for phenotypic activity: (frame with perturbation, batch, reference; the rows
    of the input it describes: every row but those labelled in `drop`)."""
    labels = np.asarray(perturbations).astype(str)
    rows = np.flatnonzero(~pd.Index(labels).isin([str(d) for d in drop if str(d) != str(control)]))
    batch = np.zeros(len(labels), int) if batches is None else np.asarray(batches)
    if batch.shape != labels.shape:
        raise ValueError(f"batches has shape {batch.shape}, expected {labels.shape}")
    meta = pd.DataFrame({"perturbation": labels[rows], "batch": batch[rows].astype(str)})
    controls = meta.index[meta["perturbation"] == str(control)]
    return assign_reference_index(meta, controls, reference_col="reference", default_value=-1), rows


def phenotypic_activity(profiles: np.ndarray, perturbations, control, batches=None, *, drop: Sequence = (),
                        null_size: int = NULL_SIZE, threshold: float = THRESHOLD, seed: int = 0,
                        cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """copairs' mAP table (one row per perturbation with >= 2 replicate rows: perturbation,
    mean_average_precision, p_value, corrected_p_value, below_corrected_p, ...) of replicate-level
    `profiles` (rows, d) against the `control` rows of the same batch."""
    meta, rows = activity_metadata(perturbations, control, batches, drop)
    ap = copairs_map.average_precision(meta, np.asarray(profiles)[rows], **ACTIVITY_PAIRS,
                                       batch_size=BATCH_SIZE, distance=DISTANCE, progress_bar=False)
    ap = ap[ap["reference"] == -1]
    with null_cache(cache_dir) as cache:
        return copairs_map.mean_average_precision(ap, ["perturbation"], null_size=null_size, threshold=threshold,
                                                  seed=seed, progress_bar=False, cache_dir=cache)


# --- phenotypic consistency ---------------------------------------------------------------------

def relationship_pairs(genes: Sequence, annotation_dir, source: str) -> tuple[list[str], np.ndarray]:
    """(annotated genes: the sorted `genes` with a partner among them, their (n, n) boolean adjacency)
    from the table's pairs with both genes in `genes`."""
    names = pd.Index(np.unique(np.asarray(genes).astype(str)))
    e1, e2 = recall.load_relationships(annotation_dir, source)   # canonical: undirected, unique, no self-pairs
    i, j = names.get_indexer(e1), names.get_indexer(e2)
    keep = (i >= 0) & (j >= 0)
    annotated = np.unique(np.concatenate([i[keep], j[keep]]))
    position = np.full(len(names), -1)
    position[annotated] = np.arange(len(annotated))
    adjacency = np.zeros((len(annotated), len(annotated)), bool)
    adjacency[position[i[keep]], position[j[keep]]] = True
    adjacency |= adjacency.T
    return names[annotated].tolist(), adjacency


def consistency_pairs(adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive pairs (E, 2), negative pairs (M, 2)): index pairs i < j of the annotated genes, the
    annotated pairs and all the others, in the form copairs' find_pairs gives."""
    i, j = np.triu_indices(len(adjacency), k=1)
    positive = adjacency[i, j]
    pairs = np.stack([i, j], axis=1).astype(np.uint32)
    return pairs[positive], pairs[~positive]


def pairs_average_precision(meta: pd.DataFrame, features: np.ndarray, pos_pairs: np.ndarray,
                            neg_pairs: np.ndarray) -> pd.DataFrame:
    """copairs.map.average_precision for explicit pair lists (its steps after `find_pairs`, with copairs'
    own similarity, rank-list, AP and normalisation functions): `meta` with n_pos_pairs, n_total_pairs,
    average_precision and normalized_average_precision added."""
    similarity = compute.get_similarity_fn(DISTANCE, progress_bar=False)
    pos_sims = similarity(features, pos_pairs, BATCH_SIZE)
    neg_sims = similarity(features, neg_pairs, BATCH_SIZE)
    paired_ix, rel_k_list, counts = build_rank_lists(pos_pairs, neg_pairs, pos_sims, neg_sims)
    ap_scores, null_confs = compute.ap_contiguous(rel_k_list, counts)
    meta = meta.reset_index(drop=True).copy()
    meta["n_pos_pairs"], meta["n_total_pairs"] = 0, 0
    meta.loc[paired_ix, "average_precision"] = ap_scores
    meta.loc[paired_ix, "n_pos_pairs"] = null_confs[:, 0]
    meta.loc[paired_ix, "n_total_pairs"] = null_confs[:, 1]
    meta["normalized_average_precision"] = np.nan
    meta.loc[paired_ix, "normalized_average_precision"] = normalize_ap(
        ap_scores, null_confs[:, 0], null_confs[:, 1] - null_confs[:, 0])
    return meta


def phenotypic_consistency(features: np.ndarray, labels, annotation_dir, source: str, *,
                           genes: Iterable | None = None, null_size: int = NULL_SIZE,
                           threshold: float = THRESHOLD, seed: int = 0,
                           cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """copairs' mAP table for one relationship table: one row per scored gene (gene,
    mean_average_precision (its AP), p_value, corrected_p_value, below_corrected_p, ..., num_partners)
    of the aggregated map (features (P, d), labels (P,)), over the genes with a partner among `genes`
    (default: every map label). A gene paired with every other annotated gene has no negative: it is
    not scored (it stays a positive or negative of the others). Raises copairs' UnpairedException when
    there is no annotated pair or no negative pair."""
    labels = np.asarray(labels).astype(str)
    universe = labels if genes is None else np.intersect1d(labels, np.asarray(list(genes)).astype(str))
    names, adjacency = relationship_pairs(universe, annotation_dir, source)
    if not names:
        raise UnpairedException(f"no pair of {source} has both genes among the {len(universe)} genes")
    pos_pairs, neg_pairs = consistency_pairs(adjacency)
    if len(neg_pairs) == 0:
        raise UnpairedException(f"every gene of {source} is paired with all the others: no negative pair")
    rows = pd.Index(labels).get_indexer(names)
    meta = pd.DataFrame({"gene": names, "num_partners": adjacency.sum(axis=1)})
    ap = pairs_average_precision(meta, np.asarray(features)[rows], pos_pairs, neg_pairs)
    ap = ap[ap["n_total_pairs"] > ap["n_pos_pairs"]]
    with null_cache(cache_dir) as cache:
        out = copairs_map.mean_average_precision(ap, ["gene"], null_size=null_size, threshold=threshold,
                                                 seed=seed, progress_bar=False, cache_dir=cache)
    out["num_partners"] = out["gene"].map(meta.set_index("gene")["num_partners"])
    out.attrs["num_genes"] = len(names)
    return out


# --- the report entry ---------------------------------------------------------------------------

def _number(x) -> float:
    """6 significant digits: the report stays compact (hundreds of records per block)."""
    return float(f"{float(x):.6g}")


def _records(table: pd.DataFrame, key: str, name: str, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    out = []
    for row in table.sort_values(key).itertuples(index=False):
        rec = {name: str(getattr(row, key)), **{k: int(getattr(row, k)) for k in extra}}
        rec.update({k: _number(getattr(row, k)) for k in RECORD_KEYS[:3]})
        rec["below_corrected_p"] = bool(row.below_corrected_p)
        out.append(rec)
    return out


def _summary(table: pd.DataFrame) -> dict[str, float]:
    return {"mean_average_precision": _number(table["mean_average_precision"].mean()),
            "fraction_retrieved": _number(table["below_corrected_p"].mean())}


def map_report(profiles: np.ndarray, perturbations, control, batches, map_features: np.ndarray, map_labels,
               annotation_dir, sources: Sequence[str], *, drop: Sequence = (), consistency_genes: str = "all",
               null_size: int = NULL_SIZE, threshold: float = THRESHOLD, seed: int = 0,
               cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report's `mean_average_precision` entry (JSON-ready, numbers to 6 significant digits) for one map:

      {"package", "distance", "null_size", "threshold", "seed",
       "activity": {"num_perturbations", "mean_average_precision", "fraction_retrieved",
                    "per_perturbation": [{"perturbation", "mean_average_precision", "p_value",
                                          "corrected_p_value", "below_corrected_p"}, ...]},
       "consistency": {"genes": "active" | "all", "num_genes", "mean_average_precision",
                       "fraction_retrieved" (both: mean over the sources),
                       "sources": {source: {"num_genes" (annotated genes: the universe), "num_groups"
                                            (genes scored), "mean_average_precision", "fraction_retrieved",
                                            "per_group": [{"group", "num_partners", "mean_average_precision",
                                                           "p_value", "corrected_p_value",
                                                           "below_corrected_p"}, ...]}}}}

    profiles: the map's row-level embeddings (after PCA and correction) with their perturbations and
    batches; map_features / map_labels: the aggregated map; sources: the relationship tables of
    `annotation_dir` to score. consistency_genes: "all" (every map gene) or "active" (the genes whose
    activity has corrected p < threshold, as JUMP-CP). A part that copairs cannot score (no positive or
    negative pair) has "skipped": reason instead of its numbers; means over no source are None.
    """
    if consistency_genes not in ("active", "all"):
        raise ValueError(f"consistency_genes must be 'active' or 'all', got {consistency_genes!r}")
    out: dict[str, Any] = {"package": f"copairs {importlib.metadata.version('copairs')}", "distance": DISTANCE,
                           "null_size": int(null_size), "threshold": float(threshold), "seed": int(seed)}
    with null_cache(cache_dir) as cache:
        settings = dict(null_size=null_size, threshold=threshold, seed=seed, cache_dir=cache)
        active = None
        try:
            table = phenotypic_activity(profiles, perturbations, control, batches, drop=drop, **settings)
            if table.empty:
                raise UnpairedException("no perturbation has two replicate rows")
            out["activity"] = {"num_perturbations": int(len(table)), **_summary(table),
                               "per_perturbation": _records(table, "perturbation", "perturbation")}
            active = table.loc[table["below_corrected_p"], "perturbation"].astype(str).tolist()
        except UnpairedException as e:
            out["activity"] = {"num_perturbations": 0, "skipped": str(e)}
        genes = None if consistency_genes == "all" else (active or [])
        cons: dict[str, Any] = {"genes": consistency_genes,
                                "num_genes": int(len(map_labels) if genes is None else len(genes)), "sources": {}}
        for source in sources:
            try:
                table = phenotypic_consistency(map_features, map_labels, annotation_dir, source, genes=genes,
                                               **settings)
                cons["sources"][source] = {"num_genes": int(table.attrs["num_genes"]),
                                           "num_groups": int(len(table)), **_summary(table),
                                           "per_group": _records(table, "gene", "group", ["num_partners"])}
            except UnpairedException as e:
                cons["sources"][source] = {"num_groups": 0, "skipped": str(e)}
        scored = [s for s in cons["sources"].values() if "skipped" not in s]
        for key in ("mean_average_precision", "fraction_retrieved"):
            cons[key] = _number(np.mean([s[key] for s in scored])) if scored else None
        out["consistency"] = cons
    return out
