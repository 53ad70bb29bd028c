"""The synthetic screen (version 2): a Cell-Painting-like CRISPR screen with known biology, our test bench.

Design and the reason for every choice: docs/synthetic_screen.md. In short:

Biology. Genes belong to complexes, complexes to pathways, and each pathway to one of six phenotype
FAMILIES (intensity, morphology, relocalisation, subpopulation, spatial organisation, co-localisation;
each a fixed share of the genes). A well's state is a vector of phenotype PARAMS in units of the control
well-to-well SD (z): controls are N(0, 1) around the unperturbed cell; a perturbed gene adds a sparse
effect on its family's parameters, mixed from its pathway's and complex's latent programs and its own.
Null genes (in no complex) and the negative controls leave cells unperturbed.

Screen. experiments (batches) x plates x wells x sites. Genes are dealt into gene sets that fit a
384-well plate with `control_wells` negative controls; each experiment holds every set on
plates_per_experiment / sets plates, so each gene has that many wells per experiment. Each experiment and
plate has its own acquisition: per-channel gain and offset, vignetting and an illumination gradient,
focus blur, noise level, cell density and size.

Output. Sites are rendered (data/cell_renderer.py), quantised to uint8 and cut by a row-major tiling into
crops, which go through data/arrayrecord_writer.py. `annotations/` gets SyntheticComplex.txt
(same-complex pairs) and SyntheticPathway.txt (same-pathway pairs of different complexes), written with
a stated share of true pairs missing and of listed pairs false, as public databases are;
ground_truth.json keeps the true groups, families, effects and batch effects, and oracle.parquet each
well's true (noise-free) phenotype parameters, the ceiling of every table.

    python -m data.synthetic_screen --out /tmp/screen --preset demo --preview
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import itertools
import json
import math
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from data import cell_renderer, workers as workers_lib
from data.arrayrecord_writer import write_dataset
from maejax import flags

VERSION = 2
CONTROL_LABEL = "non-targeting"
CHUNK_SITES = 32  # sites rendered together; fixed, so the output never depends on memory settings
PLATE_ROWS, PLATE_COLS = 16, 24  # 384-well plates
FAMILIES = ("intensity", "morphology", "relocalisation", "subpopulation", "spatial", "colocalisation")


@dataclasses.dataclass(frozen=True)
class Param:
    """One phenotype parameter: its family, the SitePhenotypes field it sets, the unperturbed value, the
    control well-to-well SD (one z unit) and how z moves the value: "log" (base * exp(sd z)), "add"
    (base + sd z, clipped to `limits`) or "logit" (sigmoid(logit(base) + sd z))."""
    family: str
    field: str
    base: float
    sd: float
    kind: str = "log"
    limits: tuple[float, float] = (-np.inf, np.inf)

    def value(self, z: np.ndarray) -> np.ndarray:
        if self.kind == "log":
            return self.base * np.exp(self.sd * z)
        if self.kind == "logit":
            return 1 / (1 + np.exp(-(math.log(self.base / (1 - self.base)) + self.sd * z)))
        return np.clip(self.base + self.sd * z, *self.limits)


def make_params(num_channels: int) -> dict[str, Param]:
    """Every phenotype parameter by name (intensity: one per channel; field "" = the channel gain)."""
    params = {f"intensity_{c}": Param("intensity", "", 1.0, 0.06) for c in cell_renderer.stain_names(num_channels)}
    params.update({
        "nucleus_size": Param("morphology", "nucleus_radius", 1.0, 0.04),     # x ScreenConfig.nucleus_radius
        "nucleus_elongation": Param("morphology", "nucleus_elongation", 1.25, 0.05),
        "cell_size": Param("morphology", "cell_radius", 1.0, 0.04),           # x ScreenConfig.cell_radius
        "cell_elongation": Param("morphology", "cell_elongation", 1.4, 0.06),
        "rna_nuclear_fraction": Param("relocalisation", "rna_nuclear_fraction", 0.35, 0.2, "logit"),
        "mito_spread": Param("relocalisation", "mito_spread", 2.5, 0.1),
        "golgi_dispersal": Param("relocalisation", "golgi_dispersal", 1.0, 0.1),
        "subpop_nucleus": Param("subpopulation", "subpop_nucleus", 0.0, 0.03, "add"),
        "subpop_dna": Param("subpopulation", "subpop_dna", 0.0, 0.03, "add"),
        "subpop_cell": Param("subpopulation", "subpop_cell", 0.0, 0.03, "add"),
        "clustering": Param("spatial", "clustering", 0.15, 0.08, "add", (0.0, 1.0)),
        "alignment": Param("spatial", "alignment", 0.15, 0.08, "add", (0.0, 1.0)),
        "polarity": Param("spatial", "polarity", 0.10, 0.08, "add", (0.0, 1.0)),
        "coloc_mito_er": Param("colocalisation", "coloc_mito_er", 0.0, 0.1, "add", (-0.95, 0.95)),
        "coloc_rna_dna": Param("colocalisation", "coloc_rna_dna", 0.0, 0.1, "add", (-0.95, 0.95)),
        "coloc_golgi_agp": Param("colocalisation", "coloc_golgi_agp", 0.0, 0.1, "add", (-0.95, 0.95)),
    })
    return params


# Fields of the unperturbed cell that no family moves.
FIXED_FIELDS = dict(mitotic_fraction=0.04, dna_texture=1.0, er_texture=0.8, er_spread=3.0, nucleoli=0.6,
                    mito_puncta=0.7, membrane=0.8)
# uint8 brightness of one unit of each stain, before gains.
STAIN_BRIGHTNESS = {"DNA": 120.0, "ER": 80.0, "RNA": 120.0, "AGP": 130.0, "Mito": 140.0, "Golgi": 200.0}


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    """Every generation parameter (the `demo` preset is these defaults); each is a CLI flag too."""
    name: str = "synthetic"
    seed: int = 0
    # Biology: pathways_per_family x len(FAMILIES) pathways, each of complexes_per_pathway complexes.
    pathways_per_family: int = 4
    complexes_per_pathway: int = 3
    complex_size_min: int = 3
    complex_size_max: int = 7
    num_null_genes: int = 60
    pathway_weight: float = 0.7  # effect = pathway_weight * pathway + complex_weight * complex + gene_weight * own
    complex_weight: float = 1.0
    gene_weight: float = 0.4
    gene_strength_min: float = 0.6  # each gene's effect is scaled by a strength drawn in [min, max]
    gene_strength_max: float = 1.4
    effect_size: float = 2.5    # RMS effect on a gene's family parameters, in control well-to-well SDs
    subpop_fraction_min: float = 0.1   # the subpopulation family's genes put this share of cells in
    subpop_fraction_max: float = 0.3   # the other state (drawn per gene)
    # Annotation tables as written (the ground truth keeps the true pairs).
    annotation_missing: float = 0.2   # share of true pairs left out
    annotation_false: float = 0.1     # share of listed pairs that are not true pairs
    # Screen layout.
    num_experiments: int = 4
    plates_per_experiment: int = 4     # a multiple of the gene sets (genes / plate capacity, rounded up)
    control_wells: int = 24            # per plate
    sites_per_well: int = 1
    site_size: int = 128
    crop_size: int = 64
    num_channels: int = 6
    # Which of the rendered stains the records hold, in which order ("Mito,AGP,DNA,RNA,ER"); "" = all
    # num_channels stains in the order of data.cell_renderer.STAINS. The cells are the same either way.
    channels: str = ""
    # Unperturbed cells.
    cell_density: float = 60.0  # cells per 10,000 px^2 (~24 per 64 x 64 crop)
    nucleus_radius: float = 3.6
    cell_radius: float = 7.0
    # Acquisition: every batch effect is scaled by batch_effect_size (0 = identical experiments).
    batch_effect_size: float = 1.0
    # Image-quality artefacts (cell_renderer.QC_LABELS): this fraction of crops gets one, drawn per crop
    # with equal odds per kind; the crop's `qc` metadata column names it ("ok" otherwise).
    artifact_fraction: float = 0.0
    num_shards: int = 8

    def channel_order(self) -> list[int]:
        """Indices of the records' channels among the rendered stains (`channels`)."""
        stains = cell_renderer.stain_names(self.num_channels)
        if not self.channels:
            return list(range(self.num_channels))
        names = [n.strip() for n in self.channels.split(",")]
        unknown = [n for n in names if n not in stains]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"channels={self.channels!r}: name each channel once, from the {self.num_channels} "
                             f"rendered stains {stains}" + (f" (not rendered: {unknown})" if unknown else ""))
        return [stains.index(n) for n in names]

    def validate(self) -> None:
        if self.site_size % self.crop_size:
            raise ValueError(f"site_size {self.site_size} is not a multiple of crop_size {self.crop_size}")
        if not 1 <= self.complex_size_min <= self.complex_size_max:
            raise ValueError(f"need 1 <= complex_size_min <= complex_size_max, got "
                             f"{self.complex_size_min}, {self.complex_size_max}")
        if min(self.pathways_per_family, self.complexes_per_pathway) < 1:
            raise ValueError(f"pathways_per_family ({self.pathways_per_family}) and complexes_per_pathway "
                             f"({self.complexes_per_pathway}) must be >= 1")
        if min(self.num_experiments, self.plates_per_experiment, self.sites_per_well, self.control_wells,
               self.num_channels) < 1:
            raise ValueError("num_experiments, plates_per_experiment, sites_per_well, control_wells and "
                             "num_channels must be >= 1")
        self.channel_order()
        if self.control_wells >= PLATE_ROWS * PLATE_COLS:
            raise ValueError(f"control_wells {self.control_wells} leaves no room on a 384-well plate")
        if not 0.0 <= self.artifact_fraction <= 1.0:
            raise ValueError(f"artifact_fraction must be in [0, 1], got {self.artifact_fraction}")
        for name in ("annotation_missing", "annotation_false"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.subpop_fraction_min <= self.subpop_fraction_max <= 1:
            raise ValueError("need 0 < subpop_fraction_min <= subpop_fraction_max <= 1")


PRESETS: dict[str, dict[str, Any]] = {
    # Code-path tests only (seconds; one pathway per family, too few genes to rank models).
    "tiny": dict(pathways_per_family=1, complexes_per_pathway=2, complex_size_min=2, complex_size_max=2,
                 num_null_genes=2, num_experiments=2, plates_per_experiment=1, control_wells=4,
                 site_size=64, crop_size=32, num_shards=2, cell_density=40.0),
    # The main job: 402 genes, 4 experiments x 4 plates, 8 wells per gene, 14,400 crops of 64x64x6.
    "demo": dict(),
    # The smallest screen that still ranks models: 210 genes, 4 experiments x 2 plates, 4 wells per gene.
    "fast": dict(pathways_per_family=3, complexes_per_pathway=2, complex_size_min=4, complex_size_max=6,
                 num_null_genes=30, plates_per_experiment=2),
    # The demo screen with image-quality artefacts on 10% of the crops (the `qc` probe task).
    "demo_qc": dict(artifact_fraction=0.1),
}


@dataclasses.dataclass(frozen=True)
class Biology:
    genes: list[str]          # effective genes first, then null genes
    complex_of: list[int]     # per gene, -1 for null genes
    pathway_of_complex: list[int]
    family_of_pathway: list[int]
    strength: np.ndarray      # (G,)
    effects: np.ndarray       # (G, P) in control well-to-well SDs, zero for null genes
    subpop_fraction: np.ndarray  # (G,) share of cells in the other state (subpopulation genes)

    def family_of_gene(self, i: int) -> str | None:
        k = self.complex_of[i]
        return FAMILIES[self.family_of_pathway[self.pathway_of_complex[k]]] if k >= 0 else None

    def complexes(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for gene, k in zip(self.genes, self.complex_of):
            if k >= 0:
                groups.setdefault(_complex_name(k), []).append(gene)
        return {name: sorted(genes) for name, genes in sorted(groups.items())}

    def pathways(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for k, p in enumerate(self.pathway_of_complex):
            groups.setdefault(_pathway_name(p), []).append(_complex_name(k))
        return dict(sorted(groups.items()))


def _complex_name(k: int) -> str:
    return f"CPLX{k + 1:02d}"


def _pathway_name(p: int) -> str:
    return f"PATH{p + 1:02d}"


def feature_names(num_channels: int) -> list[str]:
    """The phenotype parameters, in the order of Biology.effects' columns and oracle.parquet."""
    return list(make_params(num_channels))


def _program(rng: np.random.Generator, columns: np.ndarray, num_params: int) -> np.ndarray:
    """A sparse latent program: N(0, 1) on 1-2 of the family's parameters (1-3 for a wider family)."""
    vec = np.zeros(num_params)
    k = rng.integers(1, 3 if len(columns) <= 4 else 4)
    on = rng.choice(columns, size=min(k, len(columns)), replace=False)
    vec[on] = rng.standard_normal(len(on))
    return vec


def make_biology(cfg: ScreenConfig, rng: np.random.Generator) -> Biology:
    params = make_params(cfg.num_channels)
    fam_cols = [np.array([j for j, p in enumerate(params.values()) if p.family == f]) for f in FAMILIES]
    num_pathways = cfg.pathways_per_family * len(FAMILIES)
    num_complexes = num_pathways * cfg.complexes_per_pathway
    family_of_pathway = np.arange(num_pathways) % len(FAMILIES)   # the same number of pathways per family
    pathway_of_complex = np.repeat(np.arange(num_pathways), cfg.complexes_per_pathway)
    # Complex sizes cycle through [min, max] and are dealt at random within each family: every family (and
    # every seed) has exactly the same number of genes.
    per_family = np.resize(np.arange(cfg.complex_size_min, cfg.complex_size_max + 1),
                           cfg.pathways_per_family * cfg.complexes_per_pathway)
    sizes = np.empty(num_complexes, int)
    for f in range(len(FAMILIES)):
        slots = np.flatnonzero(family_of_pathway[pathway_of_complex] == f)
        sizes[slots] = rng.permutation(per_family)
    complex_of = np.concatenate([np.repeat(np.arange(num_complexes), sizes), np.full(cfg.num_null_genes, -1)])
    num_genes = len(complex_of)
    # Random names, so that gene numbering says nothing about complex membership.
    names = [f"GENE{i + 1:04d}" for i in rng.permutation(num_genes)]

    P = len(params)
    pathway_vec = np.stack([_program(rng, fam_cols[family_of_pathway[p]], P) for p in range(num_pathways)])
    complex_vec = np.stack([_program(rng, fam_cols[family_of_pathway[pathway_of_complex[k]]], P)
                            for k in range(num_complexes)])
    strength = rng.uniform(cfg.gene_strength_min, cfg.gene_strength_max, num_genes)
    own = rng.standard_normal((num_genes, P))
    effects = np.zeros((num_genes, P))
    subpop = np.full(num_genes, cfg.subpop_fraction_min)
    for g in np.flatnonzero(complex_of >= 0):
        k = complex_of[g]
        p = pathway_of_complex[k]
        cols = fam_cols[family_of_pathway[p]]
        mixed = cfg.pathway_weight * pathway_vec[p] + cfg.complex_weight * complex_vec[k]
        mixed[cols] += cfg.gene_weight * own[g, cols]
        rms = np.sqrt(np.mean(mixed[cols] ** 2))
        effects[g] = strength[g] * cfg.effect_size * mixed / max(rms, 1e-9) * np.sqrt(
            np.count_nonzero(mixed[cols]) / len(cols))
        if FAMILIES[family_of_pathway[p]] == "subpopulation":
            subpop[g] = rng.uniform(cfg.subpop_fraction_min, cfg.subpop_fraction_max)
    strength = np.where(complex_of >= 0, strength, 0.0)
    return Biology(genes=names, complex_of=complex_of.tolist(), pathway_of_complex=pathway_of_complex.tolist(),
                   family_of_pathway=family_of_pathway.tolist(), strength=strength, effects=effects,
                   subpop_fraction=subpop)


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """Per-experiment and per-plate batch effects (gains per channel)."""
    gain: np.ndarray         # (E, C)
    offset: np.ndarray       # (E, C) uint8 background
    plate_gain: np.ndarray   # (E, plates, C)
    vignetting: np.ndarray   # (E,) relative darkening at the corners
    gradient: np.ndarray     # (E, 2) planar illumination slope along x and y
    noise: np.ndarray        # (E,) read-noise std in uint8 units
    plate_noise: np.ndarray  # (E, plates) multiplier of the read noise
    focus: np.ndarray        # (E, plates) Gaussian blur (px) of an out-of-focus plate
    density: np.ndarray      # (E,) cell density multiplier
    cell_size: np.ndarray    # (E,) cell and nucleus size multiplier

    def to_json(self) -> dict[str, Any]:
        return {k: np.round(v, 6).tolist() for k, v in dataclasses.asdict(self).items()}


def make_acquisition(cfg: ScreenConfig, rng: np.random.Generator) -> Acquisition:
    e, c, b, n_p = cfg.num_experiments, cfg.num_channels, cfg.batch_effect_size, cfg.plates_per_experiment
    angle = rng.uniform(0, 2 * np.pi, e)
    slope = b * rng.uniform(0.0, 0.3, e)
    return Acquisition(
        gain=np.exp(b * rng.normal(0, 0.25, (e, c))),
        offset=b * rng.uniform(3, 25, (e, c)),
        plate_gain=np.exp(b * rng.normal(0, 0.06, (e, n_p, c))),
        vignetting=b * rng.uniform(0.05, 0.45, e),
        gradient=np.stack([slope * np.cos(angle), slope * np.sin(angle)], axis=1),
        noise=2.0 + b * rng.uniform(0, 5, e),
        plate_noise=np.exp(b * rng.normal(0, 0.2, (e, n_p))),
        focus=b * rng.uniform(0.0, 0.9, (e, n_p)),
        density=np.exp(b * rng.normal(0, 0.15, e)),
        cell_size=np.exp(b * rng.normal(0, 0.05, e)),
    )


@dataclasses.dataclass(frozen=True)
class Sites:
    """Every site of the screen in output order, one entry per site."""
    experiment: np.ndarray  # experiment index
    plate: np.ndarray       # plate index within the experiment
    well: list[str]
    site: np.ndarray        # 1-based, as in RxRx
    gene: np.ndarray        # gene index, -1 for controls
    well_index: np.ndarray  # index into `z`
    z: np.ndarray           # (wells, P) each well's true phenotype parameters, control SD units
    well_gain: np.ndarray   # (n, C) small per-well technical gain jitter

    def __len__(self) -> int:
        return len(self.site)


def gene_sets(num_genes: int, cfg: ScreenConfig) -> int:
    """How many plates it takes to hold every gene once beside the controls."""
    return math.ceil(num_genes / (PLATE_ROWS * PLATE_COLS - cfg.control_wells))


def make_sites(cfg: ScreenConfig, biology: Biology, rng: np.random.Generator) -> Sites:
    num_genes = len(biology.genes)
    sets = gene_sets(num_genes, cfg)
    if cfg.plates_per_experiment % sets:
        raise ValueError(f"{num_genes} genes with {cfg.control_wells} control wells take {sets} plates: "
                         f"plates_per_experiment ({cfg.plates_per_experiment}) must be a multiple of {sets}")
    members = np.array_split(rng.permutation(num_genes), sets)
    columns = {k: [] for k in ("experiment", "plate", "well", "site", "gene", "well_index")}
    well_genes = []
    for e, p in itertools.product(range(cfg.num_experiments), range(cfg.plates_per_experiment)):
        genes = members[p % sets]
        per_plate = len(genes) + cfg.control_wells
        positions = np.sort(rng.choice(PLATE_ROWS * PLATE_COLS, size=per_plate, replace=False))
        contents = rng.permutation(np.concatenate([genes, np.full(cfg.control_wells, -1)]))
        for pos, gene in zip(positions, contents):
            well = f"{string.ascii_uppercase[pos // PLATE_COLS]}{pos % PLATE_COLS + 1:02d}"
            for site in range(1, cfg.sites_per_well + 1):
                for key, value in zip(columns, (e, p, well, site, gene, len(well_genes))):
                    columns[key].append(value)
            well_genes.append(gene)
    well_genes = np.array(well_genes)
    # Each well's state: its gene's effect plus biological well-to-well variation (1 SD per parameter).
    z = (np.where((well_genes >= 0)[:, None], biology.effects[np.maximum(well_genes, 0)], 0.0)
         + rng.standard_normal((len(well_genes), biology.effects.shape[1])))
    well_gain = np.exp(cfg.batch_effect_size * rng.normal(0, 0.03, (len(well_genes), cfg.num_channels)))
    wi = np.array(columns["well_index"])
    return Sites(experiment=np.array(columns["experiment"]), plate=np.array(columns["plate"]),
                 well=columns["well"], site=np.array(columns["site"]), gene=np.array(columns["gene"]),
                 well_index=wi, z=z, well_gain=well_gain[wi])


def site_phenotypes(cfg: ScreenConfig, z: np.ndarray, subpop_fraction: np.ndarray, acq: Acquisition,
                    experiment: np.ndarray) -> tuple[cell_renderer.SitePhenotypes, np.ndarray]:
    """Sites' phenotype parameters z (n, P) -> (renderer parameters, per-channel intensity (n, C))."""
    params = make_params(cfg.num_channels)
    n = len(z)
    values = {k: np.full(n, v, float) for k, v in FIXED_FIELDS.items()}
    intensity = []
    for j, p in enumerate(params.values()):
        if p.family == "intensity":
            intensity.append(p.value(z[:, j]))
        else:
            values[p.field] = p.value(z[:, j])
    values["subpop_fraction"] = subpop_fraction
    size = acq.cell_size[experiment]
    values["cell_density"] = np.full(n, cfg.cell_density) * acq.density[experiment]
    values["nucleus_radius"] = values["nucleus_radius"] * cfg.nucleus_radius * size
    values["cell_radius"] = values["cell_radius"] * cfg.cell_radius * size
    return cell_renderer.SitePhenotypes(**values), np.stack(intensity, axis=1)


def render_chunk(cfg: ScreenConfig, biology: Biology, acq: Acquisition, sites: Sites, chunk: slice,
                 rng: np.random.Generator, artifact_rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders sites[chunk]: uint8 (n, C, S, S) images, the cell-centre count per tile (n, tiles) and
    the image-quality code per tile (n, tiles), an index into cell_renderer.QC_LABELS.

    Artefacts draw from their own generator, so turning them on leaves every other crop unchanged.
    """
    exp, gene, plate = sites.experiment[chunk], sites.gene[chunk], sites.plate[chunk]
    subpop = np.where(gene >= 0, biology.subpop_fraction[np.maximum(gene, 0)], cfg.subpop_fraction_min)
    pheno, intensity = site_phenotypes(cfg, sites.z[sites.well_index[chunk]], subpop, acq, exp)
    cells = cell_renderer.sample_cells(pheno, cfg.site_size, rng)
    compartments = cell_renderer.render_compartments(cells, len(exp), cfg.site_size)
    stains = cell_renderer.mix_stains(compartments, pheno, cfg.num_channels, rng)

    c = cfg.num_channels
    brightness = np.array([STAIN_BRIGHTNESS[name.split("_")[0]] for name in cell_renderer.stain_names(c)])
    gain = brightness * intensity * acq.gain[exp] * acq.plate_gain[exp, plate] * sites.well_gain[chunk]
    signal = stains * _f32(gain)[:, :, None, None] * illumination(cfg.site_size, acq, exp)[:, None]
    for i, blur in enumerate(acq.focus[exp, plate]):   # out-of-focus plates
        if blur > 0.05:
            signal[i] = ndimage.gaussian_filter(signal[i], (0, blur, blur), mode="reflect")
    qc = spoil_tiles(signal, cfg, artifact_rng)
    # Read noise plus photon shot noise (variance grows with the signal).
    read = acq.noise[exp] * acq.plate_noise[exp, plate]
    sigma = np.sqrt(_f32(read ** 2)[:, None, None, None] + 0.5 * signal)
    noisy = signal + _f32(acq.offset[exp])[:, :, None, None] + sigma * rng.standard_normal(signal.shape, np.float32)
    images = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    tiles_per_side = cfg.site_size // cfg.crop_size
    inside = (cells.x >= 0) & (cells.x < cfg.site_size) & (cells.y >= 0) & (cells.y < cfg.site_size)
    tile = (cells.y[inside] // cfg.crop_size).astype(int) * tiles_per_side + (cells.x[inside] // cfg.crop_size).astype(int)
    counts = np.zeros((len(exp), tiles_per_side ** 2), np.int64)
    np.add.at(counts, (cells.site[inside], tile), 1)
    counts[qc == cell_renderer.QC_LABELS.index("empty")] = 0
    return images, counts, qc


def spoil_tiles(signal: np.ndarray, cfg: ScreenConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Draws an artefact for `artifact_fraction` of the tiles of (n, C, S, S) site signals and applies it
    in place (tiles as `tile_site` cuts them). Returns the (n, tiles) codes into QC_LABELS."""
    per_side = cfg.site_size // cfg.crop_size
    codes = np.zeros((len(signal), per_side ** 2), np.int8)
    if cfg.artifact_fraction == 0:
        return codes
    spoiled = rng.random(codes.shape) < cfg.artifact_fraction
    codes[spoiled] = rng.integers(1, len(cell_renderer.QC_LABELS), int(spoiled.sum()))
    s = cfg.crop_size
    for i, t in zip(*np.nonzero(codes)):
        y, x = divmod(int(t), per_side)
        tile = signal[i, :, y * s:(y + 1) * s, x * s:(x + 1) * s]   # a view: spoiled in place
        cell_renderer.add_artifact(tile, cell_renderer.QC_LABELS[codes[i, t]], rng)
    return codes


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def rendered_chunks(cfg: ScreenConfig, biology: Biology, acq: Acquisition, sites: Sites,
                    workers: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first site, images, cell counts, qc codes) of every chunk of CHUNK_SITES sites, in order.

    Each chunk draws from its own seeded generator, so rendering in worker processes gives the same output.
    """
    render = functools.partial(_render_chunk_at, cfg=cfg, biology=biology, acq=acq, sites=sites)
    starts = range(0, len(sites), CHUNK_SITES)
    workers = workers_lib.pool_size(workers, len(starts))
    if workers <= 1:
        yield from ((start, *render(start)) for start in starts)
        return
    with workers_lib.spawn_pool(workers) as pool:
        pending = collections.deque()
        for start in starts:
            pending.append((start, pool.submit(render, start)))
            if len(pending) > 2 * workers:  # bounded read-ahead: memory stays flat on big screens
                first, future = pending.popleft()
                yield (first, *future.result())
        for first, future in pending:
            yield (first, *future.result())


def _render_chunk_at(start: int, cfg: ScreenConfig, biology: Biology, acq: Acquisition, sites: Sites):
    chunk = slice(start, min(start + CHUNK_SITES, len(sites)))
    return render_chunk(cfg, biology, acq, sites, chunk, np.random.default_rng([cfg.seed, 3, start]),
                        np.random.default_rng([cfg.seed, 4, start]))


def illumination(size: int, acq: Acquisition, experiment: np.ndarray) -> np.ndarray:
    """(n, S, S) multiplicative illumination field: vignetting times a planar gradient."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # -1..1 across the field
    y, x = axis[:, None], axis[None, :]
    v = acq.vignetting[experiment][:, None, None]
    gx, gy = (acq.gradient[experiment, k][:, None, None] for k in (0, 1))
    return ((1 - v * (x * x + y * y) / 2) * (1 + gx * x + gy * y)).astype(np.float32)


def tile_site(image: np.ndarray, crop_size: int) -> np.ndarray:
    """(C, S, S) -> (tiles, C, crop, crop), tiles in row-major order."""
    c, s, _ = image.shape
    n = s // crop_size
    return image.reshape(c, n, crop_size, n, crop_size).transpose(1, 3, 0, 2, 4).reshape(n * n, c, crop_size, crop_size)


def generate_screen(out_dir: str | Path, preset: str = "demo", overwrite: bool = False, workers: int = 1,
                    **params) -> Path:
    """Builds the synthetic screen dataset at `out_dir` (preset values, overridden by `params`).

    workers > 1 renders in that many processes; the output does not depend on it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ScreenConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"unknown screen parameters {unknown}")
    cfg = ScreenConfig(**{"name": f"synthetic-{preset}", **PRESETS[preset], **params})
    cfg.validate()

    biology = make_biology(cfg, np.random.default_rng([cfg.seed, 0]))
    acq = make_acquisition(cfg, np.random.default_rng([cfg.seed, 1]))
    sites = make_sites(cfg, biology, np.random.default_rng([cfg.seed, 2]))
    order = cfg.channel_order()
    channels = [cell_renderer.stain_names(cfg.num_channels)[i] for i in order]
    experiments = [f"SYN-{e + 1:02d}" for e in range(cfg.num_experiments)]

    def examples() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for start, images, counts, qc in rendered_chunks(cfg, biology, acq, sites, workers):
            for i, s in enumerate(range(start, start + len(images))):
                gene = sites.gene[s]
                for tile, crop in enumerate(tile_site(images[i][order], cfg.crop_size)):
                    yield crop, {
                        "experiment": experiments[sites.experiment[s]],
                        "plate": f"Plate{sites.plate[s] + 1}",
                        "well": sites.well[s],
                        "site": int(sites.site[s]),
                        "tile": tile,
                        "perturbation": CONTROL_LABEL if gene < 0 else biology.genes[gene],
                        "is_control": bool(gene < 0),
                        "num_cells": int(counts[i, tile]),  # ground truth: cell centres inside the crop
                        "qc": cell_renderer.QC_LABELS[qc[i, tile]],
                    }

    complexes, pathways = biology.complexes(), biology.pathways()
    complex_pairs = _pairs(complexes.values())
    pathway_genes = {p: sorted(g for k in ks for g in complexes[k]) for p, ks in pathways.items()}
    # Same pathway, different complex: complex pairs are counted once, in their own table.
    pathway_pairs = sorted(set(_pairs(pathway_genes.values())) - set(complex_pairs))
    names = feature_names(cfg.num_channels)
    params = make_params(cfg.num_channels)
    note_rng = np.random.default_rng([cfg.seed, 5])
    families = {g: biology.family_of_gene(i) for i, g in enumerate(biology.genes)}
    ground_truth = {
        "version": VERSION,
        "complexes": complexes,
        "pathways": pathways,
        "pathway_family": {_pathway_name(p): FAMILIES[f] for p, f in enumerate(biology.family_of_pathway)},
        "families": list(FAMILIES),
        "null_genes": sorted(g for g, k in zip(biology.genes, biology.complex_of) if k < 0),
        "control_label": CONTROL_LABEL,
        "qc_labels": list(cell_renderer.QC_LABELS),
        "phenotype_features": names,
        "phenotype_params": {k: {"family": p.family, "base": p.base, "control_sd": p.sd, "kind": p.kind}
                             for k, p in params.items()},
        "true_pairs": {"SyntheticComplex": [list(p) for p in complex_pairs],
                       "SyntheticPathway": [list(p) for p in pathway_pairs]},
        "annotation_noise": {"missing": cfg.annotation_missing, "false": cfg.annotation_false},
        "genes": {g: {"complex": _complex_name(k) if k >= 0 else None,
                      "pathway": _pathway_name(biology.pathway_of_complex[k]) if k >= 0 else None,
                      "family": families[g],
                      "strength": round(float(biology.strength[i]), 6),
                      "subpop_fraction": round(float(biology.subpop_fraction[i]), 6),
                      "effect": np.round(biology.effects[i], 6).tolist()}
                  for i, (g, k) in enumerate(zip(biology.genes, biology.complex_of))},
        "experiments": dict(zip(experiments, _per_experiment(acq.to_json(), len(experiments)))),
    }
    # Each well's true phenotype parameters (no batch effect, no imaging noise): the oracle's features.
    first = np.unique(sites.well_index, return_index=True)[1]
    oracle = pd.DataFrame({
        "experiment": [experiments[e] for e in sites.experiment[first]],
        "plate": [f"Plate{p + 1}" for p in sites.plate[first]],
        "well": [sites.well[i] for i in first],
        "perturbation": [CONTROL_LABEL if g < 0 else biology.genes[g] for g in sites.gene[first]],
    })
    oracle = pd.concat([oracle, pd.DataFrame(sites.z.astype(np.float32), columns=[f"z_{n}" for n in names])], axis=1)
    buffer = io.BytesIO()
    oracle.to_parquet(buffer, index=False)
    return write_dataset(
        out_dir, examples(),
        name=cfg.name, source="data.synthetic_screen", channels=channels, num_shards=cfg.num_shards,
        annotations={"SyntheticComplex": noisy_pairs(complex_pairs, biology.genes, cfg, note_rng),
                     "SyntheticPathway": noisy_pairs(pathway_pairs, biology.genes, cfg, note_rng)},
        params={"preset": preset, "version": VERSION, **dataclasses.asdict(cfg)},
        manifest_extra={
            "tiling": {"site_size": cfg.site_size, "crop_size": cfg.crop_size,
                       "tiles_per_side": cfg.site_size // cfg.crop_size, "order": "row-major"},
            "control_label": CONTROL_LABEL,
            "ground_truth": "ground_truth.json",
            "oracle": "oracle.parquet",
        },
        extra_files={"ground_truth.json": json.dumps(ground_truth, indent=1) + "\n",
                     "oracle.parquet": buffer.getvalue()},
        overwrite=overwrite)


def noisy_pairs(true_pairs: list[tuple[str, str]], genes: list[str], cfg: ScreenConfig,
                rng: np.random.Generator) -> list[tuple[str, str]]:
    """The table as a database would list it: `annotation_missing` of the true pairs dropped, then false
    pairs (random gene pairs that are not true pairs) added until they are `annotation_false` of the list."""
    true_set = set(true_pairs)
    kept = [p for p in true_pairs if rng.random() >= cfg.annotation_missing]
    n_false = round(len(kept) * cfg.annotation_false / (1 - cfg.annotation_false))
    false: set[tuple[str, str]] = set()
    while len(false) < n_false:
        a, b = sorted(rng.choice(genes, 2, replace=False).tolist())
        if (a, b) not in true_set:
            false.add((a, b))
    return sorted(set(kept) | false)


def _pairs(groups) -> list[tuple[str, str]]:
    """Every unordered pair within each group, once, sorted."""
    return sorted({(a, b) for genes in groups for a, b in itertools.combinations(sorted(genes), 2)})


def _per_experiment(acq_json: dict[str, list], num_experiments: int) -> list[dict[str, Any]]:
    return [{k: v[e] for k, v in acq_json.items()} for e in range(num_experiments)]


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--preview", action="store_true", help="also write <out>/preview.png")
    parser.add_argument("--workers", type=int, default=1,
                        help="render in this many processes (same output, ~N times faster on N free cores)")
    for f in dataclasses.fields(ScreenConfig):
        old = f"--{f.name.replace('_', '-')}"
        parser.add_argument(f"--{f.name}", deprecated=[old] if "_" in f.name else [], type=type(f.default),
                            default=None, help=f"overrides the preset (ScreenConfig default: {f.default})")
    args = vars(parser.parse_args(argv))
    out, preset, overwrite, preview, workers = (
        args.pop(k) for k in ("out", "preset", "overwrite", "preview", "workers"))
    params = {k: v for k, v in args.items() if v is not None}
    start = time.perf_counter()
    path = generate_screen(out, preset=preset, overwrite=overwrite, workers=workers, **params)
    seconds = time.perf_counter() - start
    manifest = json.loads((path / "manifest.json").read_text())
    n = manifest["num_records"]
    print(f"wrote {n} crops {tuple(manifest['crop_shape'])} of {len(manifest['perturbations'])} perturbations "
          f"to {path} in {seconds:.1f} s ({n / seconds:.0f} crops/s)")
    if preview:
        from data.screen_preview import write_preview
        print(f"preview: {write_preview(path, path / 'preview.png')}")


if __name__ == "__main__":
    main()
