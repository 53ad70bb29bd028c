"""Every command in README.md and docs/*.md (code blocks, and `inline code` that starts like a command) is
checked, so the manuals cannot drift from the code: each is either run as written by CI, or parsed and checked.

Parsed and checked means: the command's own parser, as it is when the test runs (argparse or absl flags,
found by running the module as `python -m` does with the parsers stopped right after parsing), accepts its
flags and values; a `--config FILE.py:ARG` with its `--config.key=value` overrides loads and lays out on the 8
fake CPU devices (mesh, batch split, abstract model and optimiser state: tests/test_config_presets.py's
lay_out); launch scripts are checked by `bash -n` and their arguments by the trainer's parser they forward
to; pip commands by pip's parser, their files, extras and the versions the lock files pin; pytest commands by
pytest's parser and their paths. A command of any other kind fails the test, naming it, and so does a flag
spelling kept for one release (hidden from --help, or whose help says it is deprecated).

  python -m tests.test_docs_commands        # lists every command: where, run or parsed, and what was checked
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# A block that is not marked as shell holds commands when its first line starts like one of these.
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python\d*|\S*/python\d*|pip\d*|\S*/pip\d*|bash|sbatch|srun|"
                           r"export|cp|launch/\S+|\.ci/run|run\(|maejax-[\w-]+)(?:\s|$)")
SHELL_CONTROL = {"for", "do", "done", "while", "if", "then", "else", "fi", "wait"}
# Commands run exactly as written by CI (.ci/run holds them).
RUN_BY_CI = REPO / ".ci" / "run"


@dataclasses.dataclass
class Command:
    doc: str            # README.md or docs/x.md
    line: int           # 1-based line of the command's first line
    text: str           # as written (continuations joined)
    block: str          # the whole code block (for `bash -n`)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


# ---------------------------------------------------------------------------------------------- extraction

def code_blocks(text: str):
    """(first line number, language, lines, (start, end) line indices with the fences) of every fenced (also
    indented, inside lists) and indented block."""
    lines = text.split("\n")
    i, out = 0, []
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if m:
            indent, fence, lang = len(m[1]), m[2], m[3]
            j = i + 1
            while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
                j += 1
            out.append((i + 2, lang, [l[indent:] if l[:indent].strip() == "" else l for l in lines[i + 1:j]],
                        (i, j + 1)))
            i = j + 1
            continue
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            block = lines[i:j]
            while block and not block[-1].strip():
                block.pop()
            out.append((i + 1, "", [l[4:] for l in block], (i, i + len(block))))
            i = j
            continue
        i += 1
    return out


def logical_lines(block: list[str], first_line: int):
    """(line number, text) with backslash continuations and multi-line `run(...)` calls joined; comments and
    blank lines dropped."""
    i = 0
    while i < len(block):
        start, text = i, block[i].strip()
        i += 1
        if not text or text.startswith("#"):
            continue
        while text.endswith("\\") and i < len(block):
            text = text[:-1].rstrip() + " " + block[i].strip()
            i += 1
        if text.startswith("run("):
            while text.count("(") > text.count(")") and i < len(block):
                text += " " + block[i].strip()
                i += 1
        yield first_line + start, text


def extract(doc: pathlib.Path) -> list[Command]:
    commands = []
    for first, lang, block, _ in code_blocks(doc.read_text()):
        body = [l for l in block if l.strip() and not l.strip().startswith("#")]
        if lang in ("bash", "sh", "shell"):
            pass
        elif lang == "" and body and COMMAND_START.match(body[0].strip()):
            pass
        else:
            continue   # python, json, printed output, formulas
        for line, text in logical_lines(block, first):
            commands.append(Command(str(doc.relative_to(REPO)), line, text, "\n".join(block)))
    return commands


def inline_commands(doc: pathlib.Path) -> list[Command]:
    """Commands in `inline code` outside the code blocks (a span may wrap lines). A bare `python -m MODULE`
    names a program: it is checked as `python -m MODULE --help` (its parser exists and prints its help)."""
    lines = doc.read_text().split("\n")
    for *_, (start, end) in code_blocks("\n".join(lines)):
        lines[start:end] = [""] * (min(end, len(lines)) - start)
    text = "\n".join(lines)
    out = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(m[1].split())
        if not COMMAND_START.match(span) or " " not in span and not span.startswith(("launch/", ".ci/")):
            continue   # not a command, or a program named in a sentence (`pip`, `python3`)
        if re.fullmatch(r"\S*python\d* -m [\w.]+", span):
            span += " --help"
        out.append(Command(str(doc.relative_to(REPO)), text[:m.start()].count("\n") + 1, span, ""))
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in extract(doc) + inline_commands(doc)]


# ----------------------------------------------------------------------------------------- tokenising

def tokens_of(text: str) -> list[str]:
    """Shell words of a documented command: `[--optional flag]` brackets dropped (the flag is checked too),
    `a|b` alternatives reduced to the first, the `N` placeholder of counts made a number, redirections,
    a trailing `&` and `; wait` dropped."""
    text = re.sub(r"(?<=[=\s])N(?=[\s,\]]|$)", "2", text)
    words, skip = [], False
    for w in shlex.split(text, comments=True):
        if skip or re.fullmatch(r"\d?>>?", w):     # `> FILE`: the operator and its file
            skip = not skip
            continue
        if w.startswith("[-"):
            w = w[1:]
        if w.endswith("]") and "[" not in w:
            w = w[:-1]
        if "|" in w and not w.startswith("-"):
            w = w.split("|")[0]
        if w in ("&", "&&") or re.match(r"^\d?>", w):
            continue
        words.append(w.rstrip(";&"))
    return [w for w in words if w]


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, _, v = words[0].partition("=")
        env[k] = v
        words = words[1:]
    return env, words


# ------------------------------------------------------------------------------------------- checking

@dataclasses.dataclass
class Check:
    kind: str = ""                  # "run" (as written, by CI) | "parsed"
    done: list[str] = dataclasses.field(default_factory=list)      # what was checked, one line each
    parse: list[tuple[str, str, list[str]]] = dataclasses.field(default_factory=list)  # (how, target, argv)
    configs: list[list[str]] = dataclasses.field(default_factory=list)  # argvs whose --config to lay out
    error: str = ""


def console_scripts() -> dict[str, str]:
    path = REPO / "pyproject.toml"
    if not path.exists():
        return {}
    return tomllib.loads(path.read_text()).get("project", {}).get("scripts", {})


def plan(cmd: Command) -> Check:
    """What to check for a command, from its words; the parser runs happen later (one subprocess)."""
    c = Check()
    words = tokens_of(cmd.text)
    if words and words[0] in SHELL_CONTROL:     # `for i in 0 1; do` / `done; wait`: shell around commands
        c.kind, c.done = "parsed", ["shell control line, the block passes bash -n"]
        check_block_syntax(cmd, c)
        return c
    env, words = split_env(words)
    if env:
        c.done.append(f"environment {sorted(env)}")
    plan_words(words, cmd, c)
    return c


def plan_words(words: list[str], cmd: Command, c: Check) -> None:
    head = words[0] if words else ""
    name = os.path.basename(head)
    if head == "run(" or cmd.text.startswith("run("):
        return plan_device_run(cmd.text, cmd, c)
    if re.fullmatch(r"python\d*(\.\d+)?", name) and words[1:2] == ["-m"] and len(words) > 2:
        module, argv = words[2], words[3:]
        if module == "pytest":
            return plan_pytest(argv, cmd, c)
        if module == "pip":
            return plan_pip(argv, c)
        c.kind = "parsed"
        c.parse.append(("module", module, argv))
        c.configs.append(argv)
        return
    if re.fullmatch(r"pip\d*", name):
        return plan_pip(words[1:], c)
    if head in console_scripts():
        c.kind = "parsed"
        c.parse.append(("entry", console_scripts()[head], words[1:]))
        c.configs.append(words[1:])
        return
    if head == "export":
        return plan_export(words[1:], c)
    if head == "cp":
        return plan_cp(words[1:], c)
    if head in ("bash", "sbatch", "srun"):
        options = []
        rest = words[1:]
        while rest and rest[0].startswith("-"):
            options.append(rest.pop(0))
        if options:
            c.done.append(f"{head}'s own options {options} are not checked here")
        if head == "srun":
            return plan_words(rest, cmd, c)
        return plan_script(rest[0] if rest else "", rest[1:], c, cmd.block)
    if head.startswith(("launch/", ".ci/")):
        return plan_script(head, words[1:], c, cmd.block)
    c.error = f"neither run nor parsed: no checker for a command starting {head!r}"


def check_block_syntax(cmd: Command, c: Check) -> None:
    r = subprocess.run(["bash", "-n"], input=cmd.block, capture_output=True, text=True)
    if r.returncode:
        c.error = f"the code block is not valid shell (bash -n): {r.stderr.strip()}"


def plan_device_run(text: str, cmd: Command, c: Check) -> None:
    """`run(command="...", carry=[...], timeout_s=...)`: the device tool's call; its command is checked."""
    call = ast.parse(text).body[0].value
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    c.done.append(f"device tool call run(...) with {sorted(kwargs)}")
    inner = Command(cmd.doc, cmd.line, kwargs["command"].replace("$OUT", "/tmp/out"), cmd.block)
    plan_words(split_env(tokens_of(inner.text))[1], inner, c)


def plan_script(script: str, argv: list[str], c: Check, block: str = "") -> None:
    """A launch script: exists, passes `bash -n`; the arguments it forwards (`-m MODULE "$@"`) are parsed by
    MODULE's parser, after the ones it takes itself (positional counts, `--`, a subcommand). A script named
    in a sentence (inline, no arguments: `block` empty) is checked to exist and pass `bash -n`."""
    path = REPO / script
    if not path.is_file():
        c.error = f"script {script} does not exist"
        return
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if r.returncode:
        c.error = f"{script} fails bash -n: {r.stderr.strip()}"
        return
    src = path.read_text()
    c.kind = "parsed"
    c.done.append(f"{script} passes bash -n")
    if script == str(RUN_BY_CI.relative_to(REPO)) or not argv and not block:   # named in a sentence
        return
    branches = dict(re.findall(r"^\s*([a-z]+)\)\n(.*?);;", src, re.M | re.S))   # `case "$1" in NAME) ... ;;`
    if branches:
        if not argv or argv[0] not in branches:
            c.error = f"{script}: {argv[:1]} is not one of its subcommands {sorted(branches)}"
            return
        c.done.append(f"{script} has subcommand {argv[0]}")
        if '"$@"' not in branches[argv[0]]:
            return   # its own arguments (e.g. `create TYPE`), not forwarded
        src, argv = branches[argv[0]], argv[1:]
    forward = re.search(r"-m ([\w.]+) (?:\"\$@\"|\$\(printf '%q ' \"\$@\"\))", src)
    if not forward:
        if argv:
            c.error = f"{script} forwards no arguments (no `-m MODULE \"$@\"`), but the command gives {argv}"
        return
    shifted = re.search(r"shift (\d+)", src)
    if shifted:   # local_processes.sh N DEVICES_PER_PROCESS -- ARGS
        count = int(shifted[1])
        if len(argv) < count or not all(a.isdigit() for a in argv[:count]):
            c.error = f"{script} takes {count} counts before its arguments, got {argv[:count]}"
            return
        argv = argv[count:]
        if argv[:1] == ["--"]:
            argv = argv[1:]
    c.done.append(f"{script} forwards its arguments to python -m {forward[1]}")
    c.parse.append(("module", forward[1], argv))
    c.configs.append(argv)


def plan_export(assignments: list[str], c: Check) -> None:
    """`export NAME=VALUE`: every NAME is read by a launch script."""
    scripts = "\n".join(p.read_text() for p in (REPO / "launch").glob("*.sh"))
    for a in assignments:
        name = a.partition("=")[0]
        if not re.search(rf"\$\{{?{name}\b", scripts):
            c.error = f"export {name}: no launch script reads ${name}"
            return
    c.kind = "parsed"
    c.done.append(f"launch scripts read {[a.partition('=')[0] for a in assignments]}")


def plan_cp(argv: list[str], c: Check) -> None:
    sources = [a for a in argv if not a.startswith("-")][:-1]
    for s in sources:
        p = (REPO / s).resolve()
        if not p.exists():
            if "shared" in p.parts and not (REPO.parent / "shared").exists():
                c.done.append(f"{s}: the shared/ reference data is absent here")
                continue
            c.error = f"cp: {s} does not exist"
            return
        c.done.append(f"{s} exists")
    c.kind = "parsed"


def locked_versions() -> dict[str, set[str]]:
    """Package -> the versions pinned with == in the lock files (requirements*.txt): one, or more where an
    optional environment pins another (requirements-newjax.txt: the newest jax)."""
    out: dict[str, set[str]] = {}
    for path in REPO.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
            if m:
                out.setdefault(canonical(m[1]), set()).add(m[3])
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plan_pip(argv: list[str], c: Check) -> None:
    """pip install: pip's own parser takes the options; -r files exist; local paths are projects with the
    extras named; a requirement pinned in a lock file must allow a version that a lock file pins."""
    from packaging.requirements import Requirement
    from pip._internal.commands import create_command
    if argv[:1] != ["install"]:
        c.error = f"pip {argv[:1]}: only `pip install` is checked"
        return
    try:
        options, args = create_command("install").parse_args(argv[1:])
    except SystemExit as e:
        c.error = f"pip install rejects {argv[1:]} (exit {e.code})"
        return
    locked = locked_versions()
    for f in options.requirements:
        if not (REPO / f).is_file():
            c.error = f"pip install -r {f}: no such file"
            return
        c.done.append(f"-r {f} exists")
    for target in list(options.editables) + args:
        path, _, extras = target.partition("[")
        if path in (".", "./") or path.startswith(("./", "/")):
            pyproject = REPO / path / "pyproject.toml"
            if not pyproject.is_file():
                c.error = f"pip install {target}: {pyproject.relative_to(REPO)} does not exist"
                return
            defined = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
            missing = [e for e in extras.rstrip("]").split(",") if e and e not in defined]
            if missing:
                c.error = f"pip install {target}: pyproject.toml has no extra {missing} (has {sorted(defined)})"
                return
            c.done.append(f"{target}: pyproject.toml with extras {extras.rstrip(']') or 'none'}")
            continue
        req = Requirement(target)
        pins = sorted(locked.get(canonical(req.name), ()))
        allowed = [v for v in pins if not req.specifier or req.specifier.contains(v, prereleases=True)]
        if pins and not allowed:
            c.error = (f"pip install {target}: the lock files pin {req.name}=={' or '.join(pins)}, which "
                       f"{req.specifier} excludes")
            return
        c.done.append(f"{target}: a requirement" + (f" that allows the locked {' and '.join(allowed)}" if pins else
                                                     " (not in the lock files)"))
    c.kind = "parsed"


def plan_pytest(argv: list[str], cmd: Command, c: Check) -> None:
    """pytest: its own parser takes the options; every path exists. The whole suite is run by CI."""
    from _pytest.config import get_config
    try:
        ns = get_config()._parser.parse(argv)
    except (pytest.UsageError, SystemExit) as e:
        c.error = f"pytest rejects {argv}: {e}"
        return
    missing = [p for p in ns.file_or_dir if not (REPO / p.partition("::")[0]).exists()]
    if missing:
        c.error = f"pytest: no such test path {missing}"
        return
    c.kind = "parsed"
    c.done.append(f"pytest's parser takes {argv}; the paths exist")
    words = tokens_of(cmd.text)
    ci = [" ".join(tokens_of(l)) for l in RUN_BY_CI.read_text().splitlines() if l.strip() and l[0] != "#"]
    if " ".join(words) in ci:
        c.kind = "run"
        c.done.append("run as written by .ci/run")


# -------------------------------------------------------------------- parsers, in one child process

class _Parsed(BaseException):
    """Raised by the patched parsers right after they accepted a command line (BaseException: a module's
    `except Exception` does not catch it)."""


def parse_in_child(jobs: list[tuple[str, str, list[str]]]) -> list[dict]:
    """Runs `_child_main` in a fresh interpreter (absl's flags are global, and modules' __main__ blocks set
    things up): each job's module or console entry point runs as `python -m` runs it, and its argparse
    parser or absl flags stop it right after parsing."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    for k in [k for k in env if k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                                              "MAEJAX_DISTRIBUTED", "MEGASCALE"))]:
        del env[k]
    r = subprocess.run([sys.executable, "-c", "from tests.test_docs_commands import _child_main; _child_main()"],
                       input=json.dumps(jobs), capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(f"the parser process failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child_main() -> None:
    import argparse
    import contextlib
    import importlib
    import io
    import runpy

    from absl import app, flags

    from maejax import config as config_lib, flags as flags_lib

    jobs = json.loads(sys.stdin.read())
    FLAGS = flags.FLAGS
    state = {"depth": 0, "deprecated": []}
    original = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, app.run)

    def deprecated(help_text) -> bool:   # the spellings kept for one release: hidden, or said to be deprecated
        return help_text == argparse.SUPPRESS or str(help_text or "").lower().startswith("deprecated")

    def argparse_deprecated(parser, argv) -> None:
        hidden = {}
        todo = [parser]
        while todo:
            p = todo.pop()
            for action in p._actions:
                if deprecated(action.help):
                    hidden.update(dict.fromkeys(action.option_strings, True))
                if isinstance(action, argparse._SubParsersAction):
                    todo += list(action.choices.values())
        state["deprecated"] += [a.partition("=")[0] for a in argv if a.partition("=")[0] in hidden]

    def parse_args(self, args=None, namespace=None):
        state["depth"] += 1
        try:
            original[0](self, args, namespace)
        finally:
            state["depth"] -= 1
        argparse_deprecated(self, sys.argv[1:] if args is None else args)
        raise _Parsed(f"argparse parser {self.prog!r}")

    def parse_known_args(self, args=None, namespace=None):
        if state["depth"]:
            return original[1](self, args, namespace)
        _, extra = original[1](self, args, namespace)
        argparse_deprecated(self, sys.argv[1:] if args is None else args)
        raise _Parsed(f"argparse parser {self.prog!r}; passed on unparsed: {extra}")

    def run(main, argv=None, flags_parser=None, **_):
        argv = sys.argv if argv is None else argv
        try:
            FLAGS(argv)
        except SystemExit:   # absl's --help prints the flags and exits 1
            if "--help" in argv:
                raise _Parsed("absl flags: printed its --help") from None
            raise
        names = [a[2:].partition("=")[0] for a in argv[1:] if a.startswith("--")]
        state["deprecated"] += [f"--{n}" for n in names if n in FLAGS and deprecated(FLAGS[n].help)]
        raise _Parsed(f"absl flags ({len(list(FLAGS))} defined)")

    app.define_help_flags()   # what app.run defines before parsing; kept across jobs

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    app.run = run
    # said before parsing: by the override flags (maejax.config) and the old spellings (maejax.flags's parser)
    config_lib.deprecated_flag = flags_lib.deprecated_flag = lambda old, new: state["deprecated"].append(old)
    results = []
    for how, target, argv in jobs:
        before = set(FLAGS)
        stderr = io.StringIO()
        result = {"ok": False}
        state["deprecated"] = []
        sys.argv = [target, *argv]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                if how == "module":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    module, _, func = target.partition(":")
                    getattr(importlib.import_module(module), func)()
            result["error"] = "ran to the end without parsing its command line"
        except _Parsed as p:
            result = {"ok": True, "parser": str(p)}
            if state["deprecated"]:
                result = {"ok": False, "error": f"uses deprecated flags {sorted(set(state['deprecated']))}: write the "
                                                f"current spelling (see the command's --help)"}
        except ModuleNotFoundError as e:
            result["error"] = f"ModuleNotFoundError: {e}"
            result["missing"] = (e.name or "").split(".")[0]
        except flags.Error as e:
            result["error"] = f"{type(e).__name__}: {e}"
        except SystemExit as e:
            lines = [l for l in stderr.getvalue().strip().splitlines() if l.strip()]
            if e.code in (0, None) and "--help" in argv:
                result = {"ok": True, "parser": "argparse parser: printed its --help"}
            else:
                result["error"] = f"exit {e.code}: {lines[-1] if lines else e.code}"
        except Exception as e:   # noqa: BLE001 - reported, names the command
            result["error"] = f"{type(e).__name__}: {e}"
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)
        FLAGS.unparse_flags()
        results.append(result)
    print(json.dumps(results))


def optional_modules() -> set[str]:
    """Top-level modules of pyproject.toml's extras (optional dependencies): absent ones skip, not fail."""
    path = REPO / "pyproject.toml"
    extras = tomllib.loads(path.read_text())["project"].get("optional-dependencies", {}) if path.exists() else {}
    from packaging.requirements import Requirement
    return {canonical(Requirement(r).name).replace("-", "_") for reqs in extras.values() for r in reqs}


def config_runs(argv: list[str]) -> list[tuple[str, dict[str, str]]]:
    """The configs a command line runs: `--config SPEC` (or `--config=SPEC`) with its `--config.key=value`
    overrides; each `--compare` (benchmarks.train_throughput) starts a further run with the overrides after
    it on top of the first run's."""
    spec, runs = None, [{}]
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif a.startswith("--config="):
            spec = a.partition("=")[2]
        elif a == "--compare":
            runs.append(dict(runs[0]))
        elif a.startswith("--config."):
            key, _, value = a[len("--config."):].partition("=")
            for run in runs[-1:] if len(runs) > 1 else runs:
                run[key] = value
    return [(spec, overrides) for overrides in runs] if spec else []


# --------------------------------------------------------------------------------------------- tests

COMMANDS = all_commands()


def check_all() -> list[Check]:
    """Every command of COMMANDS planned, then every parser run in one child process."""
    checks = [plan(c) for c in COMMANDS]
    jobs = [(key, job) for key, c in enumerate(checks) if not c.error for job in c.parse]
    results = parse_in_child([tuple(job) for _, job in jobs]) if jobs else []
    optional = optional_modules()
    for (key, (how, target, argv)), r in zip(jobs, results):
        c = checks[key]
        if r["ok"]:
            c.done.append(f"{target}: {r['parser']} takes {argv}")
        elif r.get("missing") in optional:
            c.kind, c.error = "skip", f"{target} needs the optional {r['missing']}, not installed here"
        else:
            c.error = f"{target} {argv}: {r['error']}"
    return checks


def lay_out_configs(c: Check) -> None:
    """Each `--config` of the command (with its overrides) loads and lays out on the 8 fake devices. A config
    that names a GPU or TPU attention kernel (model.attention) is laid out with XLA attention: the kernels
    do not build on a CPU, and the shapes and shardings are the same."""
    import jax

    from maejax import config as config_lib
    from tests.test_config_presets import lay_out
    for spec, overrides in [run for argv in c.configs for run in config_runs(argv)]:
        config = config_lib.load(str(REPO / spec), overrides)
        note = ""
        if config.model.attention not in (None, "xla"):
            note = f", with XLA attention for model.attention={config.model.attention}"
            config = config_lib.load(str(REPO / spec), {**overrides, "model.attention": "None"})
        mesh, cuts, _ = lay_out(config, jax.devices())
        c.done.append(f"config {spec} {overrides or ''} lays out on mesh {dict(mesh.shape)}"
                      + (f" (cut: {cuts})" if cuts else "") + note)


@pytest.fixture(scope="module")
def checked() -> list[Check]:
    return check_all()


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c.where for c in COMMANDS])
def test_docs_command_is_run_or_parsed_and_checked(index, checked):
    cmd, c = COMMANDS[index], checked[index]
    if c.kind == "skip":
        pytest.skip(c.error)
    assert not c.error, f"{cmd.where}: {cmd.text}\n{c.error}"
    assert c.kind in ("run", "parsed"), f"{cmd.where}: {cmd.text}: neither run nor parsed"
    lay_out_configs(c)


def test_commands_are_found_in_every_kind_of_block():
    """Fenced blocks (also indented inside lists) and indented blocks, with continuations joined."""
    md = ("Text\n\n```bash\npython -m a --x 1 \\\n    --y 2   # comment\n```\n\n- item\n\n  ```bash\n"
          "  for i in 0 1; do\n    python -m b &\n  done; wait\n  ```\n\nSee:\n\n    launch/x.sh --z\n\n"
          "```\nfeatures  block\n```\n\n```python\nfrom a import b\n```\n")
    blocks = code_blocks(md)
    assert [(line, lang) for line, lang, *_ in blocks] == [(4, "bash"), (11, "bash"), (18, ""), (21, ""), (25, "python")]
    assert [b[3] for b in blocks] == [(2, 6), (9, 14), (17, 18), (19, 22), (23, 26)]
    assert list(logical_lines(blocks[0][2], blocks[0][0])) == [(4, "python -m a --x 1 --y 2   # comment")]
    assert tokens_of("python -m a --x 1 --y 2   # comment") == ["python", "-m", "a", "--x", "1", "--y", "2"]
    assert tokens_of("p [--blocks all|1,12] [--step N] > log 2>&1 &") == ["p", "--blocks", "all", "--step", "2"]
    assert COMMAND_START.match("launch/x.sh --z") and not COMMAND_START.match("features  block")


def test_each_compare_run_gets_the_first_runs_overrides_and_its_own():
    argv = ["--config", "c.py:preset=x", "--config.data.batch_size=64", "--compare", "--config.model.remat=none",
            "--config.data.batch_size=32", "--compare", "--config.model.attention=None"]
    assert config_runs(argv) == [("c.py:preset=x", {"data.batch_size": "64"}),
                                 ("c.py:preset=x", {"data.batch_size": "32", "model.remat": "none"}),
                                 ("c.py:preset=x", {"data.batch_size": "64", "model.attention": "None"})]


def test_a_command_of_no_known_kind_fails():
    c = plan(Command("x.md", 1, "make all", ""))
    assert c.error.startswith("neither run nor parsed") and not c.kind


def test_a_flag_the_parser_does_not_have_fails():
    """The parsers are the real ones: an unknown flag, an unknown config key and a deprecated spelling are
    refused."""
    results = parse_in_child([("module", "eval.map_benchmark", ["--embeddings", "f", "--perturbation_col", "g",
                                                                 "--control", "c", "--out", "o", "--no_such_flag", "1"]),
                              ("module", "maejax.train", ["--config", "configs/mae_synthetic.py:preset=tiny",
                                                          "--workdir", "w", "--config.optim.lrr=1"]),
                              ("module", "maejax.train", ["--config", "configs/mae_synthetic.py:preset=tiny",
                                                          "--workdir", "w"]),
                              ("module", "eval.job", ["--workdir", "w", "--eval", "probe_model=logistic"]),
                              ("module", "eval.map_benchmark", ["--features", "f", "--perturbation_col", "g",
                                                                 "--control", "c", "--out", "o"])])
    assert not results[0]["ok"] and "--no_such_flag" in results[0]["error"]
    assert not results[1]["ok"] and "optim.lrr" in results[1]["error"]
    assert results[2]["ok"], results[2]
    # a spelling kept for one release (hidden from --help, or its help says deprecated) is refused too
    assert not results[3]["ok"] and "--eval" in results[3]["error"]
    assert not results[4]["ok"] and "--features" in results[4]["error"]   # an old spelling (maejax.flags)


def main() -> None:
    """Lists every command with its kind and checks (runs the same checks as the tests, without pytest)."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    checks = check_all()
    for cmd, c in zip(COMMANDS, checks):
        if not c.error and c.kind != "skip":
            try:
                lay_out_configs(c)
            except Exception as e:   # noqa: BLE001 - listed as the failure
                c.error = f"{type(e).__name__}: {e}"
        status = "FAIL" if c.error and c.kind != "skip" else c.kind
        print(f"{cmd.where:28s} {status:7s} {cmd.text[:110]}")
        for d in ([c.error] if c.error else []) + c.done:
            print(f"{'':37s}{d}")
    counts = {k: sum(1 for c in checks if (c.kind if not c.error or c.kind == "skip" else "FAIL") == k)
              for k in ("run", "parsed", "skip", "FAIL")}
    print(counts)


if __name__ == "__main__":
    main()
