"""A run owns its directory: one process at a time, writable, with room for its checkpoints.

`own_run_dir(out_dir)` holds an exclusive `flock` on `out_dir/.run.lock` for the whole run
(released by the kernel if the process dies), so a second `train.py` on the same directory stops at
once with one line instead of mixing its outputs with the first one's. Only the launching process
(rank 0) takes the lock: Lightning's DDP launcher re-runs the command for the other ranks in the
same directory. A SIGTERM or a Ctrl-C that stops the run becomes `RunInterrupted` (exit 2, one line) that
says where the resumable checkpoint is (sparse_coding.lifecycle.signals).

`start_run(out_dir, ckpt_path, overwrite)` (train.py and `measure`) takes that lock first, then refuses
a fresh run in a directory that holds a finished run (its metrics.json and dictionary would be
replaced): resume or extend it with `ckpt_path=last`, use another directory, or `overwrite=true`,
which moves the earlier run's files into `replaced-<time>/` before the run starts. Nothing of a
finished run is ever deleted. `run()`'s own `own_run_dir` inside it reuses the lock.
`write_hydra_files` writes Hydra's `.hydra/` record only then (conf/train.yaml sets
`hydra.output_subdir: null`), so a refused run leaves an existing run's record as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from sparse_coding.errors import ConfigError, StorageError
from sparse_coding.lifecycle.signals import interrupted, interruption

LOCK_NAME = ".run.lock"
OUTPUTS = ("metrics.json", "dictionary.safetensors", "dictionary.json")  # a finished run's results
_HANDED_DOWN: set = set()  # run directories whose lock start_run holds for the run() inside it
MIN_FREE_BYTES = 16 << 20  # below this a run cannot even write its first checkpoint and outputs


def is_launching_rank() -> bool:
    """True in the process that owns the run (not a DDP child started by Lightning or torchrun)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0" \
        and os.environ.get("RANK", "0") == "0"


def check_writable(out_dir: Path, need: int = MIN_FREE_BYTES) -> None:
    """The run directory exists (or can be made), is a directory, is writable and has `need` bytes free."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run directory {out_dir} is an existing file: choose another hydra.run.dir (or out_dir)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        what = "is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "is not writable"
        raise StorageError(f"run directory {out_dir} {what} ({e.strerror}): choose another hydra.run.dir "
                           "(or out_dir) or fix it") from None
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise StorageError(f"run directory {out_dir} has {free >> 20} MiB free, a run needs at least {need >> 20} MiB "
                           "for its checkpoints and outputs: free space or choose another hydra.run.dir")


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first name not taken (two set-asides in one second)."""
    n, candidate = 1, path
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def set_aside_old_checkpoints(out_dir: Path) -> None:
    """A fresh run (no ckpt_path) in a directory with another run's checkpoints moves them aside, so a later
    `ckpt_path=last` can never resume the other run's state."""
    ckpts = out_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        aside = _unused(out_dir / f"checkpoints-before-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpts.rename(aside)
        print(f"[run] {out_dir}: checkpoints of an earlier run moved to {aside.name}/ (this run starts fresh; "
              "use ckpt_path=last to resume instead)", file=sys.stderr)


@contextlib.contextmanager
def own_run_dir(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the body runs; see the module docstring."""
    out_dir = Path(out_dir)
    if not is_launching_rank() or _key(out_dir) in _HANDED_DOWN:
        yield  # a DDP child, or run() inside start_run, which holds the lock
        return
    check_writable(out_dir)
    lock_file = out_dir / LOCK_NAME
    try:
        f = open(lock_file, "a+")
    except OSError as e:
        raise StorageError(f"{lock_file}, the run directory's lock file, cannot be opened ({e.strerror}): it must be "
                           "a plain file; remove it (no run holds a lock on something else)") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise StorageError(f"run directory {out_dir} is in use by another run (pid {holder}): wait for it to "
                               "finish or choose another hydra.run.dir (or out_dir)") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        except BaseException as e:
            how = interruption(e)  # SIGTERM, or Ctrl-C during the fit (Lightning's sys.exit(1)) or elsewhere
            if how is None:
                raise
            raise interrupted(how, out_dir, finished_outputs(out_dir)) from None
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _key(out_dir: Path) -> str:
    return str(Path(out_dir).expanduser().resolve())


def finished_outputs(out_dir: Path) -> list:
    """The results of a finished run that `out_dir` holds (metrics.json, the dictionary)."""
    return [name for name in OUTPUTS if (Path(out_dir) / name).exists()]


def check_fresh_run(out_dir: Path, ckpt_path) -> None:
    """Refuse to start a run that would replace a finished run's results: a fresh run (no ckpt_path), or one
    resumed from a checkpoint of another directory, in a directory that holds metrics.json or a dictionary."""
    out_dir = Path(out_dir)
    found = finished_outputs(out_dir)
    if not found or str(ckpt_path) == "last":
        return
    if ckpt_path is not None and Path(str(ckpt_path)).expanduser().resolve().parent == (out_dir / "checkpoints").resolve():
        return  # this directory's own checkpoint: resume_checkpoint decides (finished, or extended)
    what = "a fresh run" if ckpt_path is None else f"a run from ckpt_path={ckpt_path}"
    raise ConfigError(f"run directory {out_dir} holds a finished run ({', '.join(found)}) that {what} would replace: "
                      "resume or extend it with ckpt_path=last, choose another hydra.run.dir (or out_dir), or add "
                      "overwrite=true to start afresh there (its files are then kept in replaced-<time>/)")


def set_aside_finished_run(out_dir: Path) -> None:
    """overwrite=true: move the earlier run's results, plots, checkpoints and .hydra record into replaced-<time>/."""
    out_dir = Path(out_dir)
    if not finished_outputs(out_dir):
        return
    aside = _unused(out_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    moved = []
    for name in (*OUTPUTS, "plots", "checkpoints", ".hydra"):
        if (out_dir / name).exists():
            (out_dir / name).rename(aside / name)
            moved.append(name)
    print(f"[run] {out_dir}: overwrite=true: the earlier run's {', '.join(moved)} moved to {aside.name}/",
          file=sys.stderr)


@contextlib.contextmanager
def start_run(out_dir: Path, ckpt_path=None, overwrite: bool = False) -> Iterator[None]:
    """Own `out_dir` for a run and make sure the run cannot replace a finished one (module docstring).

    Everything a refused run could change happens after the checks: call `write_hydra_files` and
    `run()` inside. Raises StorageError when the directory is in use, ConfigError when it holds a finished run.
    """
    out_dir = Path(out_dir)
    with own_run_dir(out_dir):
        if not is_launching_rank():
            yield
            return
        if overwrite:
            set_aside_finished_run(out_dir)
        check_fresh_run(out_dir, ckpt_path)
        key = _key(out_dir)
        _HANDED_DOWN.add(key)
        try:
            yield
        finally:
            _HANDED_DOWN.discard(key)


def write_hydra_files(task_cfg) -> None:
    """Hydra's record of the run (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml` in its output directory),
    as Hydra writes it, but only now that the config is valid and the directory is this run's: conf/train.yaml
    sets `hydra.output_subdir: null` so that Hydra does not write it before our checks (a refused run then
    rewrote a finished run's record). Nothing outside a Hydra run or in a DDP child process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from sparse_coding.atomic import atomic_write_bytes

    if not HydraConfig.initialized() or not is_launching_rank():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        return  # set on the command line: Hydra wrote the record itself
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        atomic_write_bytes(folder / name, OmegaConf.to_yaml(node).encode())
