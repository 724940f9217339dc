"""Write a file so that readers see either the old or the complete new content, never a part.

The bytes go to a temporary file in the target's own directory (same filesystem: the rename is
atomic), are fsynced and renamed over the target. On any failure (disk full, a kill by signal the
process can catch) the temporary file is removed; after SIGKILL it stays as `.NAME.tmp-PID` beside
the target, where the next writer of the cache or run cleans such names up.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Optional


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


def not_a_regular_file(path: Path) -> Optional[str]:
    """None when `path` is a regular file (symbolic links followed); else what it is, for a one-line message:
    "does not exist", "is a directory", "is a FIFO (named pipe)", "is a character device", ... Opening a FIFO
    or a device to read it can block forever or never end (/dev/zero): check with this first."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a folder on its path is a file)"
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    except ValueError as e:  # a NUL byte in the name
        return f"is not a valid path ({e})"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a regular file"
    return "is not a regular file"
