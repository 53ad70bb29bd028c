"""Bad input never passes silently (issue 11), data side: every class of docs/bad_inputs.md gets a one-line
error naming the file / record / key and saying what to do, a non-zero exit for command lines, and no result
file. Classes: relationship-table folders, a one-batch map, damaged dataset shards, damaged weights files,
and build workers outliving a killed build."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.arrayrecord_writer import write_dataset
from eval import map_benchmark
from maejax import records
from maejax.input_pipeline import iterate_records, open_dataset
from tests.reference_data import OPENPHENOM, require

REPO = Path(__file__).resolve().parents[1]


def one_error_line(err: str) -> str:
    """The command's stderr must be exactly one line, `error: ...`; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# 1. relationship-table folders (eval.map_benchmark --annotations; eval.job reads the same way)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """12 genes x 3 batches x 2 rows + controls, and a good annotation folder."""
    root = tmp_path_factory.mktemp("screen")
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(12)]
    rows = [(g, f"b{b}") for b in range(3) for g in genes * 2 + ["ctrl"] * 6]
    df = pd.DataFrame(rng.standard_normal((len(rows), 6)), columns=[f"feature_{i}" for i in range(6)])
    df["gene"], df["batch"] = [r[0] for r in rows], [r[1] for r in rows]
    df["well_id"] = [f"w{i}" for i in range(len(df))]
    df.to_parquet(root / "screen.parquet")
    df.assign(batch="b0").to_parquet(root / "one_batch.parquet")
    return root, genes


def run_benchmark(root: Path, tmp_path: Path, annotations, *extra, features="screen.parquet"):
    out = tmp_path / "map" / "report.json"
    code = map_benchmark.main(["--embeddings", str(root / features), "--perturbation_col", "gene", "--batch_col",
                               "batch", "--control", "ctrl", "--pca_components", "4", "--annotations",
                               str(annotations), "--out", str(out.parent), *extra])
    return code, out


def _folder(tmp_path: Path, files: dict[str, str] | None) -> Path:
    folder = tmp_path / "ann"
    if files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    return folder


GOOD = "entity1,entity2\nG00,G01\nG02,G03\n"
ANNOTATION_CASES = {
    "missing folder": (None, r"annotation folder \S*/ann does not exist; pass a folder of <Source>.txt CSV"),
    "empty folder": ({}, r"annotation folder \S*/ann holds no relationship table \(it is empty\); expected "
                         r"<Source>.txt CSV files whose first line is 'entity1,entity2'"),
    "only non-table files": ({"README.md": "# tables\n", "notes.txt": "tables from CORUM, see the paper\n"},
                             r"\S*/ann holds no relationship table \(it holds README.md, notes.txt\)"),
    "wrong header": ({"Good.txt": GOOD, "Bad.txt": "gene_a,gene_b\nG00,G01\n"},
                     r"\S*/ann/Bad.txt: expected the header 'entity1,entity2', found 'gene_a,gene_b'; rename its "
                     r"columns to entity1,entity2"),
    "tab-separated header": ({"Tabs.txt": "entity1\tentity2\nG00\tG01\n"},
                             r"\S*/ann/Tabs.txt: expected the header 'entity1,entity2', found 'entity1\\tentity2'"),
    "header only": ({"Good.txt": GOOD, "Empty.txt": "entity1,entity2\n"},
                    r"\S*/ann/Empty.txt: no gene pairs, only the header; fill the table or remove it"),
    "no gene of the screen": ({"Good.txt": GOOD, "Other.txt": "entity1,entity2\nENSG0001,ENSG0002\n"},
                              r"\S*/ann/Other.txt: none of its genes is in the map \(map: \['G00', 'G01', 'G02', "
                              r"'G03', 'G04'\] ...; table: \['ENSG0001', 'ENSG0002'\] ...\); use the same gene "
                              r"identifiers"),
    "no known pair in the map": ({"Far.txt": "entity1,entity2\nG00,XYZ\n"},
                                 r"no known pair of \['Far'\] \(in \S*/ann\) has both genes among the map's 12 "
                                 r"perturbations, so there is no recall to report"),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
def test_bad_annotation_folders_fail_before_any_result(tmp_path, screen, capsys, case):
    files, message = ANNOTATION_CASES[case]
    folder = _folder(tmp_path, files)
    root, genes = screen
    code, out = run_benchmark(root, tmp_path, folder)
    assert code == 2 and not out.exists()      # no report.json with "recall": []
    assert re.search(message, one_error_line(capsys.readouterr().err))
    # eval.job maps each block through eval.screen.map_block -> the same loader, the same message
    from eval import screen as screen_lib
    wells = np.random.default_rng(1).standard_normal((40, 5))
    meta = pd.DataFrame({"perturbation": (genes * 3)[:34] + ["ctrl"] * 6, "experiment": ["e0", "e1"] * 20})
    with pytest.raises(ValueError, match=message):
        screen_lib.map_block(wells, meta, str(folder), control="ctrl", pca_components=4, correction="none",
                             thresholds=[(0.05, 0.95)], negative_controls=None, seed=0)


def test_prose_files_beside_tables_are_skipped(tmp_path, screen):
    folder = _folder(tmp_path, {"Good.txt": GOOD, "README.txt": "Tables of known pairs, one per source.\n"})
    code, out = run_benchmark(screen[0], tmp_path, folder)
    assert code == 0 and [r["source"] for r in json.loads(out.read_text())["recall"]] == ["Good"]


# --------------------------------------------------------------------------------------------------------
# 2. a one-batch screen: replicate consistency has no replicate unit to compare across
# --------------------------------------------------------------------------------------------------------

def test_one_batch_says_what_is_wrong_and_the_flag_that_fixes_it(tmp_path, screen, capsys):
    root, _ = screen
    folder = _folder(tmp_path, {"Good.txt": GOOD})
    code, out = run_benchmark(root, tmp_path, folder, features="one_batch.parquet")
    assert code == 2 and not out.exists()
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"one_batch.parquet: replicate consistency compares each perturbation's profiles across "
                     r"values of --replicate_col \(default: --batch_col\) 'batch', but every perturbation has one "
                     r"value there \(1 in the data: \['b0'\]\), although perturbations have up to 6 rows; pass "
                     r"--replicate_col COLUMN; columns that vary within a perturbation here: \['well_id'\]", line)
    code, out = run_benchmark(root, tmp_path, folder, "--replicate_col", "well_id", features="one_batch.parquet")
    assert code == 0
    report = json.loads(out.read_text())
    assert report["consistency"]["replicate_consistency"]["replicates"] == "well_id"
    assert report["map"]["batches"] == 1 and [r["source"] for r in report["recall"]] == ["Good"]


# --------------------------------------------------------------------------------------------------------
# 3. damaged ArrayRecord shards
# --------------------------------------------------------------------------------------------------------

def _examples(n: int):
    rng = np.random.default_rng(0)
    for k in range(n):
        yield rng.integers(0, 256, (2, 16, 16), dtype=np.uint8), {
            "experiment": "E1", "plate": "P1", "well": f"A{k:02d}", "site": 1, "tile": 0,
            "perturbation": ("G1", "ctrl")[k % 2], "is_control": k % 2 == 1}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "ds", _examples(24), name="t", source="tests",
                         channels=["a", "b"], num_shards=2)


def _flip(at):
    def damage(shard: Path) -> None:
        data = bytearray(shard.read_bytes())
        start = at(len(data))
        data[start:start + 4] = bytes(b ^ 0xFF for b in data[start:start + 4])
        shard.write_bytes(bytes(data))
    return damage


SHARD_CASES = {
    # damage, what opening says (None: opening passes), what `verify` says
    "start of shard": (_flip(lambda n: 8), r"{shard}: corrupt ArrayRecord shard: its first 64 bytes are not the "
                       r"Riegeli file signature", r"{shard}: corrupt ArrayRecord shard: its first 64 bytes"),
    "middle of shard": (_flip(lambda n: 5000), None, r"{shard}: corrupt ArrayRecord shard: sha256 \w+\.\.\. differs "
                        r"from \S+manifest.json's \w+\.\.\. \(record 7 is the first that does not read back\)"),
    "end of shard": (_flip(lambda n: n - 40), None, r"{shard}: corrupt ArrayRecord shard: sha256 .* \(every record "
                     r"still reads back: the damage is outside the record data\)"),
    "truncated": (lambda s: s.write_bytes(s.read_bytes()[:-1000]), r"{shard}: corrupt ArrayRecord shard: 130072 "
                  r"bytes, \S+manifest.json says 131072 \(truncated\)", r"{shard}: corrupt .* \(truncated\)"),
    "wrong size": (lambda s: s.write_bytes(s.read_bytes() + b"\0" * 10), r"{shard}: corrupt ArrayRecord shard: "
                   r"131082 bytes, \S+ says 131072 \(longer than written\)", r"{shard}: .*\(longer than written\)"),
    "missing shard": (lambda s: s.unlink(), r"{shard}: shard listed in \S+manifest.json is missing; re-copy the "
                      r"dataset or rebuild it", r"{shard}: shard listed in .* is missing"),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_damaged_shards_are_named(tmp_path, pristine, capsys, case):
    damage, on_open, on_verify = SHARD_CASES[case]
    ds = tmp_path / "ds"
    shutil.copytree(pristine, ds)
    shard = ds / json.loads((ds / "manifest.json").read_text())["shards"][0]["file"]
    damage(shard)
    on_verify = on_verify.format(shard=re.escape(str(shard)))
    assert records.main(["verify", "--dataset", str(ds)]) == 1
    assert re.search(on_verify, one_error_line(capsys.readouterr().err))
    with pytest.raises((ValueError, OSError), match=on_verify):
        open_dataset(ds, verify=True)
    if on_open is not None:
        with pytest.raises((ValueError, OSError), match=on_open.format(shard=re.escape(str(shard)))):
            open_dataset(ds)
        return
    opened = open_dataset(ds)   # the cheap checks pass; reading names the shard and the record
    if case == "middle of shard":
        named = rf"^{re.escape(str(shard))}\[7\]: unreadable record \(RuntimeError: Corrupted Riegeli/records file: .*" \
                rf"\); the shard is damaged: check the dataset with `python -m maejax.records verify --dataset {re.escape(str(ds))}`"
        with pytest.raises(records.RecordError, match=named) as raised:
            opened.reader.read(7)
        assert "\n" not in str(raised.value)
        with pytest.raises(records.RecordError, match=named):
            list(iterate_records(opened, 8))   # the batched read finds the record too
    else:
        assert len(list(iterate_records(opened, 8))) == 3


def test_checksums_are_recorded_and_old_datasets_still_open(tmp_path, pristine, capsys, caplog):
    manifest = json.loads((pristine / "manifest.json").read_text())
    for entry in manifest["shards"]:   # the writer's digests are sha256sum's
        assert entry["bytes"] == (pristine / entry["file"]).stat().st_size
        assert entry["sha256"] == records.shard_digest(pristine / entry["file"])["sha256"]
    assert records.main(["verify", "--dataset", str(pristine)]) == 0
    assert "2 shards, 24 records, 262144 bytes verified (sizes and SHA-256 match" in capsys.readouterr().out

    old = tmp_path / "old"
    shutil.copytree(pristine, old)
    for entry in manifest["shards"]:
        del entry["bytes"], entry["sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="maejax.input_pipeline"):
        assert len(open_dataset(old)) == 24 and len(open_dataset(old)) == 24
    said = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(said) == 1 and f"{old / 'manifest.json'}: no shard sizes and checksums" in said[0]
    assert records.main(["verify", "--dataset", str(old)]) == 0
    assert "every record was read back instead" in capsys.readouterr().out
    _flip(lambda n: 5000)(old / manifest["shards"][1]["file"])
    assert records.main(["verify", "--dataset", str(old)]) == 1
    assert re.search(rf"{re.escape(str(old / manifest['shards'][1]['file']))}\[7\]: unreadable record",
                     one_error_line(capsys.readouterr().err))


def test_crop_builder_records_checksums(tmp_path):
    from data.crop_builder import BuildOptions, build_dataset
    from data.cropping import CropSpec
    from data.sources.generic import GenericCSV
    from tests import fake_screens
    root = fake_screens.generic(tmp_path / "src")
    out = build_dataset(GenericCSV(root / "sites.csv", ["DNA", "Actin"]), tmp_path / "built",
                        BuildOptions(crop=CropSpec(size=32), num_shards=2, progress=False)).path
    result = records.verify_dataset(out)
    assert result.checksummed and not result.problems and result.num_shards == 2


# --------------------------------------------------------------------------------------------------------
# 4. damaged weights files (maejax.convert openphenom)
# --------------------------------------------------------------------------------------------------------

def _reference_bytes() -> bytes:
    return (require(OPENPHENOM) / "encoder_random_init.safetensors").read_bytes()


def _without_tensor(path: Path) -> None:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(require(OPENPHENOM) / "encoder_random_init.safetensors"))
    del tensors["vit_backbone.blocks.1.ls.gamma"]
    save_file(tensors, str(path))


WEIGHT_CASES = {
    "truncated": (lambda p: p.write_bytes(_reference_bytes()[:700_000]),
                  r"{w}: truncated safetensors file: 700000 bytes, its header lists tensors up to byte 1492856 "
                  r"\(tensor 'vit_backbone.pos_embed' ends past the end of the file\); download or copy it again"),
    "truncated in the header": (lambda p: p.write_bytes(_reference_bytes()[:1000]),
                                r"{w}: truncated or not safetensors: its first 8 bytes announce a 4464-byte header, "
                                r"the file has 992 bytes after them"),
    "random bytes with a plausible header": (
        lambda p: p.write_bytes(struct.pack("<Q", 300) + b"{" + np.random.default_rng(0).bytes(2000)),
        r"{w}: damaged safetensors header \('utf-8' codec can't decode .*\); download or copy it again"),
    "valid header, a tensor missing": (_without_tensor, r"{w}: tensor 'blocks.1.ls.gamma' is missing \(an incomplete "
                                                         r"file, or not an OpenPhenom CA-MAE\)"),
    "empty file": (lambda p: p.write_bytes(b""), r"{w}: empty file \(0 bytes\), not model weights"),
    "directory without model.safetensors": (
        lambda p: (p.mkdir(), (p / "config.json").write_text("{}")),
        r"{w}: a directory without model.safetensors \(it holds \['config.json'\]\); pass the weights file itself, "
        r"or the Hugging Face snapshot folder"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_bad_weights_files_are_named(tmp_path, capsys, case):
    from maejax import convert
    make, message = WEIGHT_CASES[case]
    weights = tmp_path / "model.safetensors"
    make(weights)
    out = tmp_path / "ckpt"
    assert convert.main(["openphenom", "--weights", str(weights), "--workdir", str(out)]) == 2
    assert re.search(message.format(w=re.escape(str(weights))), one_error_line(capsys.readouterr().err))
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------
# 5. build workers die with a killed build
# --------------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; uses named pipes")
def test_workers_die_when_the_build_is_killed(tmp_path):
    """A 2-worker build whose workers block reading a site (a named pipe, so they are busy for as long as
    the test wants); SIGKILL the parent; every worker and the resource tracker must be gone in seconds."""
    from PIL import Image
    rows, pipes = [], []
    for s in range(4):
        path = tmp_path / "img" / f"s{s}.png"
        path.parent.mkdir(exist_ok=True)
        if s % 2:   # sites 1 and 3: one per shard, after a readable site (site 0 fixes the format)
            os.mkfifo(path)
            pipes.append(path)
        else:
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
        rows.append({"experiment": "e", "plate": "p", "well": f"A0{s}", "site": 1, "DNA": f"img/s{s}.png"})
    pd.DataFrame(rows).to_csv(tmp_path / "sites.csv", index=False)
    build = subprocess.Popen(
        [sys.executable, "-m", "data.sources.generic", "--csv", str(tmp_path / "sites.csv"), "--channels", "DNA",
         "--out", str(tmp_path / "out"), "--crop_size", "32", "--workers", "2", "--num_shards", "2", "--quiet"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held, workers = {}, []
    try:
        deadline = time.monotonic() + 60
        while len(held) < len(pipes) and time.monotonic() < deadline and build.poll() is None:
            for pipe in pipes:   # opening for writing succeeds once a worker has the pipe open for reading
                if pipe not in held:
                    try:
                        held[pipe] = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                    except OSError:
                        pass
            time.sleep(0.05)
        assert len(held) == 2, "the workers never started reading their shards"
        workers = _children(build.pid)   # the 2 workers and multiprocessing's resource tracker
        assert len(workers) >= 2
        build.send_signal(signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in workers if _alive(p)], "workers outlived the killed build"
    finally:
        for pid in workers:   # only if the test failed: leave nothing running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if build.poll() is None:
            build.kill()
            build.wait()
        for fd in held.values():
            os.close(fd)
