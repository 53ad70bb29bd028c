"""The synthetic screen: a Cell-Painting-like CRISPR screen with known biology, our embedded dataset.

Biology. Genes belong to complexes, complexes to pathways. A gene's latent vector mixes its pathway's,
its complex's and its own random vectors, so same-complex genes have strongly correlated phenotypes and
same-pathway genes weakly correlated ones. A fixed random map takes a latent vector to phenotype
features in [-1, 1] (cell count, nucleus and cell size and shape, mitotic fraction, texture and
organelle patterns, per-channel intensity; see PHENOTYPE_AXES). Null genes (in no complex) and the
negative controls leave cells unperturbed.

Screen. experiments (batches) x plates x wells x sites. Each plate holds every gene in
`wells_per_gene` wells plus `control_wells` negative controls at random positions. Each experiment has
its own acquisition: per-channel gain and offset, vignetting and a planar illumination gradient,
noise level, cell density and size (plates and wells add small gain jitter), strong enough that
embeddings cluster by experiment until they are corrected on controls.

Output. Sites are rendered (data/cell_renderer.py), quantised to uint8 and cut by a row-major tiling
into crops, which go through data/arrayrecord_writer.py; `annotations/` gets SyntheticComplex.txt and
SyntheticPathway.txt (same-complex / same-pathway gene pairs; pathway pairs include complex pairs),
and ground_truth.json keeps the groups, latents, phenotypes and batch effects.

    python -m data.synthetic_screen --out /tmp/screen --preset demo --preview
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import string
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data import cell_renderer
from data.arrayrecord_writer import write_dataset

CONTROL_LABEL = "non-targeting"
CHUNK_SITES = 32  # sites rendered together; fixed, so the output never depends on memory settings
PLATE_ROWS, PLATE_COLS = 16, 24  # 384-well plates

# Phenotype feature -> (SitePhenotypes field, unperturbed value, how a feature value phi moves it:
# "log" multiplies by exp(scale * phi), "add" adds scale * phi).
PHENOTYPE_AXES: dict[str, tuple[str, float, str, float]] = {
    "cell_count": ("cell_density", 1.0, "log", 0.5),  # relative to ScreenConfig.cell_density
    "nucleus_size": ("nucleus_radius", 1.0, "log", 0.2),  # relative to ScreenConfig.nucleus_radius
    "nucleus_elongation": ("nucleus_elongation", 1.25, "log", 0.25),
    "cell_size": ("cell_radius", 1.0, "log", 0.2),  # relative to ScreenConfig.cell_radius
    "cell_elongation": ("cell_elongation", 1.4, "log", 0.35),
    "mitotic_fraction": ("mitotic_fraction", 0.04, "log", 1.2),
    "dna_texture": ("dna_texture", 1.0, "log", 0.6),
    "er_texture": ("er_texture", 0.8, "log", 0.6),
    "er_spread": ("er_spread", 3.5, "log", 0.4),
    "nucleoli": ("nucleoli", 0.6, "add", 0.5),
    "mito_puncta": ("mito_puncta", 0.7, "add", 0.5),
    "golgi_dispersal": ("golgi_dispersal", 1.0, "log", 0.5),
    "membrane": ("membrane", 0.8, "log", 0.5),
}
INTENSITY_SCALE = 0.3  # per-channel intensity features act as exp(0.3 * phi)
# uint8 brightness of one unit of each stain, before gains.
STAIN_BRIGHTNESS = {"DNA": 120.0, "ER": 80.0, "RNA": 120.0, "AGP": 130.0, "Mito": 140.0, "Golgi": 200.0}


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    """Every generation parameter (the `demo` preset is these defaults); each is a CLI flag too."""
    name: str = "synthetic"
    seed: int = 0
    # Biology.
    num_pathways: int = 3
    num_complexes: int = 9
    complex_size_min: int = 4
    complex_size_max: int = 6
    num_null_genes: int = 8
    latent_dim: int = 16
    pathway_weight: float = 0.7  # latent = pathway_weight * pathway + complex_weight * complex + gene_weight * own
    complex_weight: float = 1.0
    gene_weight: float = 0.5
    gene_strength_min: float = 0.6  # each gene's latent is scaled by a strength drawn in [min, max]
    gene_strength_max: float = 1.3
    effect_size: float = 1.0  # scales every phenotype feature
    # Screen layout.
    num_experiments: int = 4
    plates_per_experiment: int = 2
    wells_per_gene: int = 1  # per plate
    control_wells: int = 6  # per plate
    sites_per_well: int = 2
    site_size: int = 128
    crop_size: int = 64
    num_channels: int = 6
    # Unperturbed cells.
    cell_density: float = 18.0  # cells per 10,000 px^2
    nucleus_radius: float = 5.0
    cell_radius: float = 10.0
    # Acquisition: every batch effect is scaled by batch_effect_size (0 = identical experiments).
    batch_effect_size: float = 1.0
    # Image-quality artefacts (cell_renderer.QC_LABELS): this fraction of crops gets one, drawn per crop
    # with equal odds per kind; the crop's `qc` metadata column names it ("ok" otherwise).
    artifact_fraction: float = 0.0
    num_shards: int = 8

    def validate(self) -> None:
        if self.site_size % self.crop_size:
            raise ValueError(f"site_size {self.site_size} is not a multiple of crop_size {self.crop_size}")
        if not 1 <= self.complex_size_min <= self.complex_size_max:
            raise ValueError(f"need 1 <= complex_size_min <= complex_size_max, got "
                             f"{self.complex_size_min}, {self.complex_size_max}")
        if not 1 <= self.num_pathways <= self.num_complexes:
            raise ValueError(f"need 1 <= num_pathways ({self.num_pathways}) <= num_complexes ({self.num_complexes})")
        if min(self.num_experiments, self.plates_per_experiment, self.sites_per_well, self.control_wells,
               self.num_channels) < 1:
            raise ValueError("num_experiments, plates_per_experiment, sites_per_well, control_wells and "
                             "num_channels must be >= 1")
        if not 0.0 <= self.artifact_fraction <= 1.0:
            raise ValueError(f"artifact_fraction must be in [0, 1], got {self.artifact_fraction}")


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds to build; enough structure for tests.
    "tiny": dict(num_pathways=2, num_complexes=3, complex_size_min=2, complex_size_max=3, num_null_genes=2,
                 num_experiments=2, plates_per_experiment=1, control_wells=2, sites_per_well=1,
                 site_size=64, crop_size=32, num_shards=2),
    # The main job: ~53 genes, 4 experiments x 2 plates, ~3,800 crops of 64x64.
    "demo": dict(),
    # Throughput benchmark: 10,752 crops of 64x64x6.
    "bench10k": dict(num_complexes=30, num_pathways=8, num_null_genes=10, control_wells=8),
    # The demo screen with image-quality artefacts on 10% of the crops (the `qc` probe task).
    "demo_qc": dict(artifact_fraction=0.1),
}


@dataclasses.dataclass(frozen=True)
class Biology:
    genes: list[str]          # effective genes first, then null genes
    complex_of: list[int]     # per gene, -1 for null genes
    pathway_of_complex: list[int]
    strength: np.ndarray      # (G,)
    latents: np.ndarray       # (G, latent_dim), zero for null genes
    phenotypes: np.ndarray    # (G, num features), zero for null genes

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
    return list(PHENOTYPE_AXES) + [f"intensity_{c}" for c in cell_renderer.stain_names(num_channels)]


def make_biology(cfg: ScreenConfig, rng: np.random.Generator) -> Biology:
    sizes = rng.integers(cfg.complex_size_min, cfg.complex_size_max + 1, size=cfg.num_complexes)
    # Every pathway gets at least one complex.
    pathway_of_complex = rng.permutation(np.arange(cfg.num_complexes) % cfg.num_pathways)
    complex_of = np.concatenate([np.repeat(np.arange(cfg.num_complexes), sizes),
                                 np.full(cfg.num_null_genes, -1)])
    num_genes = len(complex_of)
    # Random names, so that gene numbering says nothing about complex membership.
    names = [f"GENE{i + 1:04d}" for i in rng.permutation(num_genes)]

    d = cfg.latent_dim
    pathway_vec = rng.standard_normal((cfg.num_pathways, d))
    complex_vec = rng.standard_normal((cfg.num_complexes, d))
    own_vec = rng.standard_normal((num_genes, d))
    strength = rng.uniform(cfg.gene_strength_min, cfg.gene_strength_max, num_genes)
    effective = complex_of >= 0
    k = np.where(effective, complex_of, 0)
    mixed = (cfg.pathway_weight * pathway_vec[pathway_of_complex[k]] + cfg.complex_weight * complex_vec[k]
             + cfg.gene_weight * own_vec)
    norm = math.sqrt(cfg.pathway_weight ** 2 + cfg.complex_weight ** 2 + cfg.gene_weight ** 2)
    latents = np.where(effective[:, None], strength[:, None] * mixed / norm, 0.0)
    strength = np.where(effective, strength, 0.0)
    features = feature_names(cfg.num_channels)
    projection = rng.standard_normal((d, len(features))) / math.sqrt(d)
    phenotypes = cfg.effect_size * np.tanh(latents @ projection)
    return Biology(genes=names, complex_of=complex_of.tolist(), pathway_of_complex=pathway_of_complex.tolist(),
                   strength=strength, latents=latents, phenotypes=phenotypes)


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """Per-experiment batch effects (arrays indexed by experiment; gains per channel)."""
    gain: np.ndarray         # (E, C)
    offset: np.ndarray       # (E, C) uint8 background
    plate_gain: np.ndarray   # (E, plates, C)
    vignetting: np.ndarray   # (E,) relative darkening at the corners
    gradient: np.ndarray     # (E, 2) planar illumination slope along x and y
    noise: np.ndarray        # (E,) read-noise std in uint8 units
    density: np.ndarray      # (E,) cell density multiplier
    cell_size: np.ndarray    # (E,) cell and nucleus size multiplier

    def to_json(self) -> dict[str, Any]:
        return {k: np.round(v, 6).tolist() for k, v in dataclasses.asdict(self).items()}


def make_acquisition(cfg: ScreenConfig, rng: np.random.Generator) -> Acquisition:
    e, c, b = cfg.num_experiments, cfg.num_channels, cfg.batch_effect_size
    angle = rng.uniform(0, 2 * np.pi, e)
    slope = b * rng.uniform(0.0, 0.3, e)
    return Acquisition(
        gain=np.exp(b * rng.normal(0, 0.25, (e, c))),
        offset=b * rng.uniform(3, 25, (e, c)),
        plate_gain=np.exp(b * rng.normal(0, 0.06, (e, cfg.plates_per_experiment, c))),
        vignetting=b * rng.uniform(0.05, 0.45, e),
        gradient=np.stack([slope * np.cos(angle), slope * np.sin(angle)], axis=1),
        noise=2.0 + b * rng.uniform(0, 5, e),
        density=np.exp(b * rng.normal(0, 0.25, e)),
        cell_size=np.exp(b * rng.normal(0, 0.07, e)),
    )


@dataclasses.dataclass(frozen=True)
class Sites:
    """Every site of the screen in output order, one entry per site."""
    experiment: np.ndarray  # experiment index
    plate: np.ndarray       # plate index within the experiment
    well: list[str]
    site: np.ndarray        # 1-based, as in RxRx
    gene: np.ndarray        # gene index, -1 for controls
    well_gain: np.ndarray   # (n, C) small per-well gain jitter

    def __len__(self) -> int:
        return len(self.site)


def make_sites(cfg: ScreenConfig, num_genes: int, rng: np.random.Generator) -> Sites:
    per_plate = num_genes * cfg.wells_per_gene + cfg.control_wells
    if per_plate > PLATE_ROWS * PLATE_COLS:
        raise ValueError(f"{per_plate} wells per plate do not fit a {PLATE_ROWS * PLATE_COLS}-well plate")
    columns = {k: [] for k in ("experiment", "plate", "well", "site", "gene")}
    for e, p in itertools.product(range(cfg.num_experiments), range(cfg.plates_per_experiment)):
        positions = np.sort(rng.choice(PLATE_ROWS * PLATE_COLS, size=per_plate, replace=False))
        contents = rng.permutation(np.concatenate([np.tile(np.arange(num_genes), cfg.wells_per_gene),
                                                   np.full(cfg.control_wells, -1)]))
        for pos, gene in zip(positions, contents):
            well = f"{string.ascii_uppercase[pos // PLATE_COLS]}{pos % PLATE_COLS + 1:02d}"
            for site in range(1, cfg.sites_per_well + 1):
                for key, value in zip(columns, (e, p, well, site, gene)):
                    columns[key].append(value)
    num_wells = len(columns["site"]) // cfg.sites_per_well
    well_gain = np.repeat(np.exp(cfg.batch_effect_size * rng.normal(0, 0.03, (num_wells, cfg.num_channels))),
                          cfg.sites_per_well, axis=0)
    return Sites(experiment=np.array(columns["experiment"]), plate=np.array(columns["plate"]),
                 well=columns["well"], site=np.array(columns["site"]), gene=np.array(columns["gene"]),
                 well_gain=well_gain)


def site_phenotypes(cfg: ScreenConfig, phenotypes: np.ndarray, acq: Acquisition,
                    experiment: np.ndarray) -> cell_renderer.SitePhenotypes:
    """Phenotype features (n, F) of the sites' genes (zeros for controls) -> renderer parameters."""
    values = {}
    for j, (field, base, kind, scale) in enumerate(PHENOTYPE_AXES.values()):
        phi = phenotypes[:, j]
        values[field] = base * np.exp(scale * phi) if kind == "log" else base + scale * phi
    size = acq.cell_size[experiment]
    values["cell_density"] = values["cell_density"] * cfg.cell_density * acq.density[experiment]
    values["nucleus_radius"] = values["nucleus_radius"] * cfg.nucleus_radius * size
    values["cell_radius"] = values["cell_radius"] * cfg.cell_radius * size
    return cell_renderer.SitePhenotypes(**values)


def render_chunk(cfg: ScreenConfig, biology: Biology, acq: Acquisition, sites: Sites, chunk: slice,
                 rng: np.random.Generator, artifact_rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders sites[chunk]: uint8 (n, C, S, S) images, the cell-centre count per tile (n, tiles) and
    the image-quality code per tile (n, tiles), an index into cell_renderer.QC_LABELS.

    Artefacts draw from their own generator, so turning them on leaves every other crop unchanged.
    """
    exp, gene = sites.experiment[chunk], sites.gene[chunk]
    phenotypes = np.where((gene >= 0)[:, None], biology.phenotypes[np.maximum(gene, 0)], 0.0)
    pheno = site_phenotypes(cfg, phenotypes, acq, exp)
    cells = cell_renderer.sample_cells(pheno, cfg.site_size, rng)
    compartments = cell_renderer.render_compartments(cells, len(exp), cfg.site_size)
    stains = cell_renderer.mix_stains(compartments, pheno, cfg.num_channels, rng)

    c = cfg.num_channels
    brightness = np.array([STAIN_BRIGHTNESS[name.split("_")[0]] for name in cell_renderer.stain_names(c)])
    intensity = np.exp(INTENSITY_SCALE * phenotypes[:, len(PHENOTYPE_AXES):])
    gain = brightness * intensity * acq.gain[exp] * acq.plate_gain[exp, sites.plate[chunk]] * sites.well_gain[chunk]
    signal = stains * _f32(gain)[:, :, None, None] * illumination(cfg.site_size, acq, exp)[:, None]
    qc = spoil_tiles(signal, cfg, artifact_rng)
    # Read noise plus photon shot noise (variance grows with the signal).
    sigma = np.sqrt(_f32(acq.noise[exp] ** 2)[:, None, None, None] + 0.5 * signal)
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
    if workers <= 1:
        yield from ((start, *render(start)) for start in starts)
        return
    # Spawned, not forked: callers may have started jax, which does not survive a fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
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
    sites = make_sites(cfg, len(biology.genes), np.random.default_rng([cfg.seed, 2]))
    channels = cell_renderer.stain_names(cfg.num_channels)
    experiments = [f"SYN-{e + 1:02d}" for e in range(cfg.num_experiments)]

    def examples() -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for start, images, counts, qc in rendered_chunks(cfg, biology, acq, sites, workers):
            for i, s in enumerate(range(start, start + len(images))):
                gene = sites.gene[s]
                for tile, crop in enumerate(tile_site(images[i], cfg.crop_size)):
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
    pathway_genes = {p: sorted(g for k in ks for g in complexes[k]) for p, ks in pathways.items()}
    ground_truth = {
        "complexes": complexes,
        "pathways": pathways,
        "null_genes": sorted(g for g, k in zip(biology.genes, biology.complex_of) if k < 0),
        "control_label": CONTROL_LABEL,
        "qc_labels": list(cell_renderer.QC_LABELS),
        "phenotype_features": feature_names(cfg.num_channels),
        "genes": {g: {"complex": _complex_name(k) if k >= 0 else None,
                      "pathway": _pathway_name(biology.pathway_of_complex[k]) if k >= 0 else None,
                      "strength": round(float(biology.strength[i]), 6),
                      "latent": np.round(biology.latents[i], 6).tolist(),
                      "phenotype": np.round(biology.phenotypes[i], 6).tolist()}
                  for i, (g, k) in enumerate(zip(biology.genes, biology.complex_of))},
        "experiments": dict(zip(experiments, _per_experiment(acq.to_json(), len(experiments)))),
    }
    return write_dataset(
        out_dir, examples(),
        name=cfg.name, source="data.synthetic_screen", channels=channels, num_shards=cfg.num_shards,
        annotations={"SyntheticComplex": _pairs(complexes.values()),
                     "SyntheticPathway": _pairs(pathway_genes.values())},
        params={"preset": preset, **dataclasses.asdict(cfg)},
        manifest_extra={
            "tiling": {"site_size": cfg.site_size, "crop_size": cfg.crop_size,
                       "tiles_per_side": cfg.site_size // cfg.crop_size, "order": "row-major"},
            "control_label": CONTROL_LABEL,
            "ground_truth": "ground_truth.json",
        },
        extra_files={"ground_truth.json": json.dumps(ground_truth, indent=1) + "\n"},
        overwrite=overwrite)


def _pairs(groups) -> list[tuple[str, str]]:
    """Every unordered pair within each group, once, sorted."""
    return sorted({(a, b) for genes in groups for a, b in itertools.combinations(sorted(genes), 2)})


def _per_experiment(acq_json: dict[str, list], num_experiments: int) -> list[dict[str, Any]]:
    return [{k: v[e] for k, v in acq_json.items()} for e in range(num_experiments)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--preview", action="store_true", help="also write <out>/preview.png")
    parser.add_argument("--workers", type=int, default=1,
                        help="render in this many processes (same output, ~N times faster on N free cores)")
    for f in dataclasses.fields(ScreenConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                            help=f"overrides the preset (ScreenConfig default: {f.default})")
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
