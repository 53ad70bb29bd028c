"""maejax installs with pip: pyproject.toml's ranges hold the lock (requirements.txt), every import is declared,
and `pip install -e .[dev]` gives working console commands in a fresh virtual environment (offline)."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SHIPPED = ("maejax", "data", "eval", "configs")      # [tool.setuptools.packages.find] include
NOT_SHIPPED = ("launch", "benchmarks")               # read from the checkout
# Declared but imported by nobody in SHIPPED, and why.
NOT_IMPORTED = {
    "numba": "cp-measure's accelerator: cp-measure imports it",
    "pytest": "dev: the test runner",
    "setuptools": "dev: builds the editable install offline (this file)",
}
# Imported modules whose distribution may be absent here (optional extras), by module name.
OPTIONAL_IMPORTS = {"torch": "torch", "apache_beam": "apache-beam", "wandb": "wandb"}


def _requirements(text_lines) -> list[Requirement]:
    return [Requirement(line) for line in text_lines]


def _lock(*files: str) -> dict[str, str]:
    """name -> pinned version of requirements files (`-r` lines followed)."""
    pins = {}
    for name in files:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                pins.update(_lock(line[3:].strip()))
            elif line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == "==", f"{name}: {line} is not an exact pin"
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def _declared(*extras: str) -> list[Requirement]:
    """The dependencies and those of `extras` (default: every extra), without maejax's own extras."""
    optional = PROJECT["optional-dependencies"]
    reqs = _requirements(PROJECT["dependencies"])
    reqs += [r for name in (extras or optional) for r in _requirements(optional[name])]
    return [r for r in reqs if canonicalize_name(r.name) != PROJECT["name"]]


# What launch/setup.sh installs from the lock files: the dependencies and these extras.
LOCKED_EXTRAS = ("cellprofiler", "dev")


def test_the_lock_pins_a_version_inside_every_declared_range():
    lock = _lock("requirements.txt", "requirements-dev.txt")
    wanted = _declared(*LOCKED_EXTRAS)
    outside = {r.name: lock.get(canonicalize_name(r.name)) for r in wanted
               if lock.get(canonicalize_name(r.name)) not in r.specifier}
    assert not outside, f"pinned outside pyproject.toml's range (None: not pinned): {outside}"


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of SHIPPED importing it (absolute imports not of the stdlib or SHIPPED)."""
    found: dict[str, set[str]] = {}
    for package in SHIPPED:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top not in sys.stdlib_module_names and top not in SHIPPED:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared_and_every_declared_package_is_imported():
    by_module = importlib.metadata.packages_distributions()
    imported = {}
    for module, files in _third_party_imports().items():
        dists = by_module.get(module) or [OPTIONAL_IMPORTS.get(module, f"<unknown distribution of {module}>")]
        imported[canonicalize_name(dists[0])] = sorted(files)
    declared = {canonicalize_name(r.name) for r in _declared()}
    undeclared = {d: files for d, files in imported.items() if d not in declared}
    assert not undeclared, f"imported, not in pyproject.toml's dependencies or extras: {undeclared}"
    unused = sorted(set(declared) - set(imported) - set(NOT_IMPORTED))
    assert not unused, f"declared in pyproject.toml, imported nowhere in {SHIPPED}: {unused}"


def test_every_pin_of_the_lock_is_needed_by_a_declared_dependency():
    """The lock holds the declared dependencies and what they need (installed metadata, extras followed):
    nothing pinned that nothing imports or requires (as chex and einops once were)."""
    todo = _declared(*LOCKED_EXTRAS)
    needed: dict[str, set[str]] = {}
    not_installed = []
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in needed and set(req.extras) <= needed[name]:
            continue
        needed.setdefault(name, set()).update(req.extras)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            not_installed.append(name)
            continue
        for sub in _requirements(requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in needed[name] or {""}):
                todo.append(sub)
    lock = _lock("requirements.txt", "requirements-dev.txt")
    unknown = sorted(set(not_installed) & set(lock))
    assert not unknown, f"pinned but not installed here, so what they need is unknown: {unknown}"
    unneeded = sorted(set(lock) - set(needed))
    assert not unneeded, f"the lock pins what no declared dependency needs: {unneeded}"


def test_setup_script_reinstalls_when_any_file_it_installs_from_changes():
    """launch/setup.sh's stamp hashes every file it installs from (`-r FILE`, `-e .` = pyproject.toml), and it
    installs the dev requirements, so README's test command works in the .venv it makes."""
    script = (REPO / "launch" / "setup.sh").read_text()
    installs = set(re.findall(r"-r (\S+)", script)) | ({"pyproject.toml"} if "-e ." in script else set())
    (stamp_line,) = [line for line in script.splitlines() if line.startswith("want=")]
    assert installs == set(re.findall(r"(\S+\.(?:txt|toml))", stamp_line))
    assert {"requirements.txt", "requirements-dev.txt", "requirements-nodeps.txt", "pyproject.toml"} <= installs


def _setuptools_builds_offline() -> str | None:
    """Why this environment cannot build the editable wheel without an index (None: it can). Asked in a
    fresh interpreter: importing setuptools here, after another test has imported the standard library's
    distutils, trips setuptools' distutils override (an AssertionError in _distutils_hack)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util, setuptools; "
                               "print(setuptools.__version__, importlib.util.find_spec('wheel') is not None)"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return ("setuptools does not import here (requirements-dev.txt pins it; run launch/setup.sh): "
                + (probe.stderr.strip().splitlines() or ["no output"])[-1])
    version, has_wheel = probe.stdout.split()
    major, minor = (int(v) for v in version.split(".")[:2])
    if (major, minor) < (70, 1) and has_wheel != "True":
        return (f"setuptools {version} builds wheels only with the `wheel` package "
                f"(requirements-dev.txt pins a newer setuptools; run launch/setup.sh)")
    return None


COMMANDS = {   # command line -> what its output must hold (each runs outside the checkout)
    ("maejax-train", "--help"): "--workdir",
    ("maejax-eval", "--help"): "--workdir",
    ("maejax-map-benchmark", "--help"): "--perturbation_col",
    ("maejax-convert", "--help"): "openphenom",
    ("maejax-build-dataset", "--help"): "rxrx1, rxrx3_core, jump_cp, generic, synthetic",
    ("maejax-build-dataset", "rxrx1", "--help"): "usage: maejax-build-dataset rxrx1",
}


def test_editable_install_into_a_fresh_venv_gives_commands_that_run_outside_the_checkout(tmp_path):
    """Slow (~20-40 s): a new venv on top of this environment's packages (a .pth line, so nothing is
    downloaded), `pip install --no-index --no-build-isolation --no-deps -e .[dev]` into it, then every
    console command's --help from a directory outside the checkout; configs/ ships, launch/ and benchmarks/
    do not. pip resolving the ranges themselves is test_the_lock_pins_a_version_inside_every_declared_range."""
    if (why := _setuptools_builds_offline()) is not None:
        pytest.skip(why)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not installed in this environment")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This environment's packages, as plain path entries: its own .pth files (an editable maejax from
    # launch/setup.sh) stay out, so the commands below import what this install maps.
    here = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "_maejax_test_env.pth").write_text("".join(f"{p}\n" for p in here))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
         "--no-build-isolation", "--no-deps", "-e", f"{REPO}[dev]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    runs = {cmd: subprocess.Popen([bin_dir / cmd[0], *cmd[1:]], cwd=outside, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for cmd in COMMANDS}
    where = subprocess.run(
        [python, "-c", "import importlib.util as u, configs.scaling as s; print(s.__file__); "
                       f"print([m for m in {NOT_SHIPPED!r} if u.find_spec(m)])"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    for cmd, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        assert COMMANDS[cmd] in out, f"{' '.join(cmd)} (exit {proc.returncode}):\n{out[-2000:]}"
        # argparse --help exits 0; absl's (maejax-train) exits 1 after printing, as `python -m maejax.train`.
        assert proc.returncode == (1 if cmd[0] == "maejax-train" else 0), f"{' '.join(cmd)}:\n{out[-2000:]}"
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines() == [str(REPO / "configs" / "scaling.py"), "[]"]
