"""What Hydra itself would stop on with a traceback, checked before `hydra.main` runs (`python train.py`).

Hydra resolves the run directory, creates it and opens its log file there before our code runs, and a
config value that cannot be resolved (`data.dim=${oc.env:HOME}`, an unset variable, a cycle such as
`data.n=${data.n}`) fails inside Hydra's job runner: both print Hydra's stack trace and exit 1. Here the
command line's config is composed once with the compose API and validated (`sparse_coding.api.compose`:
one `ConfigError` line for any Hydra or OmegaConf error), every job of a `-m` sweep alike, and a run
directory given with `hydra.run.dir` (`hydra.sweep.dir` with `-m`) must be a directory this process can
write in, with room for a run: one line, exit 2. Nothing is created.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from sparse_coding.config.overrides import one_line
from sparse_coding.errors import ConfigError, SparseCodingError, StorageError

MAX_JOBS = 256  # sweep jobs composed ahead; a larger sweep is checked job by job as Hydra runs it


def check_command_line(argv: list[str]) -> None:
    """Raise ConfigError (one line) for a command line Hydra would answer with a traceback."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    class _Answered(Exception):
        pass

    def refuse(message: str) -> None:
        raise _Answered(message)

    parser.error = refuse  # Hydra parses the line again and answers a bad flag itself
    try:
        args = parser.parse_args(argv)
    except _Answered:
        return
    if (args.config_name not in (None, "train") or args.help or args.hydra_help or args.shell_completion
            or args.cfg or args.info or args.config_path or args.config_dir or args.experimental_rerun):
        return
    jobs = _jobs(list(args.overrides), bool(args.multirun))
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    for job in jobs:
        _compose(job)
        where = _given(job, key)
        if where is not None:
            check_run_dir(where, key)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(o.lstrip("+~").startswith("hydra/sweeper") for o in overrides):
        return []  # another sweeper's syntax: its jobs are its own
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - what the basic sweeper cannot expand, Hydra (or its sweeper) answers itself
        return []
    jobs = [job for batch in batches for job in batch]
    return jobs[:MAX_JOBS]


def _compose(overrides: list[str]) -> None:
    from sparse_coding.api import compose

    try:
        compose(overrides)
    except SparseCodingError:
        raise
    except Exception as e:  # noqa: BLE001 - anything compose lets through would be Hydra's traceback later
        if not type(e).__module__.startswith(("hydra", "omegaconf")):
            raise
        raise ConfigError(f"cannot compose the config from {' '.join(overrides)}: {one_line(e)}") from None


def _given(overrides: list[str], key: str) -> Optional[str]:
    """The value of `key=VALUE` (or `++key=`/`+key=`) on the command line, the last one winning."""
    found = None
    for o in overrides:
        name, sep, value = o.partition("=")
        if sep and name.lstrip("+") == key:
            found = value
    if found is None or "${" in found:
        return None  # not given, or an interpolation Hydra resolves (${now:...}): its parent is checked by Hydra
    return found.strip("'\"")


def check_run_dir(path: str, key: str = "hydra.run.dir") -> None:
    """`path` is, or can become, a directory this process can write in, with room for a run; nothing is created."""
    from sparse_coding.lifecycle.rundir import MIN_FREE_BYTES

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key}={path} is an existing file, not a directory: choose another {key}")
    existing = target
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"{key}={path}: {existing} is a broken symbolic link: choose another {key}")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, so the directory cannot be made: choose another {key}")
    probe = existing / f".sparse-coding-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        what = "is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "is not writable"
        subject = f"{key}={path}" if existing == target else f"{key}={path} cannot be made: {existing}"
        raise StorageError(f"{subject} {what} ({e.strerror}): choose another {key} or fix it") from None
    try:
        free = os.statvfs(existing).f_bavail * os.statvfs(existing).f_frsize
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise StorageError(f"{key}={path} has {free >> 20} MiB free, a run needs at least {MIN_FREE_BYTES >> 20} MiB "
                           f"for its checkpoints and outputs: free space or choose another {key}")
