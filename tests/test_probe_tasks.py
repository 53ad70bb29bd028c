"""Probe tasks by name: spec parsing, label sources, held-out splits, and that each task finds the block
where its signal was planted (the experiment task picking the block with the least batch signal)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval import tasks
from eval.tasks import Task, parse_task

GENES = [f"G{i}" for i in range(6)]
GROUP = {g: f"grp{i % 2}" for i, g in enumerate(GENES)}       # 2 groups of 3 genes, planted in the features
EXPERIMENTS = ("E1", "E2", "E3")
CROPS_PER_WELL = 4


@pytest.fixture(scope="module")
def screen():
    """Crops of 3 experiments x 2 plates; each plate: every gene in one well plus 2 control wells.
    Block 0: batch signal only; block 1: weak gene signal; block 2: strong gene signal, no batch signal.
    A gene's signal is its group's vector plus its own; blurred crops (30%) get an offset in blocks 1-2."""
    rng = np.random.default_rng(0)
    rows = []
    for e in EXPERIMENTS:
        for p in ("P1", "P2"):
            for w, gene in enumerate(GENES + ["ctrl", "ctrl"]):
                for t in range(CROPS_PER_WELL):
                    rows.append(dict(experiment=e, plate=p, well=f"W{w}", tile=t, perturbation=gene,
                                     is_control=gene == "ctrl", qc=("ok", "blur")[int(rng.random() < 0.3)]))
    meta = pd.DataFrame(rows)
    n, d = len(meta), 16
    group_vec = {grp: rng.standard_normal(d) for grp in sorted(set(GROUP.values()))}
    gene_vec = {g: group_vec[GROUP[g]] + rng.standard_normal(d) for g in GENES}
    gene_vec["ctrl"] = np.zeros(d)
    gene = np.stack([gene_vec[g] for g in meta.perturbation])
    exp_vec = {e: rng.standard_normal(d) * 3 for e in EXPERIMENTS}
    batch = np.stack([exp_vec[e] for e in meta.experiment])
    blur = (meta.qc == "blur").to_numpy()[:, None] * rng.standard_normal(d) * 3
    noise = lambda: rng.standard_normal((n, d))
    blocks = [noise() + batch, noise() + 0.5 * gene + batch + blur, noise() + 2.0 * gene + 2 * blur]
    return np.stack(blocks, axis=1).astype(np.float32), meta


def test_parse_task_defaults_and_options():
    assert parse_task("perturbation") == Task("perturbation")
    t = parse_task("functional_group:split=perturbations,level=crop,probe=logistic")
    assert (t.split, t.level, t.probe) == ("perturbations", "crop", "logistic")
    assert parse_task("experiment").higher_is_better is False
    assert parse_task("experiment").correction == "none"
    assert parse_task("qc", default_probe="logistic").probe == "logistic"
    assert parse_task("qc:probe=ridge", default_probe="logistic").probe == "ridge"


@pytest.mark.parametrize("spec, message", [
    ("identity", "unknown probe task 'identity'"),
    ("qc:split=plates", "split='plates' is not one of"),
    ("qc:depth=3", "option 'depth=3' must be KEY=VALUE"),
    ("qc:level", "option 'level' must be KEY=VALUE"),
    ("experiment:split=experiments", "leaves every test label unseen"),
    ("perturbation:split=perturbations", "leaves every test label unseen"),
])
def test_bad_task_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_task(spec)


def test_stratified_split_keeps_wells_whole_and_classes_everywhere(screen):
    _, meta = screen
    genes = meta[~meta.is_control].reset_index(drop=True)
    labels = pd.factorize(genes.perturbation)[0]
    train, val, test = tasks.stratified_group_split(genes, tasks.WELL_KEYS, labels, (0.8, 0.1, 0.1), seed=3)
    assert (train.astype(int) + val + test == 1).all()
    well = genes[tasks.WELL_KEYS].astype(str).agg("/".join, axis=1)
    for a, b in ((train, val), (train, test), (val, test)):
        assert not set(well[a]) & set(well[b])
    for mask, wells_per_gene in ((test, 1), (val, 1), (train, 4)):       # 6 wells per gene: 1/1/4
        per_gene = genes[mask].groupby("perturbation").apply(lambda g: g[tasks.WELL_KEYS].drop_duplicates().shape[0],
                                                             include_groups=False)
        assert sorted(per_gene.index) == GENES and (per_gene == wells_per_gene).all()
    again = tasks.stratified_group_split(genes, tasks.WELL_KEYS, labels, (0.8, 0.1, 0.1), seed=3)
    np.testing.assert_array_equal(again[2], test)
    few = tasks.stratified_group_split(genes[genes.experiment == "E1"], tasks.WELL_KEYS,
                                       labels[genes.experiment == "E1"])
    assert few[0].all()                                 # 2 wells per gene: too few to hold any out


def test_per_crop_labels_hold_out_random_wells(screen):
    _, meta = screen
    labels = pd.factorize(meta.qc)[0]
    train, val, test = tasks.split_rows(parse_task("qc"), meta, labels, (0.6, 0.2, 0.2), seed=0)
    well = meta[tasks.WELL_KEYS].astype(str).agg("/".join, axis=1)
    assert not set(well[train]) & set(well[test]) and test.any() and val.any()
    with pytest.raises(ValueError, match="labels vary within"):
        tasks.stratified_group_split(meta, tasks.WELL_KEYS, labels)


def test_functional_groups_from_ground_truth_and_csv(tmp_path):
    truth = {"genes": {"A": {"complex": "C1", "pathway": "P1"}, "B": {"complex": None, "pathway": None}}}
    (tmp_path / "ground_truth.json").write_text(json.dumps(truth))
    assert tasks.functional_groups("ground_truth:complex", str(tmp_path)) == {"A": "C1"}
    assert tasks.functional_groups("ground_truth:pathway", str(tmp_path)) == {"A": "P1"}
    with pytest.raises(tasks.TaskUnavailable, match="ground_truth.json does not exist"):
        tasks.functional_groups("ground_truth:complex", str(tmp_path / "nowhere"))
    good = tmp_path / "groups.csv"
    good.write_text("\ufeffgene, group\nA,kinase\nB,kinase\nC,\n")
    assert tasks.functional_groups(str(good)) == {"A": "kinase", "B": "kinase"}
    bad = tmp_path / "bad.csv"
    bad.write_text("symbol,group\nA,x\n")
    with pytest.raises(ValueError, match="bad.csv: expected columns gene,group"):
        tasks.functional_groups(str(bad))
    twice = tmp_path / "twice.csv"
    twice.write_text("gene,group\nA,x\nA,y\n")
    with pytest.raises(ValueError, match=r"twice.csv: genes in more than one group, e.g. \['A'\]"):
        tasks.functional_groups(str(twice))
    with pytest.raises(ValueError, match="missing.csv' does not exist"):
        tasks.functional_groups(str(tmp_path / "missing.csv"))


def test_each_task_finds_its_block(screen):
    feats, meta = screen
    out = tasks.run_tasks(["perturbation", "functional_group", "qc", "experiment"], feats, meta,
                          groups_source="", dataset_dir=None)
    assert "skipped" in out["functional_group"]             # no group table given
    pert = out["perturbation"]
    assert pert["num_classes"] == 6 and pert["chance"] == pytest.approx(1 / 6)
    assert pert["num_test"] == 6 * CROPS_PER_WELL             # one held-out well per gene
    assert pert["best_block"] == 3 and pert["best_block_test"] > 0.9 and pert["test"][0] < 0.5
    assert out["qc"]["best_block"] in (2, 3) and out["qc"]["test"][0] < 0.75 < out["qc"]["best_block_test"]
    exp = out["experiment"]
    assert exp["higher_is_better"] is False and exp["test"][0] > 0.9
    assert exp["best_block"] == 3 and exp["best_block_test"] < 0.6    # the block without batch signal
    assert len(exp["val"]) == len(exp["test"]) == len(exp["l2"]) == 3


def test_functional_group_at_well_level_and_held_out_genes(screen):
    feats, meta = screen
    well = tasks.run_task(parse_task("functional_group"), feats, meta, groups=GROUP)
    assert well["level"] == "well" and well["num_classes"] == 2
    assert well["num_train"] + well["num_val"] + well["num_test"] == 6 * len(GENES)   # wells, not crops
    # Averaging 4 crops per well makes the weak block separable too: blocks 2 and 3 tie on validation.
    assert well["best_block_val"] == max(well["val"]) == 1.0 and well["best_block"] != 1
    assert well["test"][2] > 0.9 and well["test"][0] < 0.8       # the batch-only block knows no groups
    unseen = tasks.run_task(parse_task("functional_group:split=perturbations,level=crop"), feats, meta,
                            groups=GROUP)
    assert unseen["num_test"] == 2 * 6 * CROPS_PER_WELL       # one whole gene per group: 6 wells of 4 crops
    genes = meta[~meta.is_control].reset_index(drop=True)
    labels = pd.factorize(genes.perturbation.map(GROUP))[0]
    train, val, test = tasks.split_rows(parse_task("functional_group:split=perturbations"), genes, labels,
                                        (0.8, 0.1, 0.1), seed=0)
    held = [set(genes.perturbation[m]) for m in (train, val, test)]
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    assert all({GROUP[g] for g in h} == {"grp0", "grp1"} for h in held)   # every group in every split
    pairs = {g: f"pair{i // 2}" for i, g in enumerate(GENES)}  # 2 genes per group: none can be held out
    with pytest.raises(tasks.TaskUnavailable, match="leaves val empty"):
        tasks.run_task(parse_task("functional_group:split=perturbations"), feats, meta, groups=pairs)


def test_tasks_without_labels_are_skipped_with_the_reason(screen):
    feats, meta = screen
    out = tasks.run_tasks(["qc", "experiment"], feats, meta.drop(columns="qc").assign(experiment="E1"))
    assert "no `qc` column" in out["qc"]["skipped"]
    assert "1 class(es)" in out["experiment"]["skipped"]
    with pytest.raises(ValueError, match="name a task twice"):
        tasks.run_tasks(["qc", "qc:probe=logistic"], feats, meta)
    with pytest.raises(ValueError, match="labels vary within wells, use level=crop"):
        tasks.run_tasks(["qc:level=well"], feats, meta)
