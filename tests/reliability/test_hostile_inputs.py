"""Hostile inputs (issue 22 items 4, 6, 9-11): each is one line on stderr starting with "error:", exit 2, no traceback.

Inputs that Hydra itself used to stop on with a stack trace (the run directory, interpolations), numbers that
passed validation and broke later (a fractional trainer.limit_train_batches, data.noise, convergence.max_minutes),
W&B names and an online run without a login, trainer.num_nodes without a launcher, a resume on other data,
crafted checkpoints, damaged or unreadable cache files, imports whose values the cache's dtype cannot hold. Every
case runs through a real subprocess of train.py (or the cache CLI); crafted checkpoints and unreadable files are
also checked in process. (data.num_workers beyond the full batches is lowered: tests/data/test_cache_datamodule.py;
a sample budget stops at the budget: tests/test_convergence.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import error_lines, import_cache
from tests.reliability.helpers import as_nobody, child_env, run_py
from sparse_coding.cache import store
from sparse_coding.errors import DataError, TrainingError
from sparse_coding.lifecycle import resume

QUICK = ["logger=none", "trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=8", "data.n=256",
         "data.n_val=64", "data.batch_size=64", "dictionary.mult=2", "trainer.max_steps=4"]


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    lines = error_lines(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr[-3000:])
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A short finished run (4 steps) whose checkpoints the resume cases start from."""
    from sparse_coding.api import compose
    from sparse_coding.run import run

    out = tmp_path_factory.mktemp("finished") / "run"
    run(compose(QUICK), out)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a 1 MiB tmpfs (root only; skipped where mounting is not allowed): yields a mounter(options)."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# --------------------------------------------------------------------------------------------
# train.py: refused before anything runs (seconds each)


def _run_dir_cases(tmp_path: Path, tmpfs) -> dict:
    (tmp_path / "a_file").write_text("x")
    ro = tmpfs("ro", "ro,size=1m")
    full = tmpfs("full", "size=1m")
    with open(full / "filler", "wb") as f:  # fill it up
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return {"file": (tmp_path / "a_file", "is an existing file, not a directory"),
            "under_a_file": (tmp_path / "a_file" / "run", "is a file, so the directory cannot be made"),
            "proc": (Path("/proc/self"), "is not writable"),
            "read_only": (ro / "run", "Read-only file system"),
            "full_disk": (full / "run", "is full")}


@pytest.mark.parametrize("case", ["file", "under_a_file", "proc", "read_only", "full_disk"])
def test_an_unusable_hydra_run_dir_is_one_line(tmp_path, tmpfs, case):
    where, expected = _run_dir_cases(tmp_path, tmpfs)[case]
    assert_one_error_line(run_py(["train.py", *QUICK, f"hydra.run.dir={where}"], timeout=120), "hydra.run.dir=", expected)


HOSTILE_VALUES = {
    "env_of_wrong_type": (["data.dim=${oc.env:HOME}"], "could not be converted to Integer"),
    "unset_env": (["data.dim=${oc.env:SPARSE_CODING_SURELY_UNSET}"], "SPARSE_CODING_SURELY_UNSET' not found"),
    "cycle": (["data.n=${data.n}"], "Recursive interpolation"),
    "noise_1e20": (["data.noise=1e20"], "data.noise=1e+20 must be at most"),
    "max_minutes_1e300": (["convergence.max_minutes=1e300"], "convergence.max_minutes=1e+300 is beyond any run"),
    "project_with_slashes": (["logger=wandb", "logger.project=a/b/c"], "logger.project='a/b/c' is not a W&B project"),
    "empty_tag": (["logger=wandb", "logger.tags=[a,'',b]"], "logger.tags: tag 1"),
    "long_tag": (["logger=wandb", f"logger.tags=[{'t' * 65}]"], "must be a text of 1 to 64 characters"),
    "num_nodes_without_launcher": (["trainer.num_nodes=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"],
                                   "trainer.num_nodes=2 needs a launcher"),
}


@pytest.mark.parametrize("case", list(HOSTILE_VALUES))
def test_a_hostile_value_is_one_line_before_the_run(tmp_path, case):
    overrides, expected = HOSTILE_VALUES[case]
    proc = run_py(["train.py", *QUICK, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert_one_error_line(proc, expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_sweep_job_with_a_broken_interpolation_is_one_line(tmp_path):
    proc = run_py(["train.py", "-m", *QUICK, "seed=0,1", "data.n=256,${oc.env:SPARSE_CODING_SURELY_UNSET}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    assert_one_error_line(proc, "not found")
    assert not (tmp_path / "sweep").exists()  # refused before the first job


# --------------------------------------------------------------------------------------------
# train.py: refused once the data are known (a full start-up each)


def test_a_fractional_limit_train_batches_that_leaves_no_batch_is_one_line(tmp_path):
    proc = run_py(["train.py", *QUICK, "trainer.limit_train_batches=0.1", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert_one_error_line(proc, "trainer.limit_train_batches=0.1 leaves no batch of the 4 training batches",
                          "use at least 0.25")


def test_wandb_online_without_a_login_is_one_line_and_does_not_wait(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(HOME=home, WANDB_API_KEY=None, WANDB_MODE=None, NETRC=None, WANDB_CONFIG_DIR=home / "wandb")
    proc = run_py(["train.py", *QUICK, "logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}"],
                  env=env, timeout=300)
    assert_one_error_line(proc, "has no API key here", "wandb login", "logger.mode=offline")


def test_a_resume_on_other_data_is_one_line_and_trains_nothing(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    proc = run_py(["train.py", *QUICK, "trainer.max_steps=20", "data.active=20", "data.seed=5", "ckpt_path=last",
                   f"hydra.run.dir={run}"], timeout=300)
    assert_one_error_line(proc, "was trained on other data (data.active: 10.0 there, 20.0 here; data.seed: 0 there, "
                                "5 here)")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == before


# --------------------------------------------------------------------------------------------
# Crafted checkpoints: one line naming the checkpoint


def _nan_phi(c):
    c["state_dict"]["phis.0"][0, 0] = float("nan")


def _negative_lambda(c):
    c["state_dict"]["lams"][:] = -1.0


def _garbage_loops(c):
    c["loops"] = "garbage"


def _no_optimizer_state(c):
    c.pop("optimizer_states")


def _zero_phi(c):
    c["state_dict"]["phis.0"][:] = 0.0


def _text_step(c):
    c["global_step"] = "x"


def _partial_adam_state(c):
    c["optimizer_states"][0]["state"] = {0: {"exp_avg": torch.zeros(3)}}


def _nan_counter(c):
    c["state_dict"]["samples_seen"] = torch.tensor(float("nan"), dtype=torch.float64)


def _history_of_numbers(c):
    c["history"] = [1, 2]


CRAFTED = {"nan_phi": (_nan_phi, "phis.0 holds NaN/Inf"), "negative_lambda": (_negative_lambda, "lambda [-1.0] is not > 0"),
           "garbage_loops": (_garbage_loops, "loops is a str"), "no_optimizer_state": (_no_optimizer_state, "no optimizer state"),
           "zero_phi": (_zero_phi, "columns are not unit-norm"), "text_step": (_text_step, "global_step='x' is not a count"),
           "partial_adam_state": (_partial_adam_state, "parameter 0 holds ['exp_avg'], Adam keeps"),
           "nan_counter": (_nan_counter, "samples_seen holds NaN/Inf"),
           "history_of_numbers": (_history_of_numbers, "history is not a list of evaluation points")}


def _crafted_run(finished_run: Path, out: Path, craft) -> Path:
    shutil.copytree(finished_run, out)
    (out / "metrics.json").unlink()  # not finished: the resume must read the checkpoint
    for path in (out / "checkpoints").glob("*.ckpt"):  # last.ckpt and the top-k copy of the same step
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        craft(ckpt)
        torch.save(ckpt, path)
    return out


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_is_one_line_naming_it(finished_run, tmp_path, case):
    from sparse_coding.api import compose_and_plan
    from sparse_coding.run import build_datamodule, build_module

    craft, expected = CRAFTED[case]
    run = _crafted_run(finished_run, tmp_path / "run", craft)
    cfg, plan = compose_and_plan([*QUICK, "trainer.max_steps=8", "ckpt_path=last"])
    dm = build_datamodule(cfg, plan)
    with pytest.raises(DataError) as e:
        resume.resume_checkpoint("last", run, build_module(cfg, plan, dm), cfg.trainer, dm)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "checkpoints" / "last.ckpt") in msg and expected in msg, msg


def test_a_crafted_checkpoint_through_train_py(finished_run, tmp_path):
    run = _crafted_run(finished_run, tmp_path / "run", _nan_phi)
    proc = run_py(["train.py", *QUICK, "trainer.max_steps=8", "ckpt_path=last", f"hydra.run.dir={run}"], timeout=300)
    assert_one_error_line(proc, str(run / "checkpoints" / "last.ckpt"), "phis.0 holds NaN/Inf")


# --------------------------------------------------------------------------------------------
# Caches: imports the dtype cannot hold, damaged headers, unreadable files


def test_an_npy_header_with_a_negative_shape_is_one_line(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3), np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    end = raw.index(b"\n")
    crafted = raw.replace(b"(4, 3)", b"(-4, 3)")
    (tmp_path / "neg.npy").write_bytes(crafted[:end] + crafted[end + 1:])  # the header keeps its length
    proc = run_py(["-m", "sparse_coding.cache", "import", "--input", tmp_path / "neg.npy", "--output", tmp_path / "c"],
                  timeout=120)
    assert_one_error_line(proc, "neg.npy", "negative dimensions")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("source, dtype, count", [("float64", "float32", 2), ("float32", "float16", 3)])
def test_values_beyond_the_cache_dtype_are_refused_on_import(tmp_path, source, dtype, count):
    x = np.random.default_rng(0).standard_normal((100, 4)).astype(source)
    big = 1e300 if source == "float64" else 7e4
    x[3, 1], x[5, 2], x[7, 0] = big, -big, np.inf  # inf is the data's own: counted by the cache, not here
    if count == 3:
        x[9, 3] = 1e5
    np.save(tmp_path / "a.npy", x)
    proc = run_py(["-m", "sparse_coding.cache", "import", "--input", tmp_path / "a.npy", "--output", tmp_path / "c",
                   "--dtype", dtype], timeout=120)
    assert_one_error_line(proc, f"{count} finite values", f"exceed the range of {dtype}")
    assert not (tmp_path / "c").exists()


def _deny(monkeypatch, denied: Path) -> None:
    """Reads under `denied` fail like `chmod 000` for a user without root's override (the suite runs as root)."""
    import builtins

    real_open, real_stat = builtins.open, os.stat

    def inside(p, itself: bool = False) -> bool:
        try:
            q = Path(os.fspath(p)).absolute()
        except TypeError:
            return False
        return q.is_relative_to(denied) and (itself or q != denied)

    def open_(file, *args, **kwargs):  # a denied file cannot be opened, nor anything in a denied folder
        if not isinstance(file, int) and inside(file, itself=True):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    def stat_(p, *args, **kwargs):  # entries of a denied folder cannot even be looked at
        if not isinstance(p, int) and inside(p):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "stat", stat_)


@pytest.mark.parametrize("what", ["layers/data/mean.npy", "layers"])
def test_an_unreadable_cache_file_or_folder_is_one_line(tmp_path, monkeypatch, what):
    from sparse_coding.data.cache_datamodule import CacheDataModule

    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    _deny(monkeypatch, path / what)
    for attempt in (lambda: store.verify(path), lambda: CacheDataModule(path, batch_size=32)):
        with pytest.raises(DataError, match="cannot be read .not readable by this user.") as e:
            attempt()
        assert "\n" not in str(e.value) and str(path / "layers") in str(e.value)


@pytest.mark.parametrize("what", ["layers/data/mean.npy", "layers"])
def test_chmod_000_on_a_cache_file_or_folder_for_a_real_user(tmp_path, what):
    """The same with real permissions, as user nobody (skipped where that user cannot run the project's python)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    import sys

    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    for p in [tmp_path, *tmp_path.rglob("*")]:
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    os.chmod(path / what, 0o000)

    env = child_env(HOME=str(tmp_path))
    try:
        probe = subprocess.run([sys.executable, "-c", "import numpy"], preexec_fn=as_nobody, env=env,
                               capture_output=True, text=True, timeout=60)
    except OSError as e:
        pytest.skip(f"user nobody cannot run the project's python here ({e})")
    if probe.returncode != 0:
        pytest.skip(f"the project's environment is not usable by user nobody: {probe.stderr[-200:]}")
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "verify", str(path)], preexec_fn=as_nobody,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_one_error_line(proc, "not readable by this user")


# --------------------------------------------------------------------------------------------
# Data whose squares overflow float32 (the loader workers and the sample budget: tests/data/test_cache_datamodule.py,
# tests/test_convergence.py)


def test_data_whose_squares_overflow_float32_is_one_line(tmp_path):
    """A cache of values near 1e25 (finite in float32, their squares are not): auto lambda cannot start."""
    from sparse_coding.api import compose
    from sparse_coding.run import run

    x = (np.random.default_rng(0).standard_normal((600, 8)) * 1e25).astype(np.float32)
    path = import_cache(tmp_path / "c", x, 200)
    with pytest.raises(TrainingError, match="overflow float32") as e:
        run(compose(["logger=none", "trainer.enable_progress_bar=false", "data=cache", f"data.path={path}",
                     "dictionary.mult=2", "trainer.max_steps=2", "data.batch_size=64"]), tmp_path / "run")
    assert "\n" not in str(e.value)
