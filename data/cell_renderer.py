"""Vectorised rendering of Cell-Painting-like fluorescence images of cultured cells.

Each cell is a wobbly ellipse (its body) holding an eccentric wobbly ellipse (its nucleus). Cells sit on
a jittered grid or in colonies, oriented along a common axis or not, some in another state (a
subpopulation). Per cell we evaluate nine compartment maps on a small window around it -- DNA content,
nucleus mask, nuclear envelope, cell mask, perinuclear cytoplasm, plasma membrane, and three stain
densities with a fixed total per cell (Golgi crescent, mitochondria, diffuse RNA), so that relocalising
them keeps each cell's total intensity -- and add the windows into per-site canvases. Stains are then
mixed from the compartments and site-wide noise textures, pairs of which are correlated to set the
co-localisation of two stains:

    DNA    nuclei with chromatin texture and bright chromocentres
    ER     reticulate texture dense around the nucleus, fading outwards, plus the nuclear envelope
    RNA    nucleoli inside the nucleus plus diffuse cytoplasmic RNA
    AGP    actin cortex / plasma membrane outlining each cell
    Mito   puncta in the cytoplasm, denser near the nucleus
    Golgi  a compact crescent beside the nucleus, faint membrane

Everything is per-site parameters in, float images out (roughly 0..1.5): acquisition (gain,
illumination, noise, quantisation) is the caller's business.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

STAINS = ("DNA", "ER", "RNA", "AGP", "Mito", "Golgi")
EDGE_PX = 1.2  # width of the soft edge of nuclei and cells
BLOCK_CELLS = 64  # cells rendered per vectorised batch


def stain_names(num_channels: int) -> list[str]:
    """The first `num_channels` stains; beyond six they repeat as `<stain>_2`, `<stain>_3`, ..."""
    return [STAINS[i % len(STAINS)] + (f"_{i // len(STAINS) + 1}" if i >= len(STAINS) else "")
            for i in range(num_channels)]


@dataclasses.dataclass(frozen=True)
class SitePhenotypes:
    """What cells look like at each site; every field is an array with one entry per site."""
    cell_density: np.ndarray        # expected cells per 10,000 px^2
    nucleus_radius: np.ndarray      # px (geometric mean of the semi-axes)
    nucleus_elongation: np.ndarray  # major / minor axis, >= 1
    cell_radius: np.ndarray         # px
    cell_elongation: np.ndarray
    mitotic_fraction: np.ndarray    # rounded cells with small, condensed, bright nuclei
    dna_texture: np.ndarray         # chromatin texture amplitude
    er_texture: np.ndarray          # ER reticulation amplitude
    er_spread: np.ndarray           # px: how far perinuclear stains reach into the cytoplasm
    nucleoli: np.ndarray            # nucleolar abundance (~0.2 few .. ~1.5 many)
    mito_puncta: np.ndarray         # mitochondrial puncta abundance (same scale)
    golgi_dispersal: np.ndarray     # 1 = compact ribbon, larger = fragmented and spread
    membrane: np.ndarray            # plasma-membrane stain strength
    # Relocalisation at constant total stain per cell.
    rna_nuclear_fraction: np.ndarray  # share of the diffuse RNA stain inside the nucleus (rest: cytoplasm)
    mito_spread: np.ndarray         # px: decay length of mitochondria away from the nucleus
    # Subpopulation: this fraction of cells is in another state whose log nucleus size, log DNA content
    # and log cell size differ by subpop_* / subpop_fraction, so that the mean over all cells moves by
    # exactly subpop_* (the same well mean as a uniform shift of that size).
    subpop_fraction: np.ndarray
    subpop_nucleus: np.ndarray
    subpop_dna: np.ndarray
    subpop_cell: np.ndarray
    # Spatial organisation, each in [0, 1]: share of cells placed in colonies (the rest on a jittered
    # grid), share of cells oriented along the site's common axis, share of cells whose Golgi faces
    # their nearest neighbour.
    clustering: np.ndarray
    alignment: np.ndarray
    polarity: np.ndarray
    # Cross-channel co-localisation: correlation in [-1, 1] of two stains' texture fields (means unchanged).
    coloc_mito_er: np.ndarray
    coloc_rna_dna: np.ndarray
    coloc_golgi_agp: np.ndarray

    def __len__(self) -> int:
        return len(self.cell_density)


@dataclasses.dataclass(frozen=True)
class Cells:
    """Sampled cells, one entry per cell (struct of arrays)."""
    site: np.ndarray
    x: np.ndarray
    y: np.ndarray
    fields: dict[str, np.ndarray]  # shape and appearance parameters, see `sample_cells`


def sample_cells(pheno: SitePhenotypes, size: int, rng: np.random.Generator) -> Cells:
    """Places cells (a jittered grid, like a monolayer, mixed with colonies by `clustering`) and draws
    their shapes, states and orientations."""
    sites, xs, ys = [], [], []
    for s in range(len(pheno)):
        spacing = 1.7 * pheno.cell_radius[s]
        # Candidates extend past the border so cells are cut by the field of view, as in real images.
        grid = np.arange(-spacing / 2, size + spacing / 2, spacing)
        gx, gy = np.meshgrid(grid, grid)
        extent = grid[-1] - grid[0] + spacing
        expected = pheno.cell_density[s] * 1e-4 * extent ** 2
        n = min(rng.poisson(expected), gx.size)
        colony = rng.random(n) < pheno.clustering[s]
        n_grid = int(n - colony.sum())
        keep = rng.choice(gx.size, size=n_grid, replace=False)
        jitter = rng.uniform(-0.3, 0.3, size=(2, n_grid)) * spacing
        x = np.empty(n)
        y = np.empty(n)
        x[~colony] = gx.ravel()[keep] + jitter[0]
        y[~colony] = gy.ravel()[keep] + jitter[1]
        # Colonies: centres uniform over the field, about 6 cells each, cells packed around the centre.
        m = int(colony.sum())
        if m:
            centres = rng.uniform(grid[0], grid[-1] + spacing, size=(max(1, round(m / 6)), 2))
            which = rng.integers(0, len(centres), m)
            radius = spacing * np.sqrt(rng.uniform(0, 1.6, m))
            angle = rng.uniform(0, 2 * np.pi, m)
            x[colony] = centres[which, 0] + radius * np.cos(angle)
            y[colony] = centres[which, 1] + radius * np.sin(angle)
        xs.append(x)
        ys.append(y)
        sites.append(np.full(n, s))
    site = np.concatenate(sites)
    x, y = np.concatenate(xs), np.concatenate(ys)
    n = len(site)

    def per_site(values, sd=0.0):
        return (values[site] * np.exp(rng.normal(0.0, sd, n))).astype(np.float32)

    mitotic = rng.random(n) < pheno.mitotic_fraction[site]
    # The subpopulation's state, and its size: the all-cell mean of each log quantity moves by subpop_*.
    frac = np.maximum(pheno.subpop_fraction[site], 1e-3)
    other = (rng.random(n) < pheno.subpop_fraction[site]) & ~mitotic
    state = lambda v: np.exp(np.where(other, np.clip(v[site] / frac, -1.2, 1.2), 0.0))
    nucleus_radius = per_site(pheno.nucleus_radius, 0.12) * np.where(mitotic, 0.7, 1.0) * state(pheno.subpop_nucleus)
    nucleus_elong = np.where(mitotic, 1.0, np.maximum(per_site(pheno.nucleus_elongation, 0.1), 1.0))
    cell_radius = per_site(pheno.cell_radius, 0.12) * np.where(mitotic, 0.7, 1.0) * state(pheno.subpop_cell)
    cell_radius = np.maximum(cell_radius, 1.25 * nucleus_radius * np.sqrt(nucleus_elong))
    cell_elong = np.where(mitotic, 1.0, np.maximum(per_site(pheno.cell_elongation, 0.15), 1.0))
    # Orientation: `alignment` of the cells follow their site's common axis, the rest point anywhere.
    axis = rng.uniform(0, np.pi, len(pheno))[site]
    aligned = rng.random(n) < pheno.alignment[site]
    nucleus_angle = np.where(aligned, axis + rng.normal(0, 0.25, n), rng.uniform(0, np.pi, n))
    # Polarity: `polarity` of the cells turn their Golgi towards their nearest neighbour.
    golgi_angle = rng.uniform(0, 2 * np.pi, n)
    polar = rng.random(n) < pheno.polarity[site]
    if polar.any():
        toward = _nearest_neighbour_angle(site, x, y)
        golgi_angle = np.where(polar & np.isfinite(toward), np.nan_to_num(toward) + rng.normal(0, 0.3, n),
                               golgi_angle)
    shift = rng.uniform(0, 0.25, n) * cell_radius
    shift_angle = rng.uniform(0, 2 * np.pi, n)
    fields = {
        "nucleus_a": nucleus_radius * np.sqrt(nucleus_elong),
        "nucleus_b": nucleus_radius / np.sqrt(nucleus_elong),
        "nucleus_angle": nucleus_angle,
        "nucleus_wobble": rng.uniform(0, [0.08, 0.05], (n, 2)) * np.where(mitotic, 0.2, 1.0)[:, None],
        "cell_a": cell_radius * np.sqrt(cell_elong),
        "cell_b": cell_radius / np.sqrt(cell_elong),
        "cell_angle": nucleus_angle + rng.normal(0, 0.4, n),
        "cell_wobble": rng.uniform(0, [0.12, 0.09, 0.06], (n, 3)) * np.where(mitotic, 0.2, 1.0)[:, None],
        "wobble_phase": rng.uniform(0, 2 * np.pi, (n, 5)),
        # The nucleus sits off-centre in the cell: the cell centre is offset from the nucleus centre.
        "cell_dx": shift * np.cos(shift_angle),
        "cell_dy": shift * np.sin(shift_angle),
        "dna": np.exp(rng.normal(0, 0.12, n)) * np.where(mitotic, 2.0, 1.0) * state(pheno.subpop_dna),
        "cyto": np.exp(rng.normal(0, 0.15, n)),
        "er_spread": per_site(pheno.er_spread, 0.1),
        "mito_spread": per_site(pheno.mito_spread, 0.1),
        "rna_nuclear": np.clip(pheno.rna_nuclear_fraction[site] + rng.normal(0, 0.03, n), 0.02, 0.98),
        "golgi_angle": golgi_angle,
        "golgi_width": np.clip(0.75 * per_site(pheno.golgi_dispersal, 0.15), 0.3, 2.5),
        "golgi_thickness": 1.3 * per_site(pheno.golgi_dispersal, 0.1),
    }
    fields = {k: np.asarray(v, np.float32) for k, v in fields.items()}
    return Cells(site=site, x=x, y=y, fields=fields)


def _nearest_neighbour_angle(site: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per cell, the direction (radians) to the nearest other cell of its site (NaN when alone)."""
    from scipy.spatial import cKDTree
    out = np.full(len(site), np.nan)
    for s in np.unique(site):
        idx = np.flatnonzero(site == s)
        if len(idx) < 2:
            continue
        pts = np.stack([x[idx], y[idx]], axis=1)
        _, nn = cKDTree(pts).query(pts, k=2)
        d = pts[nn[:, 1]] - pts
        out[idx] = np.arctan2(d[:, 1], d[:, 0])
    return out


COMPARTMENTS = ("dna", "nucleus", "envelope", "cell", "perinuclear", "membrane", "golgi", "mito", "rna")
# Masks and shells: overlapping cells do not stack up brighter than one cell. The other maps are stain
# densities normalised per cell (constant totals), which add up where cells overlap.
_CLIPPED = [COMPARTMENTS.index(k) for k in ("nucleus", "envelope", "cell", "perinuclear", "membrane")]


def render_compartments(cells: Cells, num_sites: int, size: int) -> np.ndarray:
    """(num_sites, len(COMPARTMENTS), size, size) float32 maps, cells added into their sites."""
    if not len(cells.site):
        return np.zeros((num_sites, len(COMPARTMENTS), size, size), np.float32)
    f = cells.fields
    # Window half-width that holds the whole cell (wobble, off-centre nucleus and soft edge included),
    # rounded up to an even number so that cells of similar size are rendered together in one batch.
    extent = (np.maximum(f["cell_a"], f["cell_b"]) * (1 + f["cell_wobble"].sum(axis=1))
              + np.hypot(f["cell_dx"], f["cell_dy"]) + 2.5)
    radii = 2 * np.ceil(extent / 2).astype(int)
    ix, iy = np.floor(cells.x).astype(int), np.floor(cells.y).astype(int)
    overhang = np.maximum.reduce([np.zeros_like(ix), -ix, -iy, ix - size, iy - size])
    margin = int((radii + overhang).max()) + 1  # canvas padding that every window fits in
    canvas = np.zeros((num_sites, len(COMPARTMENTS), size + 2 * margin, size + 2 * margin), np.float32)
    same_size = [np.flatnonzero(radii == r) for r in np.unique(radii)]
    # Batches of at most BLOCK_CELLS keep the temporaries of the per-pixel maths in cache.
    for members in (m[i:i + BLOCK_CELLS] for m in same_size for i in range(0, len(m), BLOCK_CELLS)):
        radius = int(radii[members[0]])
        windows = _cell_windows(cells, members, radius)
        width = 2 * radius + 1
        # Adding window by window is ~3x faster than one np.bincount scatter for these window sizes.
        for k, i in enumerate(members):
            y0, x0 = iy[i] + margin - radius, ix[i] + margin - radius
            canvas[cells.site[i], :, y0:y0 + width, x0:x0 + width] += windows[k]
    canvas = canvas[:, :, margin:margin + size, margin:margin + size]
    canvas[:, _CLIPPED] = np.minimum(canvas[:, _CLIPPED], 1.0)
    return canvas


def _cell_windows(cells: Cells, members: np.ndarray, radius: int) -> np.ndarray:
    """(len(members), len(COMPARTMENTS), 2 radius + 1, 2 radius + 1) maps around each member cell."""
    f = {k: v[members] for k, v in cells.fields.items()}
    x, y = cells.x[members], cells.y[members]
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    # Pixel coordinates relative to each nucleus centre: (n, P, 1) and (n, 1, P).
    dy = (offsets[None, :] - (y - np.floor(y)).astype(np.float32)[:, None])[:, :, None]
    dx = (offsets[None, :] - (x - np.floor(x)).astype(np.float32)[:, None])[:, None, :]

    def col(v):
        return v[:, None, None]

    phase = f["wobble_phase"]
    rho_n, cos_n, sin_n = _elliptic_radius(dx, dy, col(f["nucleus_a"]), col(f["nucleus_b"]),
                                           col(f["nucleus_angle"]))
    rho_n = rho_n / _wobble(cos_n, sin_n, f["nucleus_wobble"], phase[:, :2], harmonics=(2, 3))
    rho_c, cos_c, sin_c = _elliptic_radius(dx - col(f["cell_dx"]), dy - col(f["cell_dy"]),
                                           col(f["cell_a"]), col(f["cell_b"]), col(f["cell_angle"]))
    rho_c = rho_c / _wobble(cos_c, sin_c, f["cell_wobble"], phase[:, 2:], harmonics=(2, 3, 4))
    nucleus_b, cell_b = col(f["nucleus_b"]), col(f["cell_b"])

    out = np.empty((len(members), len(COMPARTMENTS)) + rho_n.shape[1:], np.float32)
    dna, nucleus, envelope, cell, perinuclear, membrane, golgi, mito, rna = (out[:, k] for k in range(len(COMPARTMENTS)))
    nucleus[:] = _smoothstep((1 - rho_n) * nucleus_b / EDGE_PX + 0.5)
    cell[:] = _smoothstep((1 - rho_c) * cell_b / EDGE_PX + 0.5)
    px_out_of_nucleus = np.maximum(rho_n - 1, 0) * nucleus_b
    perinuclear[:] = cell * (1 - nucleus) * np.exp(-px_out_of_nucleus / col(f["er_spread"]))
    envelope[:] = _bump((rho_n - 1) * nucleus_b / 0.9)
    membrane[:] = _bump((rho_c - 1) * cell_b / 1.1)
    # Golgi: a crescent hugging the nucleus on one side (angle measured in the nucleus frame).
    toward = cos_n * col(np.cos(f["golgi_angle"])) + sin_n * col(np.sin(f["golgi_angle"]))
    arc = _bump((1 - toward) / (1 - np.cos(col(f["golgi_width"]))))
    golgi[:] = arc * _bump((px_out_of_nucleus - 1.4) / col(f["golgi_thickness"])) * cell
    dna[:] = nucleus * (1 - 0.25 * np.minimum(rho_n, 1) ** 2) * col(f["dna"])
    # Stain densities with a fixed total per cell, so that relocalising them changes no total intensity.
    cytoplasm = cell * (1 - nucleus)
    cyto_area = _total(cytoplasm)
    mito[:] = cytoplasm * np.exp(-px_out_of_nucleus / col(f["mito_spread"]))
    mito *= 0.5 * cyto_area / _total(mito)
    golgi *= 10.0 / _total(golgi)
    frac = col(f["rna_nuclear"])
    rna_total = 0.15 * _total(cell)
    rna[:] = rna_total * (frac * nucleus / _total(nucleus) + (1 - frac) * cytoplasm / cyto_area)
    cyto = col(f["cyto"])
    for stain in (cell, perinuclear, golgi, mito, rna):
        stain *= cyto
    return out


def _total(maps: np.ndarray) -> np.ndarray:
    """Per-window sums (n, 1, 1), never zero."""
    return np.maximum(maps.sum(axis=(1, 2), keepdims=True), 1e-3)


def mix_stains(compartments: np.ndarray, pheno: SitePhenotypes, num_channels: int,
               rng: np.random.Generator) -> np.ndarray:
    """(n, K, S, S) compartments -> (n, num_channels, S, S) float32 stain images."""
    n, _, size, _ = compartments.shape
    dna, nucleus, envelope, cell, perinuclear, membrane, golgi, mito, rna = np.moveaxis(compartments, 1, 0)
    fine_a, fine_b, fine_c = _texture(rng, (3, n, size, size), sigma=0.7)
    medium_a, medium_b, medium_c, medium_d = _texture(rng, (4, n, size, size), sigma=1.4)

    def site(v):
        return np.asarray(v, np.float32)[:, None, None]

    def mix(shared, own, rho):
        """A unit-variance field whose correlation with `shared` is rho (its mean is unchanged)."""
        rho = np.clip(site(rho), -0.99, 0.99)
        return rho * shared + np.sqrt(1 - rho * rho) * own

    er_field = fine_b
    mito_field = mix(er_field, fine_c, pheno.coloc_mito_er)       # mitochondria along the ER
    dna_field = medium_b
    nucleoli_field = mix(dna_field, medium_a, pheno.coloc_rna_dna)  # nucleoli at chromatin texture
    agp_field = medium_c
    golgi_field = mix(agp_field, medium_d, pheno.coloc_golgi_agp)
    nucleoli = np.maximum(nucleoli_field - (1.6 - site(pheno.nucleoli)), 0)
    chromocentres = np.maximum(fine_a - 1.8, 0)
    stains = {
        "DNA": dna * (1 + site(pheno.dna_texture) * 0.3 * dna_field) + 0.5 * nucleus * chromocentres,
        "ER": perinuclear * (0.4 + site(pheno.er_texture) * np.maximum(er_field, 0))
              + 0.45 * envelope + 0.06 * cell,
        "RNA": nucleus * 1.2 * nucleoli + rna,
        "AGP": site(pheno.membrane) * membrane + cell * (0.2 + 0.07 * agp_field),
        "Mito": mito * (0.2 + 2.0 * np.maximum(mito_field - (1.6 - site(pheno.mito_puncta)), 0)) + 0.04 * cell,
        "Golgi": golgi * (0.8 + 0.25 * golgi_field) + 0.12 * membrane + 0.03 * cell,
    }
    images = np.stack([stains[STAINS[c % len(STAINS)]] for c in range(num_channels)], axis=1)
    return np.maximum(images, 0).astype(np.float32)


def _elliptic_radius(dx, dy, a, b, angle):
    """Normalised radius (1 on the ellipse) and cos/sin of the polar angle in the ellipse's frame."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dx * c + dy * s) / a, (dy * c - dx * s) / b
    rho = np.sqrt(u * u + v * v) + 1e-6
    return rho, u / rho, v / rho


def _wobble(cos, sin, amplitudes, phases, harmonics):
    """1 + sum_k a_k cos(k (theta - phase_k)), from cos/sin of theta (no trigonometry per pixel)."""
    # (cos, sin) of k * theta for k = 1..max(harmonics), by the angle-addition formula.
    powers = [(cos, sin)]
    while len(powers) < max(harmonics):
        c, s = powers[-1]
        powers.append((c * cos - s * sin, s * cos + c * sin))
    out = 1.0
    for j, k in enumerate(harmonics):
        a = amplitudes[:, j][:, None, None]
        p = phases[:, j][:, None, None]
        c, s = powers[k - 1]
        out = out + (a * np.cos(k * p)) * c + (a * np.sin(k * p)) * s
    return out


def _smoothstep(t):
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _bump(t):
    """Smooth compact bump: 1 at 0, 0 beyond |t| >= 1."""
    return np.maximum(1 - t * t, 0) ** 2


def _texture(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit variance, smoothed over the last two axes."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, (0,) * (len(shape) - 2) + (sigma, sigma), mode="wrap")
    # Variance of white noise smoothed by a 2-D Gaussian of std sigma: 1 / (4 pi sigma^2).
    return smooth * np.float32(np.sqrt(4 * np.pi) * sigma)


# Image-quality artefacts. A crop's `qc` metadata value is one of these; the index is its code.
QC_LABELS = ("ok", "blur", "saturation", "debris", "empty")


def add_artifact(signal: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Spoils one crop of fluorescence signal in place: float (C, h, w) in uint8 units, before the
    background offset and the noise, so a spoiled crop keeps the read and shot noise of its site.

      blur        out of focus: Gaussian blur of 1.5-3 px
      saturation  over-exposure: signal x 4-8, so bright structures clip at 255 when quantised
      debris      an autofluorescent particle: a bright, sharp-edged ellipse over 10-25% of the crop
                  width, in every channel
      empty       a field without cells: background and noise only
    """
    c, h, w = signal.shape
    if kind == "blur":
        sigma = rng.uniform(1.5, 3.0)
        signal[:] = ndimage.gaussian_filter(signal, (0, sigma, sigma), mode="reflect")
    elif kind == "saturation":
        signal *= np.float32(rng.uniform(4.0, 8.0))
    elif kind == "debris":
        radius = rng.uniform(0.1, 0.25) * min(h, w)
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        rho, _, _ = _elliptic_radius(np.arange(w, dtype=np.float32)[None, :] - cx,
                                     np.arange(h, dtype=np.float32)[:, None] - cy,
                                     radius * rng.uniform(1.0, 1.6), radius, rng.uniform(0, np.pi))
        blob = np.exp(-rho ** 6).astype(np.float32)          # flat top, sharp edge
        signal += rng.uniform(80.0, 220.0, c).astype(np.float32)[:, None, None] * blob
    elif kind == "empty":
        signal[:] = 0.0
    elif kind != "ok":
        raise ValueError(f"unknown image artefact {kind!r}; choose one of {QC_LABELS}")
