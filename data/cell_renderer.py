"""Vectorised rendering of Cell-Painting-like fluorescence images of cultured cells.

Each cell is a wobbly ellipse (its body) holding an eccentric wobbly ellipse (its nucleus). Per cell we
evaluate seven compartment maps on a small window around it -- DNA content, nucleus mask, nuclear
envelope, cell mask, perinuclear cytoplasm, plasma membrane, Golgi crescent -- and add the windows into
per-site canvases. Stains are then mixed from the compartments and site-wide noise textures:

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
    """Places cells on a jittered grid (so they tile like a monolayer) and draws their shapes."""
    sites, xs, ys = [], [], []
    for s in range(len(pheno)):
        spacing = 1.9 * pheno.cell_radius[s]
        # Candidates extend past the border so cells are cut by the field of view, as in real images.
        grid = np.arange(-spacing / 2, size + spacing / 2, spacing)
        gx, gy = np.meshgrid(grid, grid)
        expected = pheno.cell_density[s] * 1e-4 * (grid[-1] - grid[0] + spacing) ** 2
        n = min(rng.poisson(expected), gx.size)
        keep = rng.choice(gx.size, size=n, replace=False)
        jitter = rng.uniform(-0.3, 0.3, size=(2, n)) * spacing
        xs.append(gx.ravel()[keep] + jitter[0])
        ys.append(gy.ravel()[keep] + jitter[1])
        sites.append(np.full(n, s))
    site = np.concatenate(sites)
    n = len(site)

    def per_site(values, sd=0.0):
        return (values[site] * np.exp(rng.normal(0.0, sd, n))).astype(np.float32)

    mitotic = rng.random(n) < pheno.mitotic_fraction[site]
    nucleus_radius = per_site(pheno.nucleus_radius, 0.12) * np.where(mitotic, 0.7, 1.0)
    nucleus_elong = np.where(mitotic, 1.0, np.maximum(per_site(pheno.nucleus_elongation, 0.1), 1.0))
    cell_radius = per_site(pheno.cell_radius, 0.12) * np.where(mitotic, 0.7, 1.0)
    cell_radius = np.maximum(cell_radius, 1.25 * nucleus_radius * np.sqrt(nucleus_elong))
    cell_elong = np.where(mitotic, 1.0, np.maximum(per_site(pheno.cell_elongation, 0.15), 1.0))
    nucleus_angle = rng.uniform(0, np.pi, n)
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
        "dna": np.exp(rng.normal(0, 0.12, n)) * np.where(mitotic, 2.0, 1.0),
        "cyto": np.exp(rng.normal(0, 0.15, n)),
        "er_spread": per_site(pheno.er_spread, 0.1),
        "golgi_angle": rng.uniform(0, 2 * np.pi, n),
        "golgi_width": np.clip(0.75 * per_site(pheno.golgi_dispersal, 0.15), 0.3, 2.5),
        "golgi_thickness": 1.3 * per_site(pheno.golgi_dispersal, 0.1),
    }
    fields = {k: np.asarray(v, np.float32) for k, v in fields.items()}
    return Cells(site=site, x=np.concatenate(xs), y=np.concatenate(ys), fields=fields)


COMPARTMENTS = ("dna", "nucleus", "envelope", "cell", "perinuclear", "membrane", "golgi")


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
    # Overlapping cells do not stack up brighter than one cell's worth of stain.
    canvas[:, 1:] = np.minimum(canvas[:, 1:], 1.0)
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
    dna, nucleus, envelope, cell, perinuclear, membrane, golgi = (out[:, k] for k in range(len(COMPARTMENTS)))
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
    cyto = col(f["cyto"])
    cell *= cyto
    perinuclear *= cyto
    golgi *= cyto
    return out


def mix_stains(compartments: np.ndarray, pheno: SitePhenotypes, num_channels: int,
               rng: np.random.Generator) -> np.ndarray:
    """(n, K, S, S) compartments -> (n, num_channels, S, S) float32 stain images."""
    n, _, size, _ = compartments.shape
    dna, nucleus, envelope, cell, perinuclear, membrane, golgi = np.moveaxis(compartments, 1, 0)
    fine_a, fine_b = _texture(rng, (2, n, size, size), sigma=0.7)
    medium_a, medium_b = _texture(rng, (2, n, size, size), sigma=1.4)

    def site(v):
        return np.asarray(v, np.float32)[:, None, None]

    nucleoli = np.maximum(medium_a - (1.6 - site(pheno.nucleoli)), 0)
    chromocentres = np.maximum(fine_a - 1.8, 0)
    stains = {
        # Nucleoli are DNA-poor: the DNA stain dims where the RNA stain lights up.
        "DNA": dna * (1 + site(pheno.dna_texture) * (0.3 * medium_b - 0.6 * nucleoli)) + 0.5 * nucleus * chromocentres,
        "ER": perinuclear * (0.4 + site(pheno.er_texture) * np.maximum(fine_b, 0))
              + 0.45 * envelope + 0.06 * cell,
        "RNA": nucleus * (0.2 + 1.2 * nucleoli) + 0.3 * perinuclear + 0.06 * cell,
        "AGP": site(pheno.membrane) * membrane + cell * (0.2 + 0.07 * medium_b),
        "Mito": perinuclear * (0.1 + 1.4 * np.maximum(fine_a - (1.6 - site(pheno.mito_puncta)), 0))
                + 0.04 * cell,
        "Golgi": golgi * (0.8 + 0.25 * medium_b) + 0.12 * membrane + 0.03 * cell,
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
