"""Tiny fake screens in the real layouts (RxRx1, RxRx3-core, JUMP-CP cpg0016, generic CSV), plus ways to
damage their files, for the builder tests. Pixels are seeded noise, so every record can be checked
against the file it came from."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIZE = 64  # site size; tests cut 32x32 crops, 4 per site


def image(rng: np.random.Generator, dtype=np.uint8, size: int = SIZE) -> np.ndarray:
    high = 256 if dtype == np.uint8 else 4096  # 12-bit camera range in a 16-bit file
    return rng.integers(0, high, (size, size)).astype(dtype)


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def jp2_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG2000", irreversible=False)  # lossless
    return buffer.getvalue()


def rxrx1(root: Path, *, experiments=("HUVEC-01", "RPE-02"), plates=(1, 2), wells=("B02", "B03", "C04"),
          sites=(1, 2), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for experiment in experiments:
        for plate in plates:
            for w, well in enumerate(wells):
                for site in sites:
                    control = w == 0
                    rows.append({"site_id": f"{experiment}_{plate}_{well}_{site}",
                                 "well_id": f"{experiment}_{plate}_{well}",
                                 "cell_type": experiment.split("-")[0], "dataset": "train", "experiment": experiment,
                                 "plate": plate, "well": well, "site": site,
                                 "well_type": "negative_control" if control else "treatment",
                                 "sirna": "EMPTY" if control else f"s{w:04d}", "sirna_id": 1138 if control else w})
                    for c in range(1, 7):
                        save(image(rng), root / "images" / experiment / f"Plate{plate}" / f"{well}_s{site}_w{c}.png")
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def rxrx1_file(root: Path, experiment: str, plate: int, well: str, site: int, channel: int) -> Path:
    return root / "images" / experiment / f"Plate{plate}" / f"{well}_s{site}_w{channel}.png"


RXRX3_WELLS = [  # (experiment, plate, address, gene, treatment, perturbation_type, concentration)
    ("gene-001", 1, "AA02", "EMPTY_control", "EMPTY_control", "CRISPR", ""),
    ("gene-001", 1, "AA03", "TP53", "TP53_guide_1", "CRISPR", ""),
    ("gene-001", 2, "AB04", "MDM2", "MDM2_guide_2", "CRISPR", ""),
    ("compound-003", 7, "C05", "", "RXCMPD-17", "COMPOUND", "2.5"),
    ("compound-003", 7, "C06", "EMPTY_control", "EMPTY_control", "COMPOUND", ""),
]


def rxrx3_core(root: Path, *, seed: int = 0, corrupt: dict[str, bytes] | None = None,
               drop_keys: tuple[str, ...] = (), dtype=np.uint8) -> tuple[Path, dict[str, np.ndarray]]:
    """Two parquet shards in the Hugging Face schema ({__key__, jp2: {bytes, path}}) + metadata CSV.

    corrupt: {key: bytes to store instead of the image}; drop_keys: keys left out. Returns the root
    and the images by key.
    """
    rng = np.random.default_rng(seed)
    keys, images = [], {}
    for experiment, plate, address, *_ in RXRX3_WELLS:
        for c in range(1, 7):
            key = f"{experiment}/Plate{plate}/{address}_s1_{c}"
            images[key] = image(rng, dtype)
            keys.append(key)
    cells = [{"bytes": (corrupt or {}).get(k, jp2_bytes(images[k])), "path": k.rsplit("/", 1)[1] + ".jp2"}
             for k in keys]
    table = pd.DataFrame({"__key__": keys, "jp2": cells})
    table = table[~table["__key__"].isin(drop_keys)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    half = 14  # the third well's channels straddle the two shards
    table.iloc[:half].to_parquet(root / "data" / "train-00000-of-00002.parquet", index=False, row_group_size=8)
    table.iloc[half:].to_parquet(root / "data" / "train-00001-of-00002.parquet", index=False, row_group_size=8)
    meta = pd.DataFrame(RXRX3_WELLS, columns=["experiment_name", "plate", "address", "gene", "treatment",
                                              "perturbation_type", "concentration"])
    meta.insert(0, "well_id", [f"{e}_{p}_{a}" for e, p, a in zip(meta.experiment_name, meta.plate, meta.address)])
    meta["SMILES"] = ["", "", "", "CCO", ""]
    meta["cell_type"] = "HUVEC"
    meta.to_csv(root / "metadata_rxrx3_core.csv", index=False)
    return root, images


# Column order differs from the usual DNA-first order on purpose: channels come from the columns.
JUMP_CHANNELS = ["Mito", "AGP", "RNA", "ER", "DNA", "Brightfield"]
JUMP_PLATES = {"BR0001": "2021_04_26_Batch1", "BR0002": "2021_05_03_Batch2"}
JUMP_WELLS = {"A01": "JCP2022_800001", "A02": "JCP2022_033924", "B01": "JCP2022_900002"}
S3_ROOT = "s3://cellpainting-gallery/cpg0016-jump/source_4/"  # tests map it to the fake screen's root
S3 = S3_ROOT + "images/"


def jump(root: Path, *, seed: int = 0, sites=(1, 2)) -> tuple[Path, dict[str, np.ndarray]]:
    """Per-plate load_data_with_illum.csv under workspace/load_data_csv/{batch}/{plate}/, 16-bit TIFFs
    whose PathName is an s3:// URL (map it with --path_map), .npy illumination functions, and the
    well and CRISPR annotation tables. Returns the root and the raw images by file path."""
    rng = np.random.default_rng(seed)
    images = {}
    for plate, batch in JUMP_PLATES.items():
        image_dir = f"{batch}/images/{plate}/Images/"
        illum_dir = root / "illum" / plate
        illum_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for well in JUMP_WELLS:
            for site in sites:
                row = {"Metadata_Source": "source_4", "Metadata_Batch": batch, "Metadata_Plate": plate,
                       "Metadata_Well": well, "Metadata_Site": site}
                for k, channel in enumerate(JUMP_CHANNELS):
                    name = f"r{well}f{site:02d}p01-ch{k + 1}sk1fk1fl1.tiff"
                    path = save(image(rng, np.uint16), root / "images" / image_dir / name)
                    images[str(path)] = np.asarray(Image.open(path))
                    row |= {f"FileName_Orig{channel}": name, f"PathName_Orig{channel}": S3 + image_dir,
                            f"FileName_Illum{channel}": f"{plate}_Illum{channel}.npy",
                            f"PathName_Illum{channel}": str(illum_dir)}
                rows.append(row)
        for channel in JUMP_CHANNELS:
            y, x = np.mgrid[:SIZE, :SIZE]
            np.save(illum_dir / f"{plate}_Illum{channel}.npy", (0.8 + 0.4 * (x + y) / (2 * SIZE)).astype(np.float32))
        folder = root / "workspace" / "load_data_csv" / batch / plate
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows[::-1]).to_csv(folder / "load_data_with_illum.csv", index=False)  # sorted on read
        pd.DataFrame(rows).drop(columns=[c for c in rows[0] if "Illum" in c]).to_csv(folder / "load_data.csv",
                                                                                    index=False)
    pd.DataFrame([{"Metadata_Source": "source_4", "Metadata_Plate": p, "Metadata_Well": w, "Metadata_JCP2022": j}
                  for p in JUMP_PLATES for w, j in JUMP_WELLS.items()]).to_csv(root / "well.csv.gz", index=False)
    pd.DataFrame({"Metadata_JCP2022": ["JCP2022_800001", "JCP2022_900002"],
                  "Metadata_NCBI_Gene_ID": ["7157", ""],
                  "Metadata_Symbol": ["TP53", "non-targeting"]}).to_csv(root / "crispr.csv.gz", index=False)
    return root, images


def generic(root: Path, *, seed: int = 0) -> Path:
    """A CSV of sites: DNA as 16-bit TIFF, Actin as 8-bit PNG, plus a `compound` metadata column."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ("P1", "P2"):
        for well, compound in (("A01", "DMSO"), ("A02", "taxol")):
            for site in (1, 2, 3):
                dna = save(image(rng, np.uint16), root / "img" / plate / f"{well}_{site}_dna.tif")
                actin = save(image(rng), root / "img" / plate / f"{well}_{site}_actin.png")
                rows.append({"experiment": "run1", "plate": plate, "well": well, "site": site,
                             "perturbation": compound, "compound": compound, "dose_um": "0.1",
                             "DNA": str(dna.relative_to(root)), "Actin": str(actin.relative_to(root))})
    pd.DataFrame(rows).to_csv(root / "sites.csv", index=False)
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
