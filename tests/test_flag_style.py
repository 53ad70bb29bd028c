"""One flag style across every command line (maejax/flags.py): absl's underscores, one name per concept
(--workdir a run directory, --dataset a dataset directory, --out a directory, --batch_size, --embeddings a
table of features, --perturbation_col), and the old spellings kept for one release: they still work, are
not in --help, and say on stderr what replaces them.

Every command is found by its `if __name__ == "__main__":` and run as `python -m` runs it, in a child
process, up to its parse (argparse) or `app.run` (absl): the parsers checked are the real ones."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from maejax import flags

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eval", "maejax", "data", "benchmarks", "launch", "configs")
ARGV = {"data.beam_pipeline": ["rxrx1"]}   # commands that need an argument before they build their parser

# Names of concepts that have one spelling now: the visible flag must not be any of these.
NOT_CANONICAL = {
    "--work_dir": "--workdir (a run directory) or --out", "--root": "--out", "--checkpoint": "--workdir",
    "--batch": "--batch_size", "--crop": "--crop_size", "--size": "--crop_size", "--data_dir": "--out",
}
DIRECTORIES = ("--workdir", "--dataset", "--out")   # always a directory: shown as DIR in --help

SHARED_BUILD = {"--crop-size": "--crop_size", "--crop-mode": "--crop_mode", "--crops-per-site": "--crops_per_site",
                "--image-size": "--image_size", "--sample-sites": "--sample_sites",
                "--sample-pixels": "--sample_pixels", "--num-shards": "--num_shards",
                "--records-per-shard": "--records_per_shard", "--skip-bad-sites": "--skip_bad_sites"}
# The spellings of the release before this one, kept for one release.
DEPRECATED = {
    "eval.map_benchmark": {"--features": "--embeddings"},
    "eval.embed_arrays": {"--checkpoint": "--workdir", "--batch-size": "--batch_size"},
    "maejax.convert openphenom": {"--in-channels": "--in_channels", "--encoder-only": "--encoder_only",
                                  "--decoder-heads": "--decoder_heads",
                                  "--cross-attention-heads": "--cross_attention_heads",
                                  "--decoder-norm-eps": "--decoder_norm_eps"},
    "data.sources.rxrx1": {**SHARED_BUILD, "--source-dir": "--source_dir", "--channel-names": "--channel_names"},
    "data.sources.rxrx3_core": {**SHARED_BUILD, "--source-dir": "--source_dir", "--key-column": "--key_col",
                                "--image-column": "--image_col", "--perturbation-columns": "--perturbation_col",
                                "--control-labels": "--control_labels", "--channel-names": "--channel_names"},
    "data.sources.jump_cp": {**SHARED_BUILD, "--source-dir": "--source_dir", "--load-data": "--load_data",
                             "--no-illum": "--no_illum", "--path-map": "--path_map",
                             "--perturbation-column": "--perturbation_col", "--control-labels": "--control_labels"},
    "data.sources.generic": {**SHARED_BUILD, "--source-dir": "--source_dir", "--control-labels": "--control_labels"},
    "data.synthetic_screen": {"--num-channels": "--num_channels", "--site-size": "--site_size",
                              "--crop-size": "--crop_size", "--control-wells": "--control_wells"},
    "data.tfds_crops": {"--data-dir": "--out", "--split-column": "--split_col"},
    "launch.scaling_sweep": {"--root": "--out"},
    "benchmarks.input_pipeline": {"--work-dir": "--cache_dir", "--batch-size": "--batch_size",
                                  "--crop-size": "--crop_size"},
    "benchmarks.input_pipeline_throughput": {"--batch-size": "--batch_size", "--crop-size": "--crop_size"},
    "benchmarks.embed_throughput": {"--batch": "--batch_size", "--crop": "--crop_size"},
    "benchmarks.handcrafted_benchmark": {"--batch": "--batch_size", "--size": "--crop_size"},
    "benchmarks.probe_benchmark": {"--features": "--num_features", "--out": "--json"},
    "benchmarks.map_speed_vs_efaar": {"--features": "--num_features", "--workdir": "--out"},
    "benchmarks.map_sweep_speed": {"--features": "--num_features", "--out": "--json"},
}


class _Parsed(Exception):
    pass


def commands() -> list[str]:
    """Every module of the packages that runs as a command."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def describe(parser: argparse.ArgumentParser, name: str) -> list[dict]:
    """The parser and its subcommands' parsers: class, visible optional flags, deprecated spellings."""
    flags_seen, out = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                out += describe(subparser, f"{name} {sub}")
        elif action.help != argparse.SUPPRESS:
            for option in action.option_strings:
                flags_seen.append({"flag": option, "metavar": action.metavar, "choices": action.choices is not None,
                                   "type": getattr(action.type, "__name__", None), "nargs": action.nargs})
    return [{"command": name, "kind": "argparse", "class": f"{type(parser).__module__}.{type(parser).__name__}",
             "flags": flags_seen, "deprecated": dict(flags.aliases(parser))}] + out


def _child_main() -> None:
    """Runs every command up to its parse; prints one JSON list of describe()'s records."""
    from absl import app
    from absl import flags as absl_flags

    def parse_known_args(self, args=None, namespace=None):
        raise _Parsed(self)

    def run(main, argv=None, **_):
        raise _Parsed(None)

    argparse.ArgumentParser.parse_known_args = parse_known_args   # flags.ArgumentParser's calls it
    app.run = run
    records = []
    for module in commands():
        sys.argv = [module, *ARGV.get(module, [])]
        try:
            __import__(module)   # library imports first: absl flags they define are not the command's
        except ModuleNotFoundError as e:
            records.append({"command": module, "missing": e.name})
            continue
        before = set(absl_flags.FLAGS)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                runpy.run_module(module, run_name="__main__", alter_sys=False)
            records.append({"command": module, "error": "ran to the end without parsing a command line"})
        except _Parsed as p:
            if p.args[0] is not None:
                records += describe(p.args[0], module)
            else:
                new = sorted(set(absl_flags.FLAGS) - before)
                records.append({"command": module, "kind": "absl", "flags": [
                    {"flag": f"--{n}", "deprecated": str(absl_flags.FLAGS[n].help).lower().startswith("deprecated")}
                    for n in new]})
                for n in new:   # the next absl command defines its own (both run as __main__)
                    delattr(absl_flags.FLAGS, n)
        except BaseException as e:   # noqa: BLE001 (a command that exits before parsing is a finding)
            records.append({"command": module, "error": f"{type(e).__name__}: {e}"})
    print(json.dumps(records))


@pytest.fixture(scope="module")
def parsers() -> dict[str, dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "from tests.test_flag_style import _child_main; _child_main()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    return {r["command"]: r for r in records}


def test_every_command_is_found_and_parses_its_command_line(parsers):
    errors = {c: r["error"] for c, r in parsers.items() if "error" in r}
    assert not errors
    assert {"maejax.train", "maejax.aot", "eval.job", "eval.map_benchmark", "data.sources.rxrx1",
            "maejax.convert openphenom"} <= set(parsers)
    missing = {c: r["missing"] for c, r in parsers.items() if "missing" in r}
    assert set(missing.values()) <= {"apache_beam", "tensorflow_datasets"}, missing   # optional extras


def test_every_argparse_command_uses_the_one_alias_mechanism(parsers):
    other = {c: r["class"] for c, r in parsers.items() if r.get("kind") == "argparse"
             and r["class"] != "maejax.flags.ArgumentParser"}
    assert not other


def test_no_visible_flag_has_a_hyphen_in_its_name(parsers):
    hyphens = {c: [f["flag"] for f in r["flags"] if "-" in f["flag"][2:] and not f.get("deprecated")]
               for c, r in parsers.items() if "flags" in r}
    assert not {c: f for c, f in hyphens.items() if f}


def test_every_concept_has_its_one_name(parsers):
    wrong = []
    for command, r in parsers.items():
        for f in r.get("flags", []):
            name = f["flag"]
            if f.get("deprecated"):
                continue
            if name in NOT_CANONICAL:
                wrong.append(f"{command} {name}: use {NOT_CANONICAL[name]}")
            if re.search(r"_columns?$", name) or name.startswith("--perturbation_") and name != "--perturbation_col":
                wrong.append(f"{command} {name}: columns are --*_col (--perturbation_col)")
            if name == "--features" and not f["choices"]:   # eval.job's kind of features is the only --features
                wrong.append(f"{command} --features: a table of features is --embeddings, a count --num_features")
            if r["kind"] == "argparse" and name in DIRECTORIES and f["metavar"] != "DIR":
                wrong.append(f"{command} {name}: a directory, shown as DIR (metavar {f['metavar']!r})")
    assert not wrong


def test_deprecated_spellings_are_kept_and_point_at_visible_flags(parsers):
    for command, renamed in DEPRECATED.items():
        if "missing" in parsers.get(command, {}):
            continue
        assert parsers[command]["deprecated"] == {**parsers[command]["deprecated"], **renamed}, command
    for command, r in parsers.items():
        visible = {f["flag"] for f in r.get("flags", [])}
        for old, new in r.get("deprecated", {}).items():
            assert new in visible and old not in visible, (command, old, new)


def test_a_deprecated_spelling_still_works_warns_and_is_not_in_help(capsys):
    from eval import map_benchmark
    args = map_benchmark.parser().parse_args(["--features", "f.parquet", "--perturbation_col", "g",
                                              "--control", "c", "--out", "o"])
    assert args.embeddings == "f.parquet" and not hasattr(args, "features")
    assert capsys.readouterr().err == ("--features is deprecated and will be removed in the next release; "
                                       "use --embeddings\n")
    with pytest.raises(SystemExit):
        map_benchmark.parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--embeddings FILE" in text and "--features" not in text


def _parser() -> flags.ArgumentParser:
    p = flags.ArgumentParser(prog="x")
    p.add_argument("--batch_size", deprecated=["--batch-size", "--batch"], type=int, default=1)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--crop_size", deprecated="--crop-size", type=int, required=True)
    source = p.add_argument_group("source").add_mutually_exclusive_group(required=True)
    source.add_argument("--source_dir", deprecated="--source-dir")
    source.add_argument("--load_data", deprecated="--load-data", nargs="+")
    p.add_argument("--path_map", deprecated="--path-map", action="append", default=[])
    p.add_argument("--no_illum", deprecated="--no-illum", action="store_true")
    p.add_argument("rest", nargs="*")
    return p


def test_old_spellings_mean_the_new_flags_in_every_form(capsys):
    a = _parser().parse_args(["--batch", "5", "--crop-size=7", "--source-dir", "s", "--path-map", "a=b",
                              "--path_map", "c=d", "--no-illum", "--", "--batch"])
    assert (a.batch_size, a.batches, a.crop_size, a.source_dir, a.path_map, a.no_illum, a.rest) == \
        (5, 2, 7, "s", ["a=b", "c=d"], True, ["--batch"])   # an exact old name wins over a prefix; not after --
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{old} is deprecated and will be removed in the next release; use {new}" for old, new in
                   [("--batch", "--batch_size"), ("--crop-size", "--crop_size"), ("--source-dir", "--source_dir"),
                    ("--path-map", "--path_map"), ("--no-illum", "--no_illum")]]


def test_an_old_spelling_fills_a_required_flag_and_keeps_its_group_exclusive(capsys):
    assert _parser().parse_args(["--crop-size", "3", "--load-data", "t1", "t2"]).load_data == ["t1", "t2"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--crop-size", "3", "--source-dir", "s", "--load-data", "t"])
    assert "argument --load_data: not allowed with argument --source_dir" in capsys.readouterr().err


def test_subcommands_take_old_spellings_and_help_hides_them(capsys):
    p = flags.ArgumentParser(prog="c")
    op = p.add_subparsers(dest="source", required=True).add_parser("op")
    op.add_argument("--in_channels", deprecated="--in-channels", type=int)
    assert p.parse_args(["op", "--in-channels", "4"]).in_channels == 4
    assert "--in_channels" in op.format_help() and "--in-channels" not in op.format_help()


def test_an_old_spelling_that_is_already_a_flag_is_refused():
    p = flags.ArgumentParser()
    p.add_argument("--batches")
    with pytest.raises(ValueError, match="already a flag"):
        p.add_argument("--batch_size", deprecated="--batches")
    with pytest.raises(ValueError, match="only --long"):
        p.add_argument("--x", deprecated="-x")


def test_out_is_a_directory_and_the_old_file_form_still_works(tmp_path, capsys):
    assert flags.output_file(tmp_path / "run", "report.json") == tmp_path / "run" / "report.json"
    assert (tmp_path / "run").is_dir() and capsys.readouterr().err == ""
    assert flags.output_file(tmp_path / "old" / "mine.json", "report.json") == tmp_path / "old" / "mine.json"
    assert capsys.readouterr().err == ("--out FILE.json is deprecated and will be removed in the next release; "
                                       "use --out DIR (writes DIR/report.json)\n")
    (tmp_path / "d.json").mkdir()   # an existing directory is a directory, whatever its name
    assert flags.output_file(tmp_path / "d.json", "report.json") == tmp_path / "d.json" / "report.json"
