"""The activation cache on disk: sharded memory-mappable `.npy` files per layer, checksummed, resumable.

Layout of a cache folder::

    manifest.json                 written last; format_version, model, corpus, d, dtype, rows,
                                  rows_per_shard, layers, per-shard sha256, statistics
    tokens.npy                    int32 token id of every row (rows are in corpus order)
    layers/<key>/shard_00000.npy  float32 or float16, (rows, d); <key> is the hidden-state index
                                  "0".."N", "embeddings" (token embedding rows) or "data" (import)
    layers/<key>/shard_00000.npy.sha256   written before the shard is renamed into place
    layers/<key>/mean.npy         float64 mean row (centring); mean squared norm in the manifest
    verified.json                 record of the last full checksum pass

Shards are written under a temporary name and renamed when complete, so an interrupted build
resumes at the first missing shard and produces the same bytes (contexts are batched on a fixed
grid). A finished cache is never rebuilt unless asked (`--force`).

This module holds the format: manifest reading, checking and writing, shard names and files,
layer statistics, verification, build identity records and the build lock. Building is in
`cache.build`, the CLI in `cache.cli`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from sparse_coding.atomic import atomic_write_bytes
from sparse_coding.errors import ConfigError, DataError, StorageError

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_HASH_CHUNK = 1 << 22

# --------------------------------------------------------------------------------------------
# Small helpers


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def unreadable(path: Path, e: OSError) -> DataError:
    """One line for a cache file that cannot be read (permissions, an I/O error)."""
    why = "not readable by this user" if isinstance(e, PermissionError) else (e.strerror or type(e).__name__)
    return DataError(f"{path}: cannot be read ({why}): fix its permissions (chmod), or rebuild the cache")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                h.update(chunk)
    except (PermissionError, IsADirectoryError) as e:
        raise unreadable(path, e) from None
    return h.hexdigest()


def _is_file(path: Path) -> bool:
    """Path.is_file, with a folder this user cannot search (chmod 000) as one line instead of PermissionError."""
    try:
        return path.is_file()
    except OSError as e:
        raise unreadable(path, e) from None


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_npy(path: Path, arr: np.ndarray) -> None:
    """Write an array as `.npy` atomically (tokens, mean rows)."""
    atomic_write_bytes(path, _npy_bytes(arr))


def layer_key(layer: Any) -> str:
    """The folder name of a layer: hidden-state index as a string, or 'embeddings' / 'data'."""
    return str(layer)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def npy_header(shape: tuple, dtype: Any) -> bytes:
    """The bytes `np.save` puts before the data of a C-contiguous array of this shape and dtype (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    return buf.getvalue()


class ShardFile:
    """One shard written as its rows come, in order: the bytes `np.save` writes (header, then the C-order rows),
    hashed as they go out, into a temporary file beside the shard (`.NAME.tmp-PID`, the name `atomic_write` uses
    and a killed build's successor removes).

    `finish` makes it a shard the way `write_shard` always has: the data fsynced, the checksum sidecar written,
    then the shard renamed into place. On any failure, and on `discard`, the temporary file is removed; a full
    disk is one line. Every `WRITEBACK_BYTES` written, the kernel is told to start writing them to disk without
    waiting (`start_writeback`), so that `finish` -- for a build, the wait after the last forward pass -- has
    little left to flush.
    """

    WRITEBACK_BYTES = 4 << 20

    def __init__(self, path: Path, rows: int, d: int, dtype: Any):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.size = rows * d * np.dtype(dtype).itemsize
        self._left = self.size
        self._done = False
        self._unsynced = 0
        self._hash = hashlib.sha256()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._out(npy_header((rows, d), dtype))

    def write(self, rows: np.ndarray) -> None:
        """Append rows (C-contiguous, of the shard's dtype and width)."""
        data = rows.reshape(-1).view(np.uint8)
        if data.nbytes > self._left:
            self.discard()
            raise ValueError(f"{self.path}: {data.nbytes} more bytes than the shard holds")
        self._left -= data.nbytes
        self._out(data)

    def finish(self) -> str:
        """The shard in place and its sha256 (also in the sidecar)."""
        if self._left:
            self.discard()
            raise ValueError(f"{self.path}: {self._left} bytes short of the shard")
        digest = self._hash.hexdigest()
        with self._failing():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            atomic_write_bytes(self.path.with_name(self.path.name + ".sha256"), (digest + "\n").encode())
            os.replace(self.tmp, self.path)
        self._done = True
        return digest

    def discard(self) -> None:
        """Remove the temporary file of a shard not finished (nothing, for a finished one)."""
        if self._done:
            return
        with contextlib.suppress(OSError):
            self._file.close()  # closes the file even when its last flush fails (a full disk)
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _out(self, data: Any) -> None:
        self._hash.update(data)
        with self._failing():
            self._file.write(data)
            self._unsynced += len(data)
            if self._unsynced >= self.WRITEBACK_BYTES:
                self._file.flush()
                start_writeback(self._file.fileno())
                self._unsynced = 0

    @contextlib.contextmanager
    def _failing(self):
        try:
            yield
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise StorageError(f"{self.path}: no space left on device ({human_bytes(self.size)} shard); the shards "
                                   "written so far are complete: free space and rerun the same command to resume") from None
            raise


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


def _sync_file_range() -> Optional[Callable]:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to disk and return at once (Linux); the fsync that
    makes them durable comes later. Elsewhere nothing: that fsync then does all the writing."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: its failure costs only the overlap


def write_shard(path: Path, arr: np.ndarray) -> str:
    """Write one shard safely: the data hashed and written from the array's own memory (no serialised copy), the
    checksum sidecar, then the shard renamed into place (`ShardFile`)."""
    arr = np.ascontiguousarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{path}: a shard is (rows, d), not {arr.shape}")
    shard = ShardFile(path, arr.shape[0], arr.shape[1], arr.dtype)
    shard.write(arr)
    return shard.finish()


BLOCK_ROWS = 1024


def cache_blocks(shard_rows: list[int]) -> list[tuple[int, int, int]]:
    """A layer's rows as contiguous blocks (shard, lo, hi) of at most BLOCK_ROWS (at least 20 when the cache is small)."""
    block = max(1, min(BLOCK_ROWS, sum(shard_rows) // 20))
    return [(s, lo, min(lo + block, r)) for s, r in enumerate(shard_rows) for lo in range(0, r, block)]


def split_blocks(blocks: list, val_fraction: float) -> tuple[list, list]:
    """(training blocks, held-out blocks): every 1/val_fraction-th block held out (at least one when there are two
    or more). Either list can be empty when the cache is too small to split."""
    nb = len(blocks)
    is_val = [math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) for i in range(nb)]
    if nb >= 2 and not any(is_val):
        is_val[nb // 2] = True
    return [b for b, v in zip(blocks, is_val) if not v], [b for b, v in zip(blocks, is_val) if v]


# --------------------------------------------------------------------------------------------
# One builder at a time, and no leftovers from a killed one


_STALE_TEMP = re.compile(r"\.(shard_\d+\.npy(\.sha256)?|mean\.npy|tokens\.npy|manifest\.json|build\.json|verified\.json)\.tmp-\d+\Z")


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold an exclusive lock on building the cache `out` (a lock file beside it; released on exit or kill).

    A second build of the same cache waits, then finds the finished manifest and does nothing.
    Under the lock, temporary files left by a killed build are removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file = out.parent / f".{out.name}.lock"
    with open(lock_file, "a+b") as f:
        wait_for_lock(f, lambda holder: f"[cache] {out}: another process{holder} is building or replacing this cache; "
                      f"waiting for it to finish (lock {lock_file}; Ctrl-C stops waiting)")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()).encode())
        f.flush()
        try:
            for sibling in out.parent.glob(f".{glob_escape(out.name)}.[no][el][wd]-*"):
                if sibling.is_dir():
                    shutil.rmtree(sibling, ignore_errors=True)  # left by a killed --force
            if out.is_dir():
                for tmp in [out, *out.glob("layers/*")]:
                    for p in tmp.iterdir():
                        if _STALE_TEMP.match(p.name) and p.is_file():
                            p.unlink()
            yield
        finally:
            with contextlib.suppress(OSError):
                f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


LOCK_POLL_SECONDS = 0.1


def wait_for_lock(f, message, timeout: Optional[float] = None) -> None:
    """Take an exclusive `flock` on the open file `f`, waiting for its holder when it has one.

    The wait polls a non-blocking lock with short sleeps instead of blocking in `flock(2)`: a signal
    (Ctrl-C) that arrives at any moment of the wait raises at once (a blocking `flock` entered just
    after the signal was handled would swallow it and wait forever). `message(holder)` is printed once
    when the lock is held elsewhere (`holder`: " (pid N)" from the lock file, or ""). With `timeout`
    (seconds) a wait that lasts longer raises StorageError.
    """
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    f.seek(0)
    pid = f.read(32).strip()
    pid = pid.decode(errors="replace") if isinstance(pid, bytes) else pid
    holder = f" (pid {pid})" if pid.isdigit() else ""
    print(message(holder), file=sys.stderr, flush=True)
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        time.sleep(LOCK_POLL_SECONDS)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if end is not None and time.monotonic() > end:
                raise StorageError(f"gave up waiting after {timeout:.0f} s for the lock held by another process{holder}")


BUILD_RECORD = "build.json"


def claim_output(out: Path, identity: dict) -> None:
    """Make sure `out` is empty, or holds a (partial) cache of exactly this source and these settings.

    `identity` fingerprints the input (content hashes) and the build settings; it is written to
    `build.json` before the first shard and into the manifest. A resumed build, or a second build
    into a finished cache, that names another source is refused instead of mixing the two.
    Called under the build lock.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is an existing file, not a cache folder: choose another output folder")
    hint = "choose another output folder, or add --force to replace it"
    manifest = out / "manifest.json"
    if manifest.is_file():
        old = read_manifest(out)
        if not same_build(old, identity):
            raise ConfigError(f"{out} already holds a finished cache of another source or settings "
                              f"({describe_build(old.get('build') or old)}; this build: {describe_build(identity)}): {hint}")
        return
    record = out / BUILD_RECORD
    if record.is_file():
        try:
            started = json.loads(record.read_text())
        except (OSError, ValueError):
            started = None
        if with_defaults(started) != with_defaults(identity):
            raise ConfigError(f"{out} holds a partial build of another source or settings "
                              f"({describe_build(started)}; this build: {describe_build(identity)}): {hint}")
        return
    if out.is_dir() and any(p for p in out.iterdir() if not _STALE_TEMP.match(p.name)):
        raise ConfigError(f"{out} is not empty and holds no cache build record (files of something else, or a "
                          f"build from an older version): {hint}")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(record, identity)


def with_defaults(identity: Any) -> Any:
    """A build identity with the settings that older records leave out at their value then: a model's caches were
    computed in float32 before `model_dtype` was recorded."""
    if isinstance(identity, dict) and identity.get("kind") in ("hidden_states", "token_embeddings"):
        return {"model_dtype": "float32", **identity}
    return identity


def model_dtype_of(manifest: dict) -> Optional[str]:
    """The compute dtype of the model that made a cache (float32 for records older than `model_dtype`; None: no model)."""
    if not manifest.get("model"):
        return None
    return str((manifest.get("build") or {}).get("model_dtype") or manifest["model"].get("dtype") or "float32")


def same_build(manifest: dict, identity: dict) -> bool:
    """Whether a finished cache was built from `identity` (caches without a build record: by their fingerprints)."""
    if "build" in manifest:
        return with_defaults(manifest["build"]) == with_defaults(identity)
    if identity.get("kind") == "imported":
        return (manifest.get("source") or {}).get("sha256") == identity.get("source_sha256")
    fps = {"model_fingerprint": (manifest.get("model") or {}).get("fingerprint"),
           "corpus_fingerprint": (manifest.get("corpus") or {}).get("fingerprint")}
    return all(identity.get(k) in (None, v) for k, v in fps.items()) and manifest.get("dtype") == identity.get("dtype")


def describe_build(b: Any) -> str:
    if not isinstance(b, dict):
        return "unreadable build record"
    if b.get("kind") == "imported" or b.get("source_sha256"):
        return f"import of sha256 {str(b.get('source_sha256'))[:12]}, dtype {b.get('dtype')}, {b.get('rows_per_shard')} rows/shard"
    return ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(b.items()) if v is not None)


def finish_build(out: Path) -> None:
    """The manifest now holds the build identity: drop the in-progress record."""
    with contextlib.suppress(OSError):
        (Path(out) / BUILD_RECORD).unlink()


_CACHE_TOP = {"manifest.json", BUILD_RECORD, "verified.json", "tokens.npy"}
_CACHE_LAYER_FILE = re.compile(r"(shard_\d+\.npy(\.sha256)?|mean\.npy)\Z")


def foreign_entries(out: Path) -> list[str]:
    """What in the folder `out` is not part of a cache (finished or partial, of any version): the
    manifest, build record, verification record, tokens.npy, layers/<key>/ shards, checksums and
    means, and temporary files of a killed build. Empty for a cache, an empty folder or no folder."""
    out = Path(out)
    if not out.is_dir():
        return [] if not out.exists() and not out.is_symlink() else [out.name]
    foreign = []
    for p in sorted(out.iterdir()):
        if _STALE_TEMP.match(p.name) and p.is_file():
            continue
        if p.name == "layers" and p.is_dir() and not p.is_symlink():
            for layer in sorted(p.iterdir()):
                if not (_LAYER_KEY.match(layer.name) and layer.is_dir() and not layer.is_symlink()):
                    foreign.append(f"layers/{layer.name}")
                    continue
                foreign += [f"layers/{layer.name}/{f.name}" for f in sorted(layer.iterdir())
                            if not ((_CACHE_LAYER_FILE.match(f.name) or _STALE_TEMP.match(f.name))
                                    and f.is_file() and not f.is_symlink())]
        elif not (p.name in _CACHE_TOP and p.is_file() and not p.is_symlink()):
            foreign.append(p.name + ("/" if p.is_dir() else ""))
    return foreign


def check_replaceable(out: Path) -> None:
    """`--force` replaces only a cache: refuse (ConfigError, nothing touched) a file or a folder that holds
    anything else (a run directory, a user's files), so a mistyped `--output` can never delete it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is an existing file, not a cache folder: choose another output folder")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        run = " (a training run's folder)" if {"metrics.json", "checkpoints/", "dictionary.safetensors"} & set(foreign) else ""
        raise ConfigError(f"{out} is not a cache folder{run}: it holds {shown}; --force replaces only a cache, "
                          "nothing was changed: choose another output folder")


@contextlib.contextmanager
def replacing(out: Path):
    """`--force`: build into a sibling folder, then swap it in; `out` never holds a mix of old and new.

    Yields the folder to build into. The old cache stays whole until the new one is complete.
    """
    out = Path(out)
    check_replaceable(out)
    new = out.parent / f".{out.name}.new-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    try:
        yield new
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def shard_done(path: Path) -> bool:
    return path.is_file() and path.with_name(path.name + ".sha256").is_file()


def read_manifest(path: Path) -> dict:
    """The manifest of a cache folder; DataError when it is missing or not a manifest."""
    path = Path(path)
    mf = path / "manifest.json"
    if not _is_file(mf):
        raise DataError(f"{mf}: no manifest (not a cache, or its build did not finish: rerun the build to resume)")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mf}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{mf}: not a JSON text ({type(e).__name__}); rebuild the cache") from None
    except OSError as e:
        raise unreadable(mf, e) from None
    if not isinstance(m, dict):
        raise DataError(f"{mf}: holds a JSON {type(m).__name__}, not a manifest; rebuild the cache")
    for key in ("format_version", "d", "dtype", "n_rows", "layers", "shards", "rows_per_shard"):
        if key not in m:
            raise DataError(f"{mf}: missing field {key!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise DataError(f"{mf}: format_version {m['format_version']} is not {FORMAT_VERSION}; rebuild the cache")
    if m["dtype"] not in DTYPES:
        raise DataError(f"{mf}: dtype {m['dtype']!r} is not one of {DTYPES}")
    _check_manifest(m, mf)
    return m


_LAYER_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
_SHARD_FILE = re.compile(r"shard_\d{5,9}\.npy\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
MAX_D = 1 << 20
MAX_ROWS = 1 << 40


def _check_manifest(m: dict, mf: Path) -> None:
    """Every name a manifest gives is a plain file name inside the cache, every size is sane.

    A crafted manifest (`..`, absolute paths, odd layer keys, negative or huge sizes) is refused
    before any file it names is opened or written.
    """
    def bad(what: str) -> DataError:
        return DataError(f"{mf}: {what}; the manifest is damaged or crafted: rebuild the cache")

    def count(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not count(m["d"], 1, MAX_D) or not count(m["n_rows"], 0, MAX_ROWS) or not count(m["rows_per_shard"], 1, MAX_ROWS):
        raise bad(f"d={m['d']!r}, n_rows={m['n_rows']!r}, rows_per_shard={m['rows_per_shard']!r} are not valid sizes")
    if not isinstance(m["shards"], dict) or not isinstance(m["layers"], list):
        raise bad("'shards' must map layer keys to lists and 'layers' must be a list")
    for key in m["layers"]:
        if not isinstance(key, str) or key not in m["shards"]:
            raise bad(f"layer {key!r} has no shard list")
    for key, entries in m["shards"].items():
        if not _LAYER_KEY.match(str(key)):
            raise bad(f"layer key {key!r} is not a plain name")
        if not isinstance(entries, list):
            raise bad(f"shards of layer {key} are not a list")
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not _SHARD_FILE.match(e["file"]):
                raise bad(f"shard entry {e!r} of layer {key} does not name a file shard_NNNNN.npy")
            if not count(e.get("rows"), 0, m["rows_per_shard"]):
                raise bad(f"shard {e['file']} of layer {key} has rows={e.get('rows')!r}")
            if not isinstance(e.get("sha256"), str) or not _SHA256.match(e["sha256"]):
                raise bad(f"shard {e['file']} of layer {key} has no valid sha256")
    if not isinstance(m.get("stats", {}), dict):
        raise bad("'stats' must map layer keys to statistics")
    for key, st in (m.get("stats") or {}).items():
        if not isinstance(st, dict) or st.get("mean_file") != f"layers/{key}/mean.npy":
            raise bad(f"statistics of layer {key!r} name mean file {(st or {}).get('mean_file') if isinstance(st, dict) else st!r}")
        for name in ("n_finite", "n_nonfinite"):
            if not count(st.get(name), 0, MAX_ROWS):
                raise bad(f"statistics of layer {key}: {name}={st.get(name)!r} is not a row count")
        for name in ("mean_sq_norm", "centered_mean_sq_norm"):
            v = st.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"statistics of layer {key}: {name}={v!r} is not a finite number")
        first = st.get("first_nonfinite")
        if first is not None and not (isinstance(first, dict) and isinstance(first.get("file"), str)
                                      and count(first.get("row"), 0, MAX_ROWS)):
            raise bad(f"statistics of layer {key}: first_nonfinite={first!r} is not {{file, row}}")
        if not isinstance(st.get("mean_sha256"), str) or not _SHA256.match(st["mean_sha256"]):
            raise bad(f"statistics of layer {key} have no valid mean_sha256")
    tok = m.get("tokens")
    if tok is not None and (not isinstance(tok, dict) or tok.get("file") != "tokens.npy"):
        raise bad(f"tokens entry {tok!r} must name tokens.npy")


def cache_file(root: Path, rel: str) -> Path:
    """`root/rel`, refused when it resolves outside the cache folder (a symlink pointing elsewhere)."""
    root = Path(root)
    p = root / rel
    real_root = root.resolve()
    if not p.resolve().is_relative_to(real_root):
        raise DataError(f"{p}: resolves outside the cache folder {real_root}; refusing to read it")
    return p


def select_layer(manifest: dict, layer: Any, path: Path) -> str:
    """The layer key to read: `layer` if given, else the cache's only layer."""
    layers = [str(k) for k in manifest["layers"]]
    if layer is None:
        if len(layers) != 1:
            raise ConfigError(f"{path}: the cache holds layers {layers}; choose one with layer=K")
        return layers[0]
    key = layer_key(layer)
    if key not in layers:
        raise ConfigError(f"{path}: layer {key} is not in this cache (it holds {', '.join(layers)})")
    return key


def shard_paths(path: Path, manifest: dict, key: str) -> list[Path]:
    return [cache_file(path, f"layers/{key}/{s['file']}") for s in manifest["shards"][key]]


def open_shard(file: Path, rows: int, d: int, dtype: str) -> np.ndarray:
    """Memory-map one shard and check its shape and dtype against the manifest."""
    if not _is_file(file):
        raise DataError(f"{file}: shard is missing")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except PermissionError as e:
        raise unreadable(file, e) from None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{file}: cannot be read as .npy, truncated or altered ({e})") from None
    if arr.shape != (rows, d) or arr.dtype != np.dtype(dtype):
        raise DataError(
            f"{file}: shape {arr.shape} {arr.dtype} does not match the manifest's ({rows}, {d}) {dtype}"
        )
    return arr


# --------------------------------------------------------------------------------------------
# Statistics and manifest


class LayerStats:
    """The mean row and mean squared norm over the finite rows of one layer, in float64, summed shard by shard.

    Shards must be added in order; each is summed in chunks of `chunk` rows, so the sums (and the manifest's
    numbers) are the same bits whether a shard is added from memory while it is written or read back from disk.
    """

    def __init__(self, d: int, chunk: int = 65536):
        self.total = np.zeros(d, np.float64)
        self.sq = 0.0
        self.n_finite = self.n_bad = 0
        self.first_bad: Optional[dict] = None
        self.chunk = chunk

    def add(self, arr: np.ndarray, name: str) -> None:
        """Add one shard's rows (`name`: its file name, reported for the first non-finite row)."""
        for s in range(0, arr.shape[0], self.chunk):
            rows = arr[s : s + self.chunk]
            ok = np.isfinite(rows).all(axis=1)  # in the stored dtype: half the bytes of float64, the same rows
            x = np.asarray(rows, dtype=np.float64)
            if not ok.all():
                if self.first_bad is None:
                    self.first_bad = {"file": name, "row": int(s + np.flatnonzero(~ok)[0])}
                self.n_bad += int((~ok).sum())
                x = x[ok]
            self.total += x.sum(axis=0)
            self.sq += float(np.einsum("ij,ij->", x, x))
            self.n_finite += x.shape[0]

    def result(self) -> dict:
        mean = self.total / max(self.n_finite, 1)
        msn = self.sq / max(self.n_finite, 1)
        return {
            "mean": mean,
            "n_finite": self.n_finite,
            "n_nonfinite": self.n_bad,
            "first_nonfinite": self.first_bad,
            "mean_sq_norm": msn,
            "centered_mean_sq_norm": msn - float(mean @ mean),
        }


def layer_stats(files: list[Path], rows: list[int], d: int, dtype: str, chunk: int = 65536) -> dict:
    """Mean row and mean squared norm over the finite rows of one layer, in float64, read from its shards."""
    stats = LayerStats(d, chunk)
    for f, r in zip(files, rows):
        stats.add(open_shard(f, r, d, dtype), f.name)
    return stats.result()


def finish_layer(out: Path, key: str, n_rows: int, rows_per_shard: int, d: int, dtype: str,
                 stats: Optional[LayerStats] = None) -> dict:
    """Manifest entries (shards with checksums, statistics) for a layer whose shards are all written.

    `stats`: the layer's statistics already summed over every shard (while they were written); else they are
    read back from the shards.
    """
    n_shards = -(-n_rows // rows_per_shard)
    rows = [min(rows_per_shard, n_rows - i * rows_per_shard) for i in range(n_shards)]
    files = [out / "layers" / key / shard_name(i) for i in range(n_shards)]
    shards = []
    for f, r in zip(files, rows):
        digest = f.with_name(f.name + ".sha256").read_text().strip()
        shards.append({"file": f.name, "rows": r, "sha256": digest})
    st = stats.result() if stats is not None else layer_stats(files, rows, d, dtype)
    mean_file = out / "layers" / key / "mean.npy"
    write_npy(mean_file, st.pop("mean"))
    st["mean_file"] = f"layers/{key}/mean.npy"
    st["mean_sha256"] = sha256_file(mean_file)
    return {"shards": shards, "stats": st}


def write_manifest(out: Path, base: dict, layer_entries: dict[str, dict], old: Optional[dict] = None) -> dict:
    """Merge new layers into the (old) manifest and write it atomically, last."""
    m = dict(old) if old else {}
    m.update(base)
    m.setdefault("shards", {})
    m.setdefault("stats", {})
    m["shards"] = dict(m["shards"])
    m["stats"] = dict(m["stats"])
    for key, entry in layer_entries.items():
        m["shards"][key] = entry["shards"]
        m["stats"][key] = entry["stats"]
    m["layers"] = sorted(m["shards"], key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    m["format_version"] = FORMAT_VERSION
    _atomic_write_json(out / "manifest.json", m)
    return m


# --------------------------------------------------------------------------------------------
# Verification


def verify(path: Path, layers: Optional[Iterable[str]] = None, manifest: Optional[dict] = None) -> dict:
    """Check every listed file: present, right shape and dtype, sha256 as in the manifest (`manifest`: the one
    the caller read from `path`, else it is read here).

    Returns {"files": n, "bytes": n, "seconds": t}; raises DataError naming the first bad file.
    """
    path = Path(path)
    t0 = time.time()
    m = read_manifest(path) if manifest is None else manifest
    keys = [str(k) for k in (layers if layers is not None else m["layers"])]
    n_files = n_bytes = 0
    for key in keys:
        if key not in m["shards"]:
            raise DataError(f"{path}/manifest.json: lists no shards for layer {key}")
        entries = m["shards"][key]
        if sum(e["rows"] for e in entries) != m["n_rows"]:
            raise DataError(f"{path}/manifest.json: shards of layer {key} hold {sum(e['rows'] for e in entries)} "
                            f"rows, the manifest says {m['n_rows']}")
        for e in entries:
            f = cache_file(path, f"layers/{key}/{e['file']}")
            open_shard(f, e["rows"], m["d"], m["dtype"])
            if sha256_file(f) != e["sha256"]:
                raise DataError(f"{f}: sha256 does not match the manifest (the shard was altered or corrupted)")
            n_files += 1
            n_bytes += f.stat().st_size
        st = m.get("stats", {}).get(key)
        if st is None:
            raise DataError(f"{path}/manifest.json: no statistics for layer {key}")
        mf = cache_file(path, st["mean_file"])
        if not _is_file(mf) or sha256_file(mf) != st["mean_sha256"]:
            raise DataError(f"{mf}: missing or its sha256 does not match the manifest")
        read_mean(mf, m["d"])
    tok = m.get("tokens")
    if tok:
        tf = cache_file(path, tok["file"])
        if not _is_file(tf) or sha256_file(tf) != tok["sha256"]:
            raise DataError(f"{tf}: missing or its sha256 does not match the manifest")
        n_files += 1
    return {"files": n_files, "bytes": n_bytes, "seconds": round(time.time() - t0, 3)}


def read_mean(file: Path, d: int) -> np.ndarray:
    """A layer's stored mean row: a finite float vector of length d, or DataError."""
    try:
        mean = np.load(file, allow_pickle=False)
    except PermissionError as e:
        raise unreadable(file, e) from None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{file}: cannot be read as .npy ({str(e).splitlines()[0][:120]}); rebuild the cache") from None
    if mean.shape != (d,) or not np.issubdtype(mean.dtype, np.floating) or not np.isfinite(mean).all():
        raise DataError(f"{file}: the mean row is {mean.shape} {mean.dtype}, not {d} finite floats; rebuild the cache")
    return mean


def ensure_verified(path: Path, layer: Optional[str] = None, manifest: Optional[dict] = None) -> dict:
    """Check every shard of the layer(s) a run opens against the manifest's sha256, on every open.

    Nothing about a file (size, mtime) is trusted: a shard altered in place with its mtime kept is
    found here. The cost is one sequential read of the layer per open (sha256 runs at about
    1.9 GB/s on one core here; the read itself is the page cache's or the disk's). `verified.json`
    records the last result; it is never consulted. `manifest`: the one the caller read from `path`.
    """
    path = Path(path)
    m = read_manifest(path) if manifest is None else manifest
    keys = [layer] if layer is not None else [str(k) for k in m["layers"]]
    result = verify(path, keys, m)
    record = {"manifest_sha256": sha256_file(path / "manifest.json"), "layers": keys,
              "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "last_result": result}
    try:
        _atomic_write_json(path / "verified.json", record)
    except OSError:
        pass  # a read-only cache: the record is optional
    return {"verified": True, "skipped": False, **result}
