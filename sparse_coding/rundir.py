"""A run owns its directory: one process at a time, writable, with room for its checkpoints.

`own_run_dir(out_dir)` holds an exclusive `flock` on `out_dir/.run.lock` for the whole run
(released by the kernel if the process dies), so a second `train.py` on the same directory stops at
once with one line instead of mixing its outputs with the first one's. Only the launching process
(rank 0) takes the lock: Lightning's DDP launcher re-runs the command for the other ranks in the
same directory. A SIGTERM that Lightning turned into its exit-0 `SIGTERMException` is turned back
into an error (exit 2) that says where the resumable checkpoint is.
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

from sparse_coding.errors import ConfigError

LOCK_NAME = ".run.lock"
MIN_FREE_BYTES = 16 << 20  # below this a run cannot even write its first checkpoint and outputs


class RunInterrupted(ConfigError):
    """The run was stopped from outside (SIGTERM); its last checkpoint resumes it."""


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
        raise ConfigError(f"run directory {out_dir} {what} ({e.strerror}): choose another hydra.run.dir "
                          "(or out_dir) or fix it") from None
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ConfigError(f"run directory {out_dir} has {free >> 20} MiB free, a run needs at least {need >> 20} MiB "
                          "for its checkpoints and outputs: free space or choose another hydra.run.dir")


def set_aside_old_checkpoints(out_dir: Path) -> None:
    """A fresh run (no ckpt_path) in a directory with another run's checkpoints moves them aside, so a later
    `ckpt_path=last` can never resume the other run's state."""
    ckpts = out_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        aside = out_dir / f"checkpoints-before-{time.strftime('%Y%m%d-%H%M%S')}"
        ckpts.rename(aside)
        print(f"[run] {out_dir}: checkpoints of an earlier run moved to {aside.name}/ (this run starts fresh; "
              "use ckpt_path=last to resume instead)", file=sys.stderr)


@contextlib.contextmanager
def own_run_dir(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the body runs; see the module docstring."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    out_dir = Path(out_dir)
    if not is_launching_rank():
        yield
        return
    check_writable(out_dir)
    lock_file = out_dir / LOCK_NAME
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(f"run directory {out_dir} is in use by another run (pid {holder}): wait for it to "
                              "finish or choose another hydra.run.dir (or out_dir)") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        except SIGTERMException:
            last = out_dir / "checkpoints" / "last.ckpt"
            where = f"{last} holds the state" if last.is_file() else "no checkpoint was written yet"
            raise RunInterrupted(f"stopped by SIGTERM before the run finished; no outputs were written; {where}: "
                                 "rerun the same command with ckpt_path=last to resume") from None
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
