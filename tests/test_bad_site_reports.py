"""Bad files are never lost: each is reported with its path and reason, the build fails unless bad sites
are skipped (then the manifest lists them), and a failed or killed build resumes from its finished shards."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data import crop_builder
from data.crop_builder import BuildError, BuildOptions, build_dataset
from data.cropping import CropSpec
from data.sources import rxrx1 as rxrx1_cli
from data.sources.jump_cp import JumpCP
from data.sources.rxrx1 import RxRx1
from data.sources.rxrx3_core import RxRx3Core
from maejax.input_pipeline import open_dataset
from tests import fake_screens

OPTIONS = BuildOptions(crop=CropSpec(size=32), image_size=(64, 64), num_shards=4, progress=False)


def damage_rxrx1(root):
    """Four bad sites, one per kind of problem, in shards 0 and 2 of 4 (6 sites per shard)."""
    f = lambda *site: fake_screens.rxrx1_file(root, *site)  # noqa: E731
    bad = {
        "HUVEC-01/Plate1/B02/s1": (f("HUVEC-01", 1, "B02", 1, 3), "undecodable"),
        "HUVEC-01/Plate1/B03/s2": (f("HUVEC-01", 1, "B03", 2, 5), "missing file"),
        "RPE-02/Plate1/B03/s1": (f("RPE-02", 1, "B03", 1, 1), "is 48x48, expected 64x64"),
        "RPE-02/Plate1/C04/s2": (f("RPE-02", 1, "C04", 2, 6), "has 3 channels"),
    }
    fake_screens.truncate(bad["HUVEC-01/Plate1/B02/s1"][0])
    bad["HUVEC-01/Plate1/B03/s2"][0].unlink()
    fake_screens.save(np.zeros((48, 48), np.uint8), bad["RPE-02/Plate1/B03/s1"][0])
    fake_screens.save(np.zeros((64, 64, 3), np.uint8), bad["RPE-02/Plate1/C04/s2"][0])
    return bad


@pytest.fixture
def damaged(tmp_path):
    root = fake_screens.rxrx1(tmp_path / "src")
    return root, damage_rxrx1(root), tmp_path / "out"


def test_bad_files_fail_the_build_with_their_paths(damaged):
    root, bad, out = damaged
    with pytest.raises(BuildError) as error:
        build_dataset(RxRx1(root), out, OPTIONS)
    message = str(error.value)
    assert message.startswith("4 bad sites (4 bad files):")
    for site, (path, reason) in bad.items():
        assert f"{site}: {path}: {reason}" in message
    assert "--skip_bad_sites" in message and "2 shards holding them were not kept" in message
    assert not out.exists()
    work = out.parent / ".out.build"
    listed = json.loads((work / "bad_sites.json").read_text())
    assert [b["site"] for b in listed] == sorted(bad)
    assert sorted(p.name for p in work.glob("*.array_record")) == ["crops-00001-of-00004.array_record",
                                                                   "crops-00003-of-00004.array_record"]


def test_skip_bad_sites_lists_them_and_reuses_finished_shards(damaged):
    root, bad, out = damaged
    with pytest.raises(BuildError):
        build_dataset(RxRx1(root), out, OPTIONS)
    finished = out.parent / ".out.build" / "crops-00001-of-00004.array_record"
    before = finished.stat().st_mtime_ns, finished.stat().st_ino
    report = build_dataset(RxRx1(root), out, BuildOptions(**{**OPTIONS.__dict__, "skip_bad_sites": True}))
    assert (report.shards_built, report.shards_reused) == (2, 2)
    reused = out / finished.name
    assert (reused.stat().st_mtime_ns, reused.stat().st_ino) == before
    assert report.num_records == (24 - 4) * 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_sites"] == 24 and manifest["num_sites_skipped"] == 4
    skipped = {s["site"]: s["files"] for s in manifest["skipped_sites"]}
    assert set(skipped) == set(bad)
    for site, (path, reason) in bad.items():
        assert skipped[site][0]["path"] == str(path) and reason in skipped[site][0]["reason"]
    meta = open_dataset(out).metadata
    assert not set(meta.experiment + "/" + meta.plate + "/" + meta.well + "/s" + meta.site.astype(str)) & set(bad)
    assert not list(out.parent.glob(".out.build*"))


@pytest.mark.parametrize("digests_recorded", [True, False], ids=["digests recorded", "started before shards recorded digests"])
def test_killed_build_resumes_to_the_same_dataset(tmp_path, monkeypatch, digests_recorded):
    root = fake_screens.rxrx1(tmp_path / "src")
    reference = build_dataset(RxRx1(root), tmp_path / "reference", OPTIONS)
    real_read, calls = crop_builder.read_site, []

    def dies_on_site_15(site, fmt=None):
        calls.append(site.key)
        if len(calls) == 1 + 15:  # the probe reads one site first
            raise KeyboardInterrupt
        return real_read(site, fmt)

    monkeypatch.setattr(crop_builder, "read_site", dies_on_site_15)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(RxRx1(root), tmp_path / "out", OPTIONS)
    monkeypatch.setattr(crop_builder, "read_site", real_read)
    if not digests_recorded:   # the finished shards are hashed when the build finishes
        digests = list((tmp_path / ".out.build" / crop_builder.SHARD_DIR).glob(f"*{crop_builder.DIGEST_SUFFIX}"))
        assert len(digests) == 2
        for digest in digests:
            digest.unlink()
    report = build_dataset(RxRx1(root), tmp_path / "out", OPTIONS)
    assert (report.shards_built, report.shards_reused) == (2, 2)  # sites 0-11 were in finished shards 0 and 1
    for name in [f"crops-0000{i}-of-00004.array_record" for i in range(4)] + ["metadata.parquet"]:
        assert (report.path / name).read_bytes() == (reference.path / name).read_bytes(), name
    shards = lambda path: json.loads((path / "manifest.json").read_text())["shards"]  # noqa: E731
    assert shards(report.path) == shards(reference.path)   # every shard's size and SHA-256


def test_changed_options_do_not_mix_into_an_unfinished_build(damaged):
    root, _, out = damaged
    with pytest.raises(BuildError):
        build_dataset(RxRx1(root), out, OPTIONS)
    with pytest.raises(BuildError, match="other settings .*'options'.*--restart"):
        build_dataset(RxRx1(root), out, BuildOptions(**{**OPTIONS.__dict__, "seed": 1}))
    report = build_dataset(RxRx1(root), out, BuildOptions(**{**OPTIONS.__dict__, "seed": 1, "restart": True,
                                                             "skip_bad_sites": True}))
    assert report.shards_reused == 0 and report.num_records == 80


def test_command_line_prints_the_summary(damaged, capsys):
    root, bad, out = damaged
    args = ["--source_dir", str(root), "--out", str(out), "--crop_size", "32", "--image_size", "64x64", "--quiet"]
    assert rxrx1_cli.main(args) == 1
    err = capsys.readouterr().err
    assert all(str(path) in err for path, _ in bad.values())
    assert rxrx1_cli.main(args + ["--skip_bad_sites"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 80 crops from 24 sites" in printed and "4 bad sites skipped" in printed


def test_rxrx3_core_corrupt_and_missing_images(tmp_path):
    corrupt = {"gene-001/Plate1/AA03_s1_2": fake_screens.jp2_bytes(np.zeros((64, 64), np.uint8))[:60]}
    root, _ = fake_screens.rxrx3_core(tmp_path / "src", corrupt=corrupt, drop_keys=("compound-003/Plate7/C05_s1_4",))
    meta = root / "metadata_rxrx3_core.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(line for line in lines if "AB04" not in line) + "\n")  # a well without metadata
    with pytest.raises(BuildError) as error:
        build_dataset(RxRx3Core(root), tmp_path / "out", BuildOptions(crop=CropSpec(size=32), progress=False,
                                                                      image_size=(64, 64)))
    message = str(error.value)
    assert "3 bad sites" in message
    shard = root / "data" / "train-00000-of-00002.parquet"
    assert f"gene-001/Plate1/AA03/s1: {shard}[row 7]: undecodable" in message
    assert f"compound-003/Plate7/C05/s1: {root / 'data/*.parquet'}: no image keyed compound-003/Plate7/C05_s1_4" in message
    assert f"gene-001/Plate2/AB04/s1: {meta}: no row for experiment_name=gene-001 plate=2 address=AB04" in message


def test_jump_missing_illumination_and_empty_file_name(tmp_path):
    root, _ = fake_screens.jump(tmp_path / "src", sites=(1,))
    illum = root / "illum" / "BR0002" / "BR0002_IllumER.npy"
    illum.unlink()
    table = next((root / "workspace").rglob("BR0001/load_data_with_illum.csv"))
    text = table.read_text().replace("rA01f01p01-ch5sk1fk1fl1.tiff", "")
    table.write_text(text)
    source = JumpCP(JumpCP.find_load_data(root / "workspace"),
                    path_map=[(fake_screens.S3_ROOT, f"{root}/")])
    with pytest.raises(BuildError) as error:
        build_dataset(source, tmp_path / "out", BuildOptions(crop=CropSpec(size=32), progress=False))
    message = str(error.value)
    assert f"{illum}: missing illumination function" in message
    assert f"{table}: line 4: FileName_OrigDNA is empty" in message  # rows are listed A01 last
    assert message.startswith("4 bad sites")  # 3 wells of plate BR0002 + A01 of BR0001


def test_unreadable_source_is_named(tmp_path):
    root = fake_screens.rxrx1(tmp_path / "src", experiments=("HUVEC-01",), plates=(1,), wells=("B02",), sites=(1,))
    for c in range(1, 7):
        fake_screens.truncate(fake_screens.rxrx1_file(root, "HUVEC-01", 1, "B02", 1, c))
    with pytest.raises(BuildError, match="(?s)none of the first 1 sites can be read.*B02_s1_w1.png: undecodable"):
        build_dataset(RxRx1(root), tmp_path / "out", OPTIONS)
    with pytest.raises(ValueError, match="metadata.csv: lacks columns \\['sirna'\\]"):
        (root / "metadata.csv").write_text("experiment,plate,well,site,well_type\nX,1,A01,1,treatment\n")
        build_dataset(RxRx1(root), tmp_path / "out", OPTIONS)
