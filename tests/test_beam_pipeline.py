"""The Beam pipeline (DirectRunner) runs the same builder: byte-identical output to the local driver,
bad sites reported, resumable. Skipped where apache-beam is not installed (it is optional)."""
from __future__ import annotations

import json

import pytest

beam = pytest.importorskip("apache_beam")

from data import beam_pipeline  # noqa: E402
from data.crop_builder import BuildOptions, build_dataset  # noqa: E402
from data.cropping import CropSpec  # noqa: E402
from data.sources.jump_cp import JumpCP  # noqa: E402
from data.sources.rxrx1 import RxRx1  # noqa: E402
from tests import fake_screens  # noqa: E402

OPTIONS = BuildOptions(crop=CropSpec(size=32), image_size=(64, 64), num_shards=3, progress=False)


def same_files(a, b):
    manifest = json.loads((a / "manifest.json").read_text())
    names = [s["file"] for s in manifest["shards"]] + ["metadata.parquet"]
    names += ["conversion.json"] if manifest["conversion"]["levels_file"] else []
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = json.loads((b / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "created_by"} == \
        {k: v for k, v in other.items() if k != "created_by"}


def test_beam_matches_the_local_build(tmp_path):
    root = fake_screens.rxrx1(tmp_path / "src")
    local = build_dataset(RxRx1(root), tmp_path / "local", OPTIONS).path
    beam_pipeline.run(RxRx1(root), str(tmp_path / "beam"), OPTIONS, ["--runner", "DirectRunner"])
    same_files(local, tmp_path / "beam")
    assert sorted(p.name for p in (tmp_path / "beam").iterdir()) == sorted(p.name for p in local.iterdir())


def test_beam_16bit_levels_match(tmp_path):
    root, _ = fake_screens.jump(tmp_path / "src", sites=(1,))
    source = lambda: JumpCP(JumpCP.find_load_data(root / "workspace"),  # noqa: E731
                            path_map=[(fake_screens.S3_ROOT, f"{root}/")])
    options = BuildOptions(crop=CropSpec(size=32), num_shards=2, progress=False)
    local = build_dataset(source(), tmp_path / "local", options).path
    beam_pipeline.run(source(), str(tmp_path / "beam"), options)
    same_files(local, tmp_path / "beam")


def test_beam_reports_bad_sites_and_resumes(tmp_path, capsys):
    root = fake_screens.rxrx1(tmp_path / "src")
    bad = fake_screens.rxrx1_file(root, "RPE-02", 2, "C04", 2, 4)
    fake_screens.truncate(bad)
    out = tmp_path / "beam"
    args = ["rxrx1", "--source_dir", str(root), "--out", str(out), "--crop_size", "32", "--image_size", "64x64",
            "--num_shards", "3", "--runner", "DirectRunner"]
    assert beam_pipeline.main(args) == 1
    assert f"RPE-02/Plate2/C04/s2: {bad}: undecodable" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("_shards/*.parquet")) == [
        "crops-00000-of-00003.array_record.parquet", "crops-00001-of-00003.array_record.parquet"]
    finished = (out / "crops-00000-of-00003.array_record").stat().st_mtime_ns
    assert beam_pipeline.main(args + ["--skip_bad_sites"]) == 0
    assert "wrote 92 crops from 24 sites" in capsys.readouterr().out
    assert (out / "crops-00000-of-00003.array_record").stat().st_mtime_ns == finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["site"] for s in manifest["skipped_sites"]] == ["RPE-02/Plate2/C04/s2"]
    assert not (out / "_shards").exists() and not (out / "_plan").exists() and not (out / "build.json").exists()
