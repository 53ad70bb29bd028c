"""CellProfiler-grade hand-crafted features: segment every crop into nuclei, cells and cytoplasm, measure
each object with CellProfiler's own measurement code, take the median per crop, select features the
pycytominer way. The field's standard baseline for image-based profiling (the JUMP / Cell Painting
recipe), next to the fast per-image statistics of eval/handcrafted.py.

Libraries: segmentation is scikit-image + scipy.ndimage; the measurements are `cp-measure` (CellProfiler
4's MeasureObjectSizeShape, MeasureObjectIntensity, MeasureTexture, MeasureGranularity,
MeasureObjectIntensityDistribution and MeasureColocalization as a library, on centrosome and mahotas),
with its numba backend for intensity and texture (~10x faster than its numpy one).

Segmentation, per crop. Nuclei come from the channel named DNA (else the first), cell bodies from the
sum of the other channels, cell borders from AGP when present:
  nuclei     Gaussian smoothing (sigma 1, edges reflected), minimum cross-entropy threshold (Li's; the
             usual CellProfiler setting: unlike Otsu it keeps dim nuclei next to bright mitotic ones,
             and it puts a blurred edge ~1 px out), holes filled, objects under
             MIN_NUCLEUS_AREA px removed; touching nuclei split by a watershed of the distance transform
             from its maxima (one seed per maximum of a (2 MIN_PEAK_DISTANCE + 1)-px window). A crop
             whose two classes are under MIN_CONTRAST background SDs apart (an empty field: the threshold
             splits noise) has no nuclei;
  cells      a watershed seeded by the nuclei on the smoothed AGP image (its membrane stain makes ridges
             between cells; without AGP, on the negated smoothed body image), limited to the body
             foreground: above the lower of three Otsu classes (CellProfiler's three-class Otsu with the
             middle class as foreground), or in a nucleus;
  cytoplasm  cell minus nucleus.
As in CellProfiler's IdentifyPrimaryObjects default, nuclei touching the crop border are discarded,
with their cells (after seeding the cells, so that their pixels are not given to a neighbour).

Measurements (MEASUREMENTS and PARAMS below; images as float in [0, 1]):
  AreaShape           area, perimeter, axes, eccentricity, orientation, solidity, extent, form factor,
                      compactness, Euler number, radii, central / normalised / Hu moments, inertia
                      tensor, Feret diameters: nuclei and cells;
  Intensity           per channel: integrated, mean, std, min, max, quartiles, median, MAD, mass
                      displacement and the edge intensities: nuclei, cells, cytoplasm;
  Texture             per channel: the 13 Haralick features at scale 3 in 4 directions, 64 grey levels:
                      nuclei, cytoplasm;
  RadialDistribution  per channel: fraction, mean fraction and CV in 4 rings from the centre: cells;
  Correlation         per channel pair: Pearson correlation and slope, Manders M1/M2 (15% thresholds),
                      over all the cells of a crop as one object ("Image": MeasureColocalization on
                      the images masked to the cells).
Left out to fit the main job's 3 minutes (one crop per well, ~3,600 crops of 64 x 64 x 6 with ~20
cells, on 2 cores):
  Granularity     the slowest family: 31 of ~105 ms per crop even at its cheapest useful setting (per
                  channel, the first 2 steps of the spectrum at full resolution after a 3-px top-hat:
                  CellProfiler's 0.25 subsampling is for 1,000-px fields, granules here are 1-2 px).
                  MEASUREMENTS["granularity"] = ("Cells",) turns it on, with those PARAMS;
  colocalisation per cell (15 channel pairs x ~20 cells of Python loops: ~70 ms, as much as all the
                  rest; measured once per crop instead), Costes and rank-weighted colocalisation;
  texture of whole cells (their pixels are the nuclei's plus the cytoplasm's, both measured);
  Zernike shapes  their values depend at round-off level on where the object lies in the image (a pixel
                  on the enclosing circle flips), so they need one call per crop (+7 ms): add "zernike"
                  to MEASUREMENTS; radial Zernikes likewise.
Position columns (object centres, bounding-box corners, raw spatial moments, intensity-weighted
locations) are dropped: they say where an object is, not what it looks like.

Per crop: the median of every measurement over the crop's objects (the CellProfiler / pycytominer
aggregation), plus Count_Nuclei. A crop without a retained nucleus has count 0 and NaN elsewhere;
`select_features` imputes them.

Speed: crops are measured in mosaics of BATCH tiles, GAP px of zeros apart: one library call per
measurement for 16 crops (per-call overhead dominates at 64 x 64). Smoothing and thresholds are per
tile; every other operation reaches less than GAP px or stops at zero pixels, so a crop's features do
not depend on which crops share its mosaic (tests check). Radial distribution recomputes the label
geometry for every channel; `_shared_radial_geometry` computes it once per label image (same values).
`cellprofiler_screen` measures the first crop(s) of every well in a pool of spawn processes.
Measured on this project's 2-core machine, synthetic screen preset `fast` (64 x 64 x 6 crops, ~23 cells
of which ~16 clear the border rule): ~74 ms of CPU per crop (AreaShape 24, radial distribution 17,
texture 12, colocalisation 7, segmentation 5, intensity 4); one process 12 crops/s; `cellprofiler_screen`
with 2 workers 23.4 crops/s end to end (reading, spawn, selection) for its 1,872 wells, so the demo's
~3,600 wells take ~2.6 minutes.

Feature selection (`select_features`) re-implements pycytominer's `feature_select` operations
drop_na_columns, variance_threshold and correlation_threshold on the screen matrix (about 40 lines,
instead of pycytominer and its dependency tree); `standardize` is its `normalize(method="standardize")`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from data import workers as workers_lib

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm", "Image")   # Image: all of a crop's cells as one object
# family -> compartments it is measured on. Shape families run once per compartment, channel families
# once per channel, correlation once per channel pair.
MEASUREMENTS: dict[str, tuple[str, ...]] = {
    "sizeshape": ("Nuclei", "Cells"),
    "feret": ("Nuclei", "Cells"),
    "intensity": ("Nuclei", "Cells", "Cytoplasm"),
    "texture": ("Nuclei", "Cytoplasm"),
    "radial_distribution": ("Cells",),
    "correlation": ("Image",),
}
SHAPE_FAMILIES = ("sizeshape", "zernike", "feret")   # zernike: off unless added to MEASUREMENTS
CHANNEL_FAMILIES = ("intensity", "texture", "granularity", "radial_distribution")
CORRELATIONS = ("pearson", "manders_fold")
# Keyword arguments of the cp-measure functions. sizeshape: CellProfiler 4's feature set (new_features
# adds scikit-image's Crofton perimeter and filled area). texture: 64 grey levels (256, CellProfiler 3's,
# costs 5x here). granularity (off by default): see the module docstring.
PARAMS: dict[str, dict] = {
    "sizeshape": dict(new_features=False),
    "texture": dict(scale=3, gray_levels=64),
    "granularity": dict(subsample_size=1.0, image_sample_size=1.0, element_size=3, granular_spectrum_length=2),
    "radial_distribution": dict(bin_count=4),
}
# Columns that locate an object in the image rather than describe it.
POSITIONAL = ("Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_", "SpatialMoment_", "Location_")

SMOOTHING_SIGMA = 1.0
MIN_NUCLEUS_AREA = 8
MIN_PEAK_DISTANCE = 3
MIN_CONTRAST = 4.0      # synthetic screen: real crops >= 5.4, empty fields <= 3 (class mean gap / bg SD)
DNA_NAMES = ("DNA", "dna", "Hoechst", "DAPI")
MEMBRANE_NAMES = ("AGP",)

BATCH = 16   # crops per mosaic
GAP = 4      # zero pixels around every tile: > every operation's reach (granularity top-hat 3, seed window 3)
WORKERS = 2
DEFAULT_CROPS_PER_WELL = 1


# ----------------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------------

def _roles(channels: Sequence[str]) -> tuple[int, int | None, list[int]]:
    """(nuclear channel, membrane channel or None, non-nuclear channels)."""
    names = [str(c) for c in channels]
    dna = next((i for i, c in enumerate(names) if c in DNA_NAMES), 0)
    membrane = next((i for i, c in enumerate(names) if c in MEMBRANE_NAMES and i != dna), None)
    others = [i for i in range(len(names)) if i != dna]
    return dna, membrane, others


def _layout(n: int, h: int, w: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Mosaic shape and each tile's top-left corner: a near-square grid, GAP px around every tile."""
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    origins = [(GAP + (k // cols) * (h + GAP), GAP + (k % cols) * (w + GAP)) for k in range(n)]
    return (GAP + rows * (h + GAP), GAP + cols * (w + GAP)), origins


def _otsu(values: np.ndarray, classes: int = 2) -> float:
    """Threshold of one tile (pixels > threshold are foreground): with 2 classes minimum cross-entropy
    (Li), with 3 the lower Otsu threshold (CellProfiler's three-class Otsu, middle class foreground).
    +inf for a flat tile, and, with 2 classes, for a tile whose classes are less than MIN_CONTRAST
    background SDs apart: any threshold splits pure noise (an empty field would be tiled with 'nuclei')."""
    from skimage.filters import threshold_li, threshold_multiotsu, threshold_otsu
    if values.max() - values.min() < 1e-6:
        return np.inf
    if classes == 3:
        try:
            return float(threshold_multiotsu(values, classes=3)[0])
        except ValueError:   # too few grey levels for three classes
            return float(threshold_otsu(values))
    t = float(threshold_li(values))
    low, high = values[values <= t], values[values > t]
    if high.size and high.mean() - low.mean() < MIN_CONTRAST * low.std():
        return np.inf
    return t


def _tile_thresholds(smooth: np.ndarray, origins, h: int, w: int, classes: int = 2) -> np.ndarray:
    """A per-pixel map of each tile's Otsu threshold; +inf in the gaps."""
    out = np.full(smooth.shape, np.inf, np.float32)
    for r, c in origins:
        out[r:r + h, c:c + w] = _otsu(smooth[r:r + h, c:c + w], classes)
    return out


def _smooth(image: np.ndarray, origins, h: int, w: int) -> np.ndarray:
    """Gaussian smoothing of every tile on its own (edges reflected, as for a single image); 0 in the gaps."""
    tiles = np.stack([image[r:r + h, c:c + w] for r, c in origins])
    tiles = ndi.gaussian_filter(tiles, (0, SMOOTHING_SIGMA, SMOOTHING_SIGMA), mode="reflect")
    out = np.zeros_like(image)
    for (r, c), tile in zip(origins, tiles):
        out[r:r + h, c:c + w] = tile
    return out


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= min_area
    keep[0] = False
    return keep[labels]


def _segment_mosaic(mosaic: np.ndarray, origins, h: int, w: int, dna: int, membrane: int | None,
                    others: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(C, Hm, Wm) float mosaic -> (nuclei, cells) int32 label mosaics; a cell carries its nucleus' label."""
    from skimage.segmentation import watershed

    smooth_dna = _smooth(mosaic[dna], origins, h, w)
    fg = smooth_dna > _tile_thresholds(smooth_dna, origins, h, w)
    fg = _remove_small(ndi.binary_fill_holes(fg), MIN_NUCLEUS_AREA)
    components, n_components = ndi.label(fg)
    nuclei = np.zeros(fg.shape, np.int32)
    if n_components:
        dist = ndi.distance_transform_edt(fg)
        # seeds: the distance maxima within (2 * MIN_PEAK_DISTANCE + 1)-px windows, a plateau one seed
        # (scikit-image's peak_local_max loops over the components in Python: 2/3 of the time here)
        size = 2 * MIN_PEAK_DISTANCE + 1
        peaks = fg & (dist >= ndi.maximum_filter(dist, size=size, mode="constant"))
        markers, n_markers = ndi.label(peaks, structure=np.ones((3, 3), bool))
        # every component gets a seed, even one whose maximum lies in a window with a larger neighbour
        seeded = np.zeros(n_components + 1, bool)
        seeded[components[markers > 0]] = True
        unseeded = ~seeded[components] & fg
        markers[unseeded] = n_markers + components[unseeded]
        nuclei = watershed(-dist, markers, mask=fg).astype(np.int32)

    body = mosaic[others].sum(axis=0) if others else mosaic[dna]
    smooth_body = _smooth(body, origins, h, w)
    body_fg = smooth_body > _tile_thresholds(smooth_body, origins, h, w, classes=3)
    cell_fg = ndi.binary_fill_holes(body_fg | (nuclei > 0))
    if membrane is not None:
        landscape = _smooth(mosaic[membrane], origins, h, w)
    else:
        landscape = -smooth_body
    cells = watershed(landscape, nuclei, mask=cell_fg).astype(np.int32) if nuclei.any() else nuclei.copy()

    # discard nuclei touching their tile's border, and their cells
    frame = np.zeros(fg.shape, bool)
    for r, c in origins:
        frame[r:r + h, c:c + w] = True
        frame[r + 1:r + h - 1, c + 1:c + w - 1] = False
    touching = np.unique(nuclei[frame])
    if touching.size:
        drop = np.zeros(int(max(nuclei.max(), cells.max())) + 1, bool)
        drop[touching] = True
        drop[0] = False
        nuclei[drop[nuclei]] = 0
        cells[drop[cells]] = 0
    return nuclei, cells


def segment(images: np.ndarray, channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) -> (nuclei, cells) int32 label images (N, H, W), labels 1..n per crop; the cell
    of nucleus k is label k; cytoplasm = cells where nuclei == 0."""
    images = _check(images, channels)
    n, _, h, w = images.shape
    nuclei = np.zeros((n, h, w), np.int32)
    cells = np.zeros((n, h, w), np.int32)
    dna, membrane, others = _roles(channels)
    for start in range(0, n, BATCH):
        part = images[start:start + BATCH]
        mosaic, origins = _mosaic(part)
        nuc_m, cell_m = _segment_mosaic(mosaic, origins, h, w, dna, membrane, others)
        for k, (r, c) in enumerate(origins):
            nuc, cell = nuc_m[r:r + h, c:c + w], cell_m[r:r + h, c:c + w]
            ids = np.unique(cell[cell > 0])
            lut = np.zeros(int(cell.max()) + 1, np.int32)
            lut[ids] = np.arange(1, len(ids) + 1)
            nuclei[start + k], cells[start + k] = lut[nuc], lut[cell]
    return nuclei, cells


def _mosaic(part: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """uint8 (B, C, H, W) -> float32 (C, Hm, Wm) in [0, 1] with zero gaps, and the tile origins."""
    b, c, h, w = part.shape
    shape, origins = _layout(b, h, w)
    mosaic = np.zeros((c,) + shape, np.float32)
    for k, (r, q) in enumerate(origins):
        mosaic[:, r:r + h, q:q + w] = part[k] / np.float32(255)
    return mosaic, origins


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------

def _functions():
    """cp-measure's core and correlation functions (numba backend where it has one), unsanitised: labels
    are relabelled 1..n here."""
    import cp_measure
    from cp_measure._detect import HAS_NUMBA
    from cp_measure.bulk import get_core_measurements, get_correlation_measurements
    cp_measure.set_accelerator("numba" if HAS_NUMBA else None)
    return get_core_measurements(sanitize=False), get_correlation_measurements(sanitize=False)


@contextlib.contextmanager
def _shared_radial_geometry():
    """Within this block, the three label-geometry calls of cp-measure's get_radial_distribution
    (centrosome's distance_to_edge, color_labels and propagate, ~80% of its time) are memoised on their
    arguments, so measuring every channel of one label image computes the geometry once. The pixels
    enter only afterwards: the values are the library's own (a test compares them)."""
    import centrosome.cpmorphology as morph
    import centrosome.propagate as prop
    originals = morph.distance_to_edge, morph.color_labels, prop.propagate
    cache: list[tuple[str, tuple, object]] = []

    def same(a, b) -> bool:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                    and a.dtype == b.dtype and np.array_equal(a, b))
        return type(a) is type(b) and a == b

    def memo(name, fn):
        def wrapper(*args):
            for key, cached_args, result in cache:
                if key == name and len(cached_args) == len(args) and all(map(same, cached_args, args)):
                    return result
            result = fn(*args)
            cache.append((name, tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args), result))
            return result
        return wrapper

    morph.distance_to_edge = memo("distance_to_edge", originals[0])
    morph.color_labels = memo("color_labels", originals[1])
    prop.propagate = memo("propagate", originals[2])
    try:
        yield
    finally:
        morph.distance_to_edge, morph.color_labels, prop.propagate = originals


def _keep(key: str) -> bool:
    return not any(p in key for p in POSITIONAL)


def _per_tile(fn, lab: np.ndarray, tiles, **kwargs) -> dict[str, np.ndarray]:
    """A shape measurement run on every tile on its own. For Zernike moments: they scale pixel offsets
    by the object's enclosing circle and cut at r > 1, so at round-off level their values depend on
    where the object is in the image (a pixel on the circle flips), i.e. on the crop's mosaic slot."""
    n = int(lab.max())
    out: dict[str, np.ndarray] = {}
    for sl in tiles:
        sub = lab[sl]
        ids = np.unique(sub)
        ids = ids[ids > 0]
        if not ids.size:
            continue
        lut = np.zeros(n + 1, np.int32)
        lut[ids] = np.arange(1, len(ids) + 1)
        for key, v in fn(lut[sub], None, **kwargs).items():
            out.setdefault(key, np.full(n, np.nan))[ids - 1] = v
    return out


def _plan() -> tuple:
    """The measurement settings, passed to worker processes (which import the module's defaults)."""
    return ({k: tuple(v) for k, v in MEASUREMENTS.items()}, {k: dict(v) for k, v in PARAMS.items()},
            tuple(CORRELATIONS))


def _measure_objects(mosaic: np.ndarray, labels: dict[str, np.ndarray], channels: list[str],
                     core: dict, corr: dict, tiles, plan: tuple) -> dict[str, dict[str, np.ndarray]]:
    """Per compartment: {feature name: per-object values} for the contiguous 1..n label mosaics."""
    measurements, params, correlations = plan
    out: dict[str, dict[str, np.ndarray]] = {}
    for comp, lab in labels.items():
        res: dict[str, np.ndarray] = {}
        n = int(lab.max())
        if n == 0:
            out[comp] = res
            continue
        for family in SHAPE_FAMILIES:
            if comp in measurements.get(family, ()):
                kwargs = params.get(family, {})
                values = (_per_tile(core[family], lab, tiles, **kwargs) if family == "zernike"
                          else core[family](lab, None, **kwargs))
                for key, v in values.items():
                    if _keep(key):
                        res[f"{comp}_AreaShape_{key}"] = np.asarray(v, np.float64)
        for family in CHANNEL_FAMILIES:
            if comp not in measurements.get(family, ()):
                continue
            kwargs = params.get(family, {})
            context = _shared_radial_geometry() if family == "radial_distribution" else contextlib.nullcontext()
            with context:
                for ci, ch in enumerate(channels):
                    for key, v in core[family](lab, mosaic[ci], **kwargs).items():
                        if _keep(key):
                            prefix = "Texture_" if family == "texture" else ""
                            res[f"{comp}_{prefix}{key}_{ch}"] = np.asarray(v, np.float64)
        if comp in measurements.get("correlation", ()):
            for i in range(len(channels)):
                for j in range(i + 1, len(channels)):
                    for name in correlations:
                        for key, v in corr[name](mosaic[i], mosaic[j], lab).items():
                            res[f"{comp}_{key}_{channels[i]}_{channels[j]}"] = np.asarray(v, np.float64)
        out[comp] = res
    return out


def _crop_medians(values: dict[str, np.ndarray], crop_of: np.ndarray, n_crops: int,
                  names: list[str]) -> np.ndarray:
    """(n_crops, len(names)) medians over each crop's objects; NaN for a crop without objects."""
    out = np.full((n_crops, len(names)), np.nan)
    if not values or crop_of.size == 0:
        return out
    table = np.stack([values[k] for k in names], axis=1)
    order = np.argsort(crop_of, kind="stable")
    bounds = np.searchsorted(crop_of[order], np.arange(n_crops + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns of one crop stay NaN
        for k in range(n_crops):
            rows = order[bounds[k]:bounds[k + 1]]
            if rows.size:
                out[k] = np.nanmedian(table[rows], axis=0)
    return out


def _relabel(mosaic_labels: np.ndarray, tile_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels -> contiguous 1..n, and each object's tile."""
    ids = np.unique(mosaic_labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(mosaic_labels.max()) + 1 if mosaic_labels.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    relabelled = lut[mosaic_labels]
    crop_of = np.zeros(len(ids) + 1, np.int64)
    crop_of[relabelled.ravel()] = tile_of.ravel()
    return relabelled, crop_of[1:]


def feature_names(channels: Sequence[str]) -> list[str]:
    """The columns `cellprofiler_features` returns for these channel names, in order (those the
    measurements produce on a probe crop holding one nucleus in one cell)."""
    return list(_feature_names(tuple(str(c) for c in channels), repr(_plan())))


@functools.lru_cache(maxsize=8)
def _feature_names(channels: tuple[str, ...], plan: str) -> tuple[str, ...]:
    yy, xx = np.mgrid[:64, :64]
    probe = np.zeros((1, len(channels), 64, 64), np.uint8)
    for i in range(len(channels)):
        probe[0, i] = 40
    dna, _, _ = _roles(channels)
    disc = (yy - 32) ** 2 + (xx - 32) ** 2
    probe[0, dna] = np.where(disc <= 36, 200, 10)
    for i in range(len(channels)):
        if i != dna:
            probe[0, i] = np.where(disc <= 144, 120 + (xx % 3) * 20 + i, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(_measure_batch(probe, list(channels))[1])


def _measure_batch(part: np.ndarray, channels: list[str], plan: tuple | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """uint8 (B, C, H, W) -> (B, F) features, names: one mosaic."""
    core, corr = _functions()
    b, _, h, w = part.shape
    mosaic, origins = _mosaic(part)
    dna, membrane, others = _roles(channels)
    nuclei, cells = _segment_mosaic(mosaic, origins, h, w, dna, membrane, others)
    tile_of = np.full(nuclei.shape, -1, np.int64)
    for k, (r, c) in enumerate(origins):
        tile_of[r:r + h, c:c + w] = k
    cytoplasm = np.where(nuclei > 0, 0, cells)
    image = np.where(cells > 0, tile_of + 1, 0)
    labels, crops = {}, {}
    for comp, lab in zip(COMPARTMENTS, (nuclei, cells, cytoplasm, image)):
        labels[comp], crops[comp] = _relabel(lab, tile_of)
    tiles = [(slice(r, r + h), slice(c, c + w)) for r, c in origins]
    per_object = _measure_objects(mosaic, labels, channels, core, corr, tiles, plan or _plan())
    names = ["Count_Nuclei"]
    blocks = [np.bincount(crops["Nuclei"], minlength=b)[:, None].astype(np.float64)]
    for comp in COMPARTMENTS:
        keys = list(per_object[comp])
        names += keys
        blocks.append(_crop_medians(per_object[comp], crops[comp], b, keys))
    return np.concatenate(blocks, axis=1), names


def _check(images: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if len(channels) != images.shape[1]:
        raise ValueError(f"{len(channels)} channel names for {images.shape[1]} channels")
    if len(set(map(str, channels))) != len(channels):
        raise ValueError(f"channel names must be unique, got {list(channels)}")
    return images


def _measure_chunk(args) -> np.ndarray:
    """Worker entry point: one chunk of crops -> features in the canonical column order."""
    part, channels, names, plan = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats, got = _measure_batch(part, channels, plan)
    out = np.full((len(part), len(names)), np.nan)
    index = {n: i for i, n in enumerate(got)}
    cols = [index.get(n, -1) for n in names]
    present = [i for i, c in enumerate(cols) if c >= 0]
    out[:, present] = feats[:, [cols[i] for i in present]]
    return out


def _worker_init() -> None:
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)


def cellprofiler_features(images: np.ndarray, channels: Sequence[str], *,
                          workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, C, H, W) crops -> (features (N, F) float32, names). Medians over each crop's objects
    of every measurement (names `<Compartment>_<Family>_<Feature>_<Channel>`, e.g.
    `Nuclei_Intensity_MeanIntensity_DNA`) and Count_Nuclei; NaN where a crop has no object of a
    compartment (or a measurement is undefined for all of them). `workers` > 1 measures chunks in a pool
    of spawn processes (same values)."""
    images = _check(images, channels)
    channels = [str(c) for c in channels]
    names = feature_names(channels)
    plan = _plan()
    chunks = [(images[i:i + BATCH], channels, names, plan) for i in range(0, len(images), BATCH)]
    workers = workers_lib.pool_size(workers, len(chunks))
    if workers > 1:
        with workers_lib.spawn_pool(workers, _worker_init) as pool:
            parts = list(pool.map(_measure_chunk, chunks))
    else:
        parts = [_measure_chunk(c) for c in chunks]
    feats = np.concatenate(parts) if parts else np.zeros((0, len(names)))
    return feats.astype(np.float32), names


# ----------------------------------------------------------------------------------------------------
# Feature selection (pycytominer's feature_select operations) and the screen
# ----------------------------------------------------------------------------------------------------

def select_features(x: np.ndarray, names: Sequence[str], *, na_cutoff: float = 0.05,
                    freq_cut: float = 0.05, unique_cut: float = 0.01,
                    corr_threshold: float = 0.9) -> tuple[np.ndarray, list[str]]:
    """pycytominer's `feature_select(operation=["drop_na_columns", "variance_threshold",
    "correlation_threshold"])`, re-implemented on a (N, F) matrix:

    1. drop_na_columns: drop columns with more than `na_cutoff` NaN, counted over the rows with at most
       half their columns NaN (a crop without objects is missing as a whole, Count_Nuclei aside, and
       must not condemn every column); then every remaining NaN is imputed with its column median;
    2. variance_threshold: drop a column if the count of its second most frequent value over the count
       of its most frequent is below `freq_cut`, or its number of distinct values over N is below
       `unique_cut` (both pycytominer's tests; a constant column fails both);
    3. correlation_threshold: for every pair of features with Pearson r > `corr_threshold` (signed, as
       pycytominer), drop the one with the higher total absolute correlation to all features (ties: the
       later column); the union over all pairs is dropped at once.
    Returns (x float32, names) of the kept columns."""
    x = np.asarray(x, np.float64)
    names = list(names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"x must be (N, {len(names)}), got {x.shape}")
    n = len(x)
    rows = np.isnan(x).mean(axis=1) <= 0.5 if x.shape[1] else np.zeros(n, bool)
    counted = x[rows] if rows.any() else x
    keep = np.isnan(counted).mean(axis=0) <= na_cutoff if len(counted) else np.ones(x.shape[1], bool)
    x, names = x[:, keep], [nm for nm, k in zip(names, keep) if k]
    if x.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(x, axis=0)
        med = np.where(np.isnan(med), 0.0, med)
        x = np.where(np.isnan(x), med, x)

    keep = np.zeros(x.shape[1], bool)
    for j in range(x.shape[1]):
        _, counts = np.unique(x[:, j], return_counts=True)
        if len(counts) < 2:
            continue
        top2 = np.sort(counts)[-2:]
        keep[j] = top2[0] / top2[1] >= freq_cut and len(counts) / n >= unique_cut
    x, names = x[:, keep], [nm for nm, k in zip(names, keep) if k]

    if x.shape[1] > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.nan_to_num(np.corrcoef(x, rowvar=False))
        rank = np.empty(x.shape[1], np.int64)          # by total |r| to every feature, ties by column
        rank[np.argsort(np.abs(r).sum(axis=0), kind="stable")] = np.arange(x.shape[1])
        i, j = np.nonzero(np.tril(r > corr_threshold, k=-1))
        keep = np.ones(x.shape[1], bool)
        keep[np.where(rank[i] > rank[j], i, j)] = False
        x, names = x[:, keep], [nm for nm, k in zip(names, keep) if k]
    return x.astype(np.float32), names


def standardize(x: np.ndarray) -> np.ndarray:
    """pycytominer's `normalize(method="standardize", samples="all")`: every column to mean 0, std 1
    (a constant column to 0)."""
    x = np.asarray(x, np.float64)
    sd = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def crops_per_well(meta: pd.DataFrame, max_crops_per_well: int | None) -> np.ndarray:
    """Row indices of the first `max_crops_per_well` crops of every well, in record order (all rows when
    None)."""
    if max_crops_per_well is None:
        return np.arange(len(meta))
    if max_crops_per_well < 1:
        raise ValueError(f"max_crops_per_well must be >= 1 or None, got {max_crops_per_well}")
    rank = meta.groupby(["experiment", "plate", "well"], sort=False).cumcount().to_numpy()
    return np.flatnonzero(rank < max_crops_per_well)


def cellprofiler_screen(dataset_dir: str, max_crops_per_well: int | None = DEFAULT_CROPS_PER_WELL, *,
                        workers: int = WORKERS, select: bool = True,
                        ) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """The screen's crops (the first `max_crops_per_well` of each well; None: all) -> (features (N, F)
    float32, their metadata rows, names). With `select`, the pycytominer steps on the whole matrix:
    `select_features`, then `standardize`."""
    from maejax.input_pipeline import open_dataset
    ds = open_dataset(dataset_dir)
    rows = crops_per_well(ds.metadata, max_crops_per_well)
    images = ds.reader.read_many(ds.metadata["record_id"].to_numpy()[rows]) if len(rows) else \
        np.zeros((0,) + tuple(ds.crop_shape), np.uint8)
    feats, names = cellprofiler_features(images, ds.channels, workers=workers)
    if select:
        feats, names = select_features(feats, names)
        feats = standardize(feats)
    return feats, ds.metadata.iloc[rows].reset_index(drop=True), names


def _main(argv=None) -> None:
    """python -m eval.cellprofiler --dataset DIR [--crops_per_well K] [--workers W]: measure and time."""
    import time

    from maejax import flags
    p = flags.ArgumentParser(description=_main.__doc__)
    p.add_argument("--dataset", required=True, metavar="DIR", help="dataset directory")
    p.add_argument("--crops_per_well", type=int, default=DEFAULT_CROPS_PER_WELL, help="0 = every crop")
    p.add_argument("--workers", type=int, default=WORKERS)
    a = p.parse_args(argv)
    t = time.perf_counter()
    feats, meta, names = cellprofiler_screen(a.dataset, a.crops_per_well or None, workers=a.workers)
    dt = time.perf_counter() - t
    print(f"{len(meta)} crops in {dt:.1f} s = {len(meta) / dt:.1f} crops/s; {len(names)} features kept")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _main()
