"""What many test files share: the repository root, `train.py` in a subprocess, and one compose-and-train helper."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# no W&B run and no progress bar unless a test asks for them (a test's own logger=... replaces logger=none)
QUIET = ("logger=none", "trainer.enable_progress_bar=false")
# what a launcher or an outer DDP run may have set: a child started by a test must not think it is a rank
RANK_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def quiet(overrides) -> list[str]:
    """QUIET, then the overrides; an override of the same key (logger=csv) replaces QUIET's."""
    keys = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    return [*(o for o in QUIET if o.split("=", 1)[0] not in keys), *overrides]


def compose(overrides):
    """The run config `train.py` would run for these overrides (QUIET first), checked as `train.py` checks it
    (sparse_coding.api.compose: the overrides, compose, validate, check_trainable)."""
    from sparse_coding.api import compose as compose_checked

    return compose_checked(quiet(overrides))


def train(out: Path, overrides, callbacks=()) -> dict:
    """Compose and check the config like `train.py` (QUIET first), then run it in this process into `out`:
    run()'s result, the dict metrics.json holds."""
    from sparse_coding.api import compose_and_plan
    from sparse_coding.run import run

    cfg, plan = compose_and_plan(quiet(overrides))
    return run(cfg, Path(out), callbacks, plan=plan)


def run_train(args, cwd=ROOT, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess (never a rank of an outer DDP run); the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    for key in RANK_VARIABLES:
        full_env.pop(key, None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# ---- checking what a test produced


def one_line(err: BaseException) -> str:
    """The text of an error that must be one line with no traceback (asserted)."""
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The non-blank lines a process wrote to stderr."""
    return [line for line in proc.stderr.strip().splitlines() if line.strip()]


def digests(d: Path, skip=(".run.lock",)) -> dict:
    """sha256 of every file under d, hidden ones included, by relative name; symbolic links and the names in `skip`
    (by default the run lock's pid file, which a refused run may leave) left out."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name not in skip}


# every metric SparseDictionary.measure computes the way a run does (exactly: the same solver, layout and sums)
MEASURED = ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "explained_variance", "mean_l1", "mean_max",
            "dead_fraction", "capped_fraction", "mean_steps")


def assert_same_metrics(got: dict, want: dict) -> None:
    for key in MEASURED:
        assert got[key] == want[key], key
    assert got["lam"] == want["lam"] and got["dict_size"] == want["dict_size"]


# ---- inputs


def import_cache(out: Path, arr, shard_rows: int = 64) -> Path:
    """A one-layer cache ('data') holding `arr`, written by the real import path."""
    import numpy as np

    from sparse_coding.cache import build

    src = Path(out).parent / f"{Path(out).name}-src.npy"
    np.save(src, arr)
    return build.import_array(src, out, shard_rows=shard_rows)


def unblock_after(fifo: Path, seconds: float) -> threading.Timer:
    """If the code under test opens the FIFO to read (the bug), open its other end after a while so the test
    fails instead of hanging."""
    def open_writer():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    timer = threading.Timer(seconds, open_writer)
    timer.start()
    return timer


def fake_run_dir(path: Path) -> Path:
    """A finished run's folder as train.py leaves it (contents are placeholders)."""
    (path / "checkpoints").mkdir(parents=True)
    (path / ".hydra").mkdir()
    for name, text in (("metrics.json", "{}"), ("dictionary.safetensors", "phi"), ("dictionary.json", "{}"),
                       ("checkpoints/last.ckpt", "state"), (".hydra/config.yaml", "seed: 0\n"), ("train.log", "")):
        (path / name).write_text(text)
    return path


def row_ids(batches):
    """The indices of an indexed cache's rows (column 0, tests/data/conftest.py) in the order batches give them."""
    import numpy as np

    return np.concatenate([b[:, 0].numpy() for b in batches]).round().astype(int)


# an experiment's points shrunk for the tests (tiny d, few rows, one epoch): the numbers are not the paper's,
# only what each stage hands the next
TINY_POINT = ["data.dim=8", "data.n=256", "data.n_val=128", "data.batch_size=128", "trainer.max_epochs=1",
              "solver.max_steps=32"]


# a W&B sweep of two runs (λ = 0.3 and auto) of the training entry point, with the logger on
TINY_SWEEP = {
    "program": "sparse_coding", "method": "grid",
    "metric": {"name": "val/normalized_loss", "goal": "minimize"},
    "command": ["${env}", "${interpreter}", "-m", "${program}", "logger=wandb", "${args_no_hyphens}"],
    "parameters": {"data": {"value": "sparse_linear"}, "data.active": {"value": 3},
                   "dictionary.lam": {"values": [0.3, "auto"]}},
}
