"""Installs: the wheel works on its own (configs and sweep files inside it, the console scripts, a sweep run
from any directory), the dependency bounds and constraints.txt agree with what is installed, and `make setup`
installs through the constraints. (The Lightning internals the code relies on: tests/test_lightning_compat.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.wandb_records import run_files, summary

# only what a wheel is built from: no tests, no caches, no outputs of earlier runs
SOURCES = ("pyproject.toml", "README.md", "sparse_coding", "conf", "sweeps")
TINY = ["data.dim=8", "data.n=256", "data.n_val=96", "data.batch_size=64", "trainer.max_epochs=1",
        "dictionary.mult=2", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (no pip, not the repository's) with the wheel built from this checkout installed; its
    dependencies come from the project's venv through a path entry (no .pth processing there: the
    repository's editable install stays invisible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env = clean_env()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("sparse_coding-*.whl"))
    venv = tmp / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env).stdout.strip()
    (Path(site) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           str(wheel)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return venv


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "PYTHONPATH", "VIRTUAL_ENV", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "PIP_CONSTRAINT")}
    env.update(WANDB_MODE="offline", **extra)
    return env


def test_the_wheel_holds_the_configs_the_sweeps_and_the_entry_points(installed):
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import sparse_coding, sparse_coding.sweep as s, sparse_coding.paths as p;"
                            "print(sparse_coding.__file__); print(p.config_dir()); print(s.sweeps_dir())"],
                           capture_output=True, text=True, cwd=installed, env=clean_env(), timeout=120)
    assert where.returncode == 0, where.stderr
    package, conf, sweeps = (Path(line) for line in where.stdout.split())
    assert installed in package.parents and ROOT not in package.parents  # the wheel's copy, not the checkout
    assert conf == package.parent / "conf" and (conf / "train.yaml").is_file()
    assert sweeps == package.parent / "sweeps"
    assert sorted(p.name for p in sweeps.glob("*.yaml")) == sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml"))
    assert (package.parent / "__main__.py").is_file() and (package.parent / "lightning_compat.py").is_file()
    # every module of the checkout, sub-packages included (pyproject.toml lists the packages by name)
    source = {p.relative_to(ROOT / "sparse_coding").as_posix() for p in (ROOT / "sparse_coding").rglob("*.py")}
    shipped = {p.relative_to(package.parent).as_posix() for p in package.parent.rglob("*.py")}
    assert source <= shipped, sorted(source - shipped)
    for script in ("sparse-coding-train", "sparse-coding-sweep", "sparse-coding-cache", "sparse-coding-experiments",
                   "sparse-coding-features"):
        assert (installed / "bin" / script).is_file(), script
    cache_cli = subprocess.run([str(installed / "bin" / "sparse-coding-cache"), "verify", str(installed / "none")],
                               capture_output=True, text=True, cwd=installed, env=clean_env(), timeout=120)
    assert cache_cli.returncode == 2 and cache_cli.stderr.strip() == f"error: {installed / 'none'}: not a cache folder"
    # the features script reaches sparse_coding.features:main (its own one-line answer, not an import error)
    features = subprocess.run([str(installed / "bin" / "sparse-coding-features"), str(installed / "none")],
                              capture_output=True, text=True, cwd=installed, env=clean_env(), timeout=120)
    assert features.returncode == 2 and len(features.stderr.strip().splitlines()) == 1, features.stderr
    assert features.stderr.startswith("error: ") and "does not exist" in features.stderr, features.stderr


def test_a_named_sweep_runs_from_any_directory_after_installing_the_wheel(installed, tmp_path):
    """`sparse-coding-sweep NAME` finds the packaged YAML, its runs start `python -m sparse_coding` in the
    current directory, log offline to W&B, and the sweep says how to upload them."""
    sweep = [str(installed / "bin" / "sparse-coding-sweep"), "synthetic_active", "--count", "1", "--name", "wheel",
             "--out", str(tmp_path / "out")]
    listed = subprocess.run([*sweep[:2], "--dry-run"], capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[1:4] == [str(installed / "bin" / "python"), "-m", "sparse_coding"]
    proc = subprocess.run([*sweep, "--", *TINY], capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
                          timeout=400)
    run_dir = tmp_path / "out" / "wheel" / "run-0"
    log = (tmp_path / "out" / "wheel" / "run-0.log")
    assert proc.returncode == 0, proc.stderr[-2000:] + (log.read_text()[-3000:] if log.is_file() else "")
    record = json.loads((tmp_path / "out" / "wheel" / "sweep.json").read_text())
    assert record["file"] == str(installed_sweeps(installed) / "synthetic_active.yaml")
    assert [r["returncode"] for r in record["runs"]] == [0] and record["runs"][0]["params"]["data.active"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dim"] == 8 and metrics["normalized_loss"] > 0
    info = summary(run_files(run_dir)[0])
    assert info["group"] == "wheel" and info["config"]["data.active"] == 2 and info["exit_code"] == 0
    assert f"upload later: wandb sync {tmp_path / 'out' / 'wheel'}/run-*/wandb/offline-run-*" in proc.stdout
    assert not (ROOT / "sweeps_out" / "wheel").exists()


def installed_sweeps(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sparse_coding.sweep as s; print(s.sweeps_dir())"],
                         capture_output=True, text=True, env=clean_env(), cwd=venv, timeout=120).stdout.strip()
    return Path(out)


def test_a_missing_sweep_and_a_failed_run_end_the_sweep_with_one_line(installed, tmp_path):
    sweep = str(installed / "bin" / "sparse-coding-sweep")
    missing = subprocess.run([sweep, "lambda_gird"], capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
                             timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "shipped: dict_size, lambda_grid" in missing.stderr
    failed = subprocess.run([sweep, "synthetic_active", "--count", "1", "--out", str(tmp_path / "out"), "--",
                             "data.dim=0"], capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=200)
    assert failed.returncode == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and "run-0 failed (exit 2: error: data.dim" in failed.stderr


# ---- dependency bounds, constraints.txt, make setup --------------------------------------


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def test_constraints_pin_every_installed_package_at_its_installed_version():
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", line  # exact versions only
            pins[req.name.lower().replace("_", "-")] = spec[0].version
    assert "sparse-coding" not in pins
    for name in ("torch", "pytorch-lightning", "wandb", "hydra-core", "numpy", "sweeps", "pytest"):
        assert name in pins, name
        installed = _version(name).split("+")[0]
        assert installed == pins[name], f"{name} {installed} installed, constraints.txt pins {pins[name]}: make lock"
    assert pins["torch"] == "2.13.0"  # the Makefile's pin


def test_the_installed_versions_satisfy_the_declared_bounds():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"],
                    *project["optional-dependencies"]["sweeps"]]
    for line in requirements:
        req = Requirement(line)
        assert req.specifier.contains(_version(req.name).split("+")[0], prereleases=True), (line, _version(req.name))
    bounds = {Requirement(r).name: str(Requirement(r).specifier) for r in requirements}
    assert bounds["pytorch-lightning"] == "<3,>=2.6"


def test_make_setup_installs_through_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [ln.strip() for ln in makefile.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs
    assert "torch==2.13.0" in installs[0]  # torch first, pinned
    assert re.search(r"^lock:", makefile, re.M)
