"""circuitsae installs into a researcher's own environment: ranges, not pins, and a wheel that works alone.

The wheel is built from a copy of the source (PEP 517, setuptools, offline), installed with ``--no-deps`` into a
fresh virtual environment that sees this one's packages through a ``.pth`` line (the dependencies are not
copied) but not the repository, and ``circuitsae --help`` and a tiny-model harvest run from a folder outside it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HARVEST = ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "resid.1", "--tokens", "1000", "--ctx-len",
           "16", "--shard-contexts", "20", "--corpus", "sotu", "--out", "acts"]  # fmt: skip
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def test_dependencies_are_ranges_that_hold_the_tested_pins():
    project, pins = _project(), _pins()
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for r in reqs:
        assert r.specifier, f"{r.name} has no lower bound"
        assert not any(s.operator in ("==", "===", "~=") for s in r.specifier), f"{r} is a pin, not a range"
        assert any(s.operator in (">=", ">") for s in r.specifier), f"{r} has no lower bound"
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name != "torch":  # constraints.txt leaves torch to the Makefile (the CPU wheel, or a CUDA build kept)
            assert name in pins, f"{r.name} is not pinned in constraints.txt: nothing tests it"
            assert r.specifier.contains(pins[name]), f"{r} excludes the tested {r.name}=={pins[name]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "circuitsae", src / "circuitsae", ignore=SKIP)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (whl,) = (tmp / "dist").glob("circuitsae-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_the_entry_point(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "circuitsae").rglob("*") if p.is_file()}
    source = {s for s in source if "__pycache__" not in s and not s.endswith(".pyc")}
    assert source <= names, f"missing from the wheel: {sorted(source - names)}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "tutorials/"))]
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "circuitsae = circuitsae.commands.cli:main" in zipfile.ZipFile(wheel).read(info).decode()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not re.search(r"^Requires-Dist: [^;]*==", meta, re.M), "the wheel pins a dependency exactly"


def test_the_wheel_installs_and_runs_without_the_repository(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout + inst.stderr
    # the dependencies from this environment, read in place; its own .pth files (the editable install of the
    # repository) are not processed for a folder named in a .pth line
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "_circuitsae_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONNOUSERSITE="1")

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    where = run(str(py), "-c", "import circuitsae, json, sys; print(json.dumps([circuitsae.__file__, sys.path]))")
    module, path = json.loads(where)
    assert Path(module).resolve().is_relative_to(env_dir.resolve()), f"circuitsae imported from {module}"
    assert ROOT not in [Path(p or work).resolve() for p in path], "the repository is on the new environment's path"
    # the installed distribution's requirements are met by what it sees (what pip check would say of circuitsae)
    run(str(py), "-c", _REQUIREMENTS_MET)
    cli = env_dir / "bin" / "circuitsae"
    assert "harvest" in run(str(cli), "--help")
    said = run(str(cli), *HARVEST)
    assert "ActivationStore" in said and (work / "acts" / "meta.json").is_file()
    assert list((work / "acts").glob("train-*.resid.1.npy"))


_REQUIREMENTS_MET = """
from importlib.metadata import distribution, version
from packaging.requirements import Requirement
bad = []
for line in distribution("circuitsae").requires:
    r = Requirement(line)
    if r.marker is None and not r.specifier.contains(version(r.name), prereleases=True):
        bad.append(f"{r} but {version(r.name)}")
assert not bad, bad
"""
