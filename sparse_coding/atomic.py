"""Write a file so that readers see either the old or the complete new content, never a part.

The bytes go to a temporary file in the target's own directory (same filesystem: the rename is
atomic), are fsynced and renamed over the target. On any failure (disk full, a kill by signal the
process can catch) the temporary file is removed; after SIGKILL it stays as `.NAME.tmp-PID` beside
the target, where the next writer of the cache or run cleans such names up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
