"""The activation cache: sharded memory-mappable `.npy` files per layer, checksummed, resumable.

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

CLI::

    python -m sparse_coding.cache build model=minilm layer=all corpus=wiki corpus.max_tokens=100000
    python -m sparse_coding.cache import --input acts.npy --output DIR
    python -m sparse_coding.cache verify DIR
"""

from __future__ import annotations

import argparse
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
from sparse_coding.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_SHARD_ROWS = 32768
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)  # never a partial file (disk full, interrupt)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def layer_key(layer: Any) -> str:
    """The folder name of a layer: hidden-state index as a string, or 'embeddings' / 'data'."""
    return str(layer)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def write_shard(path: Path, arr: np.ndarray) -> str:
    """Write one shard safely: checksum sidecar first, then the shard renamed into place."""
    data = _npy_bytes(arr)
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_write_bytes(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
        _atomic_write_bytes(path, data)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise ConfigError(f"{path}: no space left on device ({human_bytes(len(data))} shard); the shards written so "
                          "far are complete: free space and rerun the same command to resume") from None
    return digest


# --------------------------------------------------------------------------------------------
# One builder at a time, and no leftovers from a killed one


_STALE_TEMP = re.compile(r"\.(shard_\d+\.npy(\.sha256)?|mean\.npy|tokens\.npy|manifest\.json|build\.json)\.tmp-\d+\Z")


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
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[cache] {out}: another process is building this cache; waiting for it (lock {lock_file})",
                  file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
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
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
        if started != identity:
            raise ConfigError(f"{out} holds a partial build of another source or settings "
                              f"({describe_build(started)}; this build: {describe_build(identity)}): {hint}")
        return
    if out.is_dir() and any(p for p in out.iterdir() if not _STALE_TEMP.match(p.name)):
        raise ConfigError(f"{out} is not empty and holds no cache build record (files of something else, or a "
                          f"build from an older version): {hint}")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(record, identity)


def same_build(manifest: dict, identity: dict) -> bool:
    """Whether a finished cache was built from `identity` (caches without a build record: by their fingerprints)."""
    if "build" in manifest:
        return manifest["build"] == identity
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


@contextlib.contextmanager
def replacing(out: Path):
    """`--force`: build into a sibling folder, then swap it in; `out` never holds a mix of old and new.

    Yields the folder to build into. The old cache stays whole until the new one is complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is an existing file, not a cache folder: choose another output folder")
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
    """The manifest of a cache folder; ConfigError when it is missing or not a manifest."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise ConfigError(f"{mf}: no manifest (not a cache, or its build did not finish: rerun the build to resume)")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{mf}: not valid JSON ({e})") from None
    for key in ("format_version", "d", "dtype", "n_rows", "layers", "shards", "rows_per_shard"):
        if key not in m:
            raise ConfigError(f"{mf}: missing field {key!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise ConfigError(f"{mf}: format_version {m['format_version']} is not {FORMAT_VERSION}; rebuild the cache")
    if m["dtype"] not in DTYPES:
        raise ConfigError(f"{mf}: dtype {m['dtype']!r} is not one of {DTYPES}")
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
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{mf}: {what}; the manifest is damaged or crafted: rebuild the cache")

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
        raise ConfigError(f"{p}: resolves outside the cache folder {real_root}; refusing to read it")
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
    if not file.is_file():
        raise ConfigError(f"{file}: shard is missing")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{file}: cannot be read as .npy, truncated or altered ({e})") from None
    if arr.shape != (rows, d) or arr.dtype != np.dtype(dtype):
        raise ConfigError(
            f"{file}: shape {arr.shape} {arr.dtype} does not match the manifest's ({rows}, {d}) {dtype}"
        )
    return arr


# --------------------------------------------------------------------------------------------
# Statistics and manifest


def layer_stats(files: list[Path], rows: list[int], d: int, dtype: str, chunk: int = 65536) -> dict:
    """Mean row and mean squared norm over the finite rows of one layer, in float64."""
    total = np.zeros(d, np.float64)
    sq = 0.0
    n_finite = 0
    n_bad = 0
    first_bad = None
    for f, r in zip(files, rows):
        arr = open_shard(f, r, d, dtype)
        for s in range(0, r, chunk):
            x = np.asarray(arr[s : s + chunk], dtype=np.float64)
            ok = np.isfinite(x).all(axis=1)
            if not ok.all():
                if first_bad is None:
                    first_bad = {"file": f.name, "row": int(s + np.flatnonzero(~ok)[0])}
                n_bad += int((~ok).sum())
                x = x[ok]
            total += x.sum(axis=0)
            sq += float(np.einsum("ij,ij->", x, x))
            n_finite += x.shape[0]
    mean = total / max(n_finite, 1)
    msn = sq / max(n_finite, 1)
    return {
        "mean": mean,
        "n_finite": n_finite,
        "n_nonfinite": n_bad,
        "first_nonfinite": first_bad,
        "mean_sq_norm": msn,
        "centered_mean_sq_norm": msn - float(mean @ mean),
    }


def finish_layer(out: Path, key: str, n_rows: int, rows_per_shard: int, d: int, dtype: str) -> dict:
    """Manifest entries (shards with checksums, statistics) for a layer whose shards are all written."""
    n_shards = -(-n_rows // rows_per_shard)
    rows = [min(rows_per_shard, n_rows - i * rows_per_shard) for i in range(n_shards)]
    files = [out / "layers" / key / shard_name(i) for i in range(n_shards)]
    shards = []
    for f, r in zip(files, rows):
        digest = f.with_name(f.name + ".sha256").read_text().strip()
        shards.append({"file": f.name, "rows": r, "sha256": digest})
    st = layer_stats(files, rows, d, dtype)
    mean_file = out / "layers" / key / "mean.npy"
    _atomic_write_bytes(mean_file, _npy_bytes(st.pop("mean")))
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


def check_disk(out: Path, need: int) -> None:
    """Print the space a build needs and refuse when the disk does not have it."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    print(f"[cache] {out}: needs {human_bytes(need)} on disk (free: {human_bytes(free)})", file=sys.stderr)
    if need > free:
        raise ConfigError(
            f"cache {out} needs {human_bytes(need)} but only {human_bytes(free)} is free: lower corpus.max_tokens, "
            "use cache_dtype=float16, fewer layers, or another cache_dir"
        )


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


# --------------------------------------------------------------------------------------------
# Building from a model


def build_hidden_states(out: Path, *args: Any, force: bool = False, **kwargs: Any) -> Path:
    """Run the model over the corpus once and store `hidden_states[K]` for every K in `layers`.

    Holds the build lock (`build_lock`); see `_build_hidden_states` for the arguments. `force`
    builds a fresh cache beside `out` and swaps it in when complete.
    """
    with build_lock(Path(out)):
        if not force:
            return _build_hidden_states(Path(out), *args, **kwargs)
        with replacing(Path(out)) as new:
            _build_hidden_states(new, *args, **kwargs)
        return Path(out)


def _build_hidden_states(
    out: Path,
    model: Any,
    tokenizer: Any,
    model_info: dict,
    corpus_cfg: Any,
    layers: list[int],
    *,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    corpus_fingerprint: Optional[str] = None,
    fail_after_shards: Optional[int] = None,
) -> Path:
    """Run the model over the corpus once and store `hidden_states[K]` for every K in `layers`.

    Resumes an interrupted build; adds layers to an existing cache of the same tokens.
    `fail_after_shards` raises after that many new shards (fault injection for tests).
    """
    import torch

    from sparse_coding import corpus as corpus_mod

    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"cache_dtype={dtype!r}: choose one of {DTYPES}")
    old = read_manifest(out) if (out / "manifest.json").is_file() else None
    keys = [layer_key(k) for k in layers]
    if old and all(k in old["layers"] for k in keys):
        return out
    cfp = corpus_fingerprint or corpus_mod.corpus_fingerprint(corpus_cfg)
    identity = {"kind": "hidden_states", "model_fingerprint": model_info["fingerprint"], "corpus_fingerprint": cfp,
                "context_len": int(corpus_cfg.context_len), "max_tokens": int(corpus_cfg.max_tokens),
                "keep_special_tokens": bool(corpus_cfg.keep_special_tokens), "corpus_batch_size": int(corpus_cfg.batch_size),
                "dtype": dtype, "shard_rows": int(shard_rows)}
    claim_output(out, identity)
    if old and (old["model"]["fingerprint"] != model_info["fingerprint"] or old["corpus"]["fingerprint"] != cfp):
        raise ConfigError(f"{out}/manifest.json: built from another model or corpus; use another cache_dir or --force")

    t0 = time.time()
    ctx = corpus_mod.build_contexts(corpus_cfg, tokenizer)
    k = ctx.rows_per_context
    B = int(corpus_cfg.batch_size)
    ctx_per_shard = max(1, shard_rows // (B * k)) * B  # shards hold whole batches: a fixed forward grid
    rows_per_shard = ctx_per_shard * k
    n_rows = ctx.n_rows
    n_ctx = -(-n_rows // k)
    n_shards = -(-n_rows // rows_per_shard)
    d = int(model_info["hidden_size"])
    out.mkdir(parents=True, exist_ok=True)

    tokens_file = out / "tokens.npy"
    token_ids = ctx.row_token_ids().astype(np.int32)
    if tokens_file.is_file():
        prev = np.load(tokens_file, allow_pickle=False)
        if not np.array_equal(prev, token_ids):
            raise ConfigError(f"{tokens_file}: holds other tokens than this corpus gives; rebuild with --force")
    else:
        _atomic_write_bytes(tokens_file, _npy_bytes(token_ids))

    def path_of(key: str, s: int) -> Path:
        return out / "layers" / key / shard_name(s)

    todo = [(s, [key for key in keys if not shard_done(path_of(key, s))]) for s in range(n_shards)]
    todo = [(s, miss) for s, miss in todo if miss]
    itemsize = np.dtype(dtype).itemsize
    need = sum(min(rows_per_shard, n_rows - s * rows_per_shard) * d * itemsize * len(miss) for s, miss in todo)
    check_disk(out, need)
    rows_done = n_rows - sum(min(rows_per_shard, n_rows - s * rows_per_shard) for s, _ in todo)
    keep = torch.as_tensor(ctx.keep)
    written = 0
    bar = _progress(n_rows, rows_done, f"{model_info['name']} layers {','.join(keys)}")
    try:
        with torch.inference_mode():
            for s, missing in todo:
                parts: dict[str, list] = {key: [] for key in missing}
                for b0 in range(s * ctx_per_shard, min((s + 1) * ctx_per_shard, n_ctx), B):
                    ids = torch.as_tensor(ctx.input_ids[b0 : min(b0 + B, len(ctx.input_ids))])
                    outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
                    hs = outputs.hidden_states
                    for key in missing:
                        parts[key].append(hs[int(key)][:, keep, :].reshape(-1, d).float().numpy())
                    bar.update(min(ids.shape[0] * k, n_rows - b0 * k))
                lo = s * rows_per_shard
                n = min(rows_per_shard, n_rows - lo)
                for key in missing:
                    arr = np.concatenate(parts[key])[:n].astype(dtype)
                    write_shard(path_of(key, s), arr)
                written += 1
                if fail_after_shards is not None and written >= fail_after_shards:
                    raise RuntimeError(f"fault injection: stopped after {written} shards")
    finally:
        bar.close()

    entries = {key: finish_layer(out, key, n_rows, rows_per_shard, d, dtype) for key in keys}
    base = {
        "kind": "hidden_states",
        "model": {key: model_info[key] for key in ("name", "hub_id", "fingerprint", "num_layers", "hidden_size")},
        "corpus": {
            "name": corpus_cfg.name,
            "fingerprint": cfp,
            "files": [str(f) for f in (corpus_cfg.files or [])] if corpus_cfg.name == "text" else [],
            "context_len": int(corpus_cfg.context_len),
            "max_tokens": int(corpus_cfg.max_tokens),
            "keep_special_tokens": bool(corpus_cfg.keep_special_tokens),
            "rows_per_context": k,
            "keep_positions": [int(i) for i in np.flatnonzero(ctx.keep)],
            "corpus_tokens_read": ctx.corpus_tokens,
        },
        "d": d,
        "dtype": dtype,
        "n_rows": n_rows,
        "n_tokens": n_rows,
        "rows_per_shard": rows_per_shard,
        "tokens": {"file": "tokens.npy", "sha256": sha256_file(tokens_file), "dtype": "int32"},
        "build_seconds": round(time.time() - t0, 2),
        "build": identity,
    }
    write_manifest(out, base, entries, old)
    finish_build(out)
    return out


def write_array_cache(out: Path, *args: Any, force: bool = False, **kwargs: Any) -> Path:
    """A one-layer cache from a row source, under the build lock; see `_write_array_cache`.

    `force` builds a fresh cache beside `out` and swaps it in when complete.
    """
    with build_lock(Path(out)):
        if not force:
            return _write_array_cache(Path(out), *args, **kwargs)
        with replacing(Path(out)) as new:
            _write_array_cache(new, *args, **kwargs)
        return Path(out)


def _write_array_cache(
    out: Path,
    rows: Callable[[int, int], np.ndarray],
    n_rows: int,
    d: int,
    key: str,
    base: dict,
    *,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    token_ids: Optional[np.ndarray] = None,
    identity: Optional[dict] = None,
) -> Path:
    """A one-layer cache from a row source `rows(lo, hi) -> (hi-lo, d)` (import, token embeddings).

    `identity` fingerprints the source and settings (see `claim_output`); without one the base
    description, sizes and settings stand in for it.
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {DTYPES}")
    check_sizes(out, n_rows, d, shard_rows)
    identity = identity or {"kind": base.get("kind"), "base": base, "shape": [n_rows, d], "dtype": dtype,
                            "rows_per_shard": shard_rows}
    identity = json.loads(json.dumps(identity))  # as it will read back from JSON (tuples become lists)
    claim_output(out, identity)
    if (out / "manifest.json").is_file():
        return out
    n_shards = -(-n_rows // shard_rows)
    todo = [s for s in range(n_shards) if not shard_done(out / "layers" / key / shard_name(s))]
    itemsize = np.dtype(dtype).itemsize
    check_disk(out, sum(min(shard_rows, n_rows - s * shard_rows) for s in todo) * d * itemsize)
    t0 = time.time()
    for s in todo:
        lo, hi = s * shard_rows, min((s + 1) * shard_rows, n_rows)
        write_shard(out / "layers" / key / shard_name(s), np.asarray(rows(lo, hi)).astype(dtype))
    extra: dict = {}
    if token_ids is not None:
        _atomic_write_bytes(out / "tokens.npy", _npy_bytes(token_ids.astype(np.int32)))
        extra["tokens"] = {"file": "tokens.npy", "sha256": sha256_file(out / "tokens.npy"), "dtype": "int32"}
    entry = finish_layer(out, key, n_rows, shard_rows, d, dtype)
    full = {**base, **extra, "d": d, "dtype": dtype, "n_rows": n_rows, "rows_per_shard": shard_rows,
            "build_seconds": round(time.time() - t0, 2), "build": identity}
    write_manifest(out, full, {key: entry})
    finish_build(out)
    return out


MAX_SHARD_BYTES = 1 << 31  # a shard is assembled in memory before it is written


def check_sizes(out: Path, n_rows: int, d: int, shard_rows: int) -> None:
    """Sizes a manifest can hold and a shard that fits in memory, before anything is written."""
    if not 1 <= d <= MAX_D:
        raise ConfigError(f"{out}: width d={d} is outside what a cache holds (1..{MAX_D})")
    if not 1 <= n_rows <= MAX_ROWS:
        raise ConfigError(f"{out}: {n_rows} rows is outside what a cache holds (1..{MAX_ROWS})")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ConfigError(f"--shard-rows={shard_rows!r} must be an integer >= 1")
    if min(shard_rows, n_rows) * d * 4 > MAX_SHARD_BYTES:
        raise ConfigError(f"--shard-rows={shard_rows} makes shards of {human_bytes(min(shard_rows, n_rows) * d * 4)} "
                          f"(d={d}); keep a shard under {human_bytes(MAX_SHARD_BYTES)}: use --shard-rows <= "
                          f"{max(1, MAX_SHARD_BYTES // (d * 4))}")


def build_token_embeddings(out: Path, model: Any, model_info: dict, *, dtype: str = "float32",
                           shard_rows: int = DEFAULT_SHARD_ROWS, force: bool = False) -> Path:
    """The rows of the input embedding matrix (vocab × d) as a cache with layer key 'embeddings'."""
    import torch

    with torch.no_grad():
        weight = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    base = {
        "kind": "token_embeddings",
        "model": {key: model_info[key] for key in ("name", "hub_id", "fingerprint", "num_layers", "hidden_size")},
        "corpus": None,
        "n_tokens": 0,
    }
    identity = {"kind": "token_embeddings", "model_fingerprint": model_info["fingerprint"], "dtype": dtype,
                "rows_per_shard": shard_rows}
    return write_array_cache(out, lambda lo, hi: weight[lo:hi], weight.shape[0], weight.shape[1], "embeddings", base,
                             dtype=dtype, shard_rows=shard_rows, token_ids=np.arange(weight.shape[0]),
                             identity=identity, force=force)


# --------------------------------------------------------------------------------------------
# Importing a user's array


def load_user_array(path: Path, key: Optional[str] = None) -> np.ndarray:
    """An (n × d) float array from .npy (memory-mapped), .pt (weights_only) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = _load_npy(path)
    elif suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise ConfigError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({e})") from None
        arr = _pick_tensor(obj, key, path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged or foreign file
            raise ConfigError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:160]})") from None
        arr = _pick_tensor(tensors, key, path)
    else:
        raise ConfigError(f"{path}: use a .npy, .pt or .safetensors file")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"{path}: expected a 2-D (n × d) array, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"{path}: expected floating-point values, got {arr.dtype}")
    return arr


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped, with a message that says what is wrong with a bad one."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise ConfigError(f"{path}: not a .npy file (no NumPy header): save the array with numpy.save") from None
        try:
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"{path}: damaged .npy header ({str(e).splitlines()[0][:120]})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ConfigError(f"{path}: holds Python objects (pickled data), which are never loaded: save a float array")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise ConfigError(f"{path}: truncated: its header says {shape} {dtype} ({human_bytes(need)}) but the file "
                          f"holds {human_bytes(size)}; copy or save it again")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: cannot be read as .npy ({str(e).splitlines()[0][:160]})") from None


def _pick_tensor(obj: Any, key: Optional[str], path: Path) -> np.ndarray:
    import torch

    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if key is not None:
            if key not in tensors:
                raise ConfigError(f"{path}: no tensor named {key!r} (has {', '.join(tensors)})")
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ConfigError(f"{path}: holds tensors {', '.join(tensors)}; choose one with --key")
    if not isinstance(obj, torch.Tensor):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def import_array(input: Path, output: Path, *, dtype: str = "float32", key: Optional[str] = None,
                 shard_rows: int = DEFAULT_SHARD_ROWS, force: bool = False) -> Path:
    """Turn a user's own (n × d) activations into a cache (layer key 'data').

    The input's sha256 and the settings are the build's identity: resuming an interrupted import, or
    importing into a finished cache, with another file or settings is refused (`force` replaces it).
    """
    input = Path(input)
    if Path(output).exists() and not Path(output).is_dir():
        raise ConfigError(f"--output {output} is an existing file, not a cache folder: choose another folder")
    arr = load_user_array(input, key)
    check_sizes(Path(output), int(arr.shape[0]), int(arr.shape[1]), shard_rows)
    digest = sha256_file(input)
    base = {
        "kind": "imported",
        "model": None,
        "corpus": None,
        "source": {"file": str(input.resolve()), "sha256": digest, "key": key},
        "n_tokens": int(arr.shape[0]),
    }
    identity = {"kind": "imported", "source_sha256": digest, "key": key, "shape": [int(arr.shape[0]), int(arr.shape[1])],
                "dtype": dtype, "rows_per_shard": shard_rows}
    return write_array_cache(output, lambda lo, hi: np.asarray(arr[lo:hi]), int(arr.shape[0]), int(arr.shape[1]),
                             "data", base, dtype=dtype, shard_rows=shard_rows, identity=identity, force=force)


# --------------------------------------------------------------------------------------------
# Verification


def verify(path: Path, layers: Optional[Iterable[str]] = None) -> dict:
    """Check every listed file: present, right shape and dtype, sha256 as in the manifest.

    Returns {"files": n, "bytes": n, "seconds": t}; raises ConfigError naming the first bad file.
    """
    path = Path(path)
    t0 = time.time()
    m = read_manifest(path)
    keys = [str(k) for k in (layers if layers is not None else m["layers"])]
    n_files = n_bytes = 0
    for key in keys:
        if key not in m["shards"]:
            raise ConfigError(f"{path}/manifest.json: lists no shards for layer {key}")
        entries = m["shards"][key]
        if sum(e["rows"] for e in entries) != m["n_rows"]:
            raise ConfigError(f"{path}/manifest.json: shards of layer {key} hold {sum(e['rows'] for e in entries)} "
                              f"rows, the manifest says {m['n_rows']}")
        for e in entries:
            f = cache_file(path, f"layers/{key}/{e['file']}")
            open_shard(f, e["rows"], m["d"], m["dtype"])
            if sha256_file(f) != e["sha256"]:
                raise ConfigError(f"{f}: sha256 does not match the manifest (the shard was altered or corrupted)")
            n_files += 1
            n_bytes += f.stat().st_size
        st = m.get("stats", {}).get(key)
        if st is None:
            raise ConfigError(f"{path}/manifest.json: no statistics for layer {key}")
        mf = cache_file(path, st["mean_file"])
        if not mf.is_file() or sha256_file(mf) != st["mean_sha256"]:
            raise ConfigError(f"{mf}: missing or its sha256 does not match the manifest")
        read_mean(mf, m["d"])
    tok = m.get("tokens")
    if tok:
        tf = cache_file(path, tok["file"])
        if not tf.is_file() or sha256_file(tf) != tok["sha256"]:
            raise ConfigError(f"{tf}: missing or its sha256 does not match the manifest")
        n_files += 1
    return {"files": n_files, "bytes": n_bytes, "seconds": round(time.time() - t0, 3)}


def read_mean(file: Path, d: int) -> np.ndarray:
    """A layer's stored mean row: a finite float vector of length d, or ConfigError."""
    try:
        mean = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{file}: cannot be read as .npy ({str(e).splitlines()[0][:120]}); rebuild the cache") from None
    if mean.shape != (d,) or not np.issubdtype(mean.dtype, np.floating) or not np.isfinite(mean).all():
        raise ConfigError(f"{file}: the mean row is {mean.shape} {mean.dtype}, not {d} finite floats; rebuild the cache")
    return mean


def ensure_verified(path: Path, layer: Optional[str] = None) -> dict:
    """Check every shard of the layer(s) a run opens against the manifest's sha256, on every open.

    Nothing about a file (size, mtime) is trusted: a shard altered in place with its mtime kept is
    found here. The cost is one sequential read of the layer per open (sha256 runs at about
    1.9 GB/s on one core here; the read itself is the page cache's or the disk's). `verified.json`
    records the last result; it is never consulted.
    """
    path = Path(path)
    m = read_manifest(path)
    keys = [layer] if layer is not None else [str(k) for k in m["layers"]]
    result = verify(path, keys)
    record = {"manifest_sha256": sha256_file(path / "manifest.json"), "layers": keys,
              "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "last_result": result}
    try:
        _atomic_write_json(path / "verified.json", record)
    except OSError:
        pass  # a read-only cache: the record is optional
    return {"verified": True, "skipped": False, **result}


# --------------------------------------------------------------------------------------------
# From a run config


def cache_dir_for(cfg: Any, model_fingerprint: str, corpus_fingerprint: Optional[str]) -> Path:
    """The cache folder of a run: model, activation kind, corpus, context, size, specials, dtype."""
    name = str(cfg.model.name).replace("/", "--")  # model=hf model.name=ORG/NAME: one folder, as in the hub cache
    root = Path(str(cfg.cache_dir)).expanduser() / f"{name}-{model_fingerprint[:10]}"
    if cfg.activation == "token_embeddings":
        return root / f"token_embeddings-{cfg.cache_dtype}"
    c = cfg.corpus
    special = "special" if c.keep_special_tokens else "nospecial"
    return root / "hidden_states" / (
        f"{c.name}-{corpus_fingerprint[:10]}-ctx{c.context_len}-{c.max_tokens}tok-{special}-{cfg.cache_dtype}"
    )


def ensure_cache(cfg: Any, *, shard_rows: int = DEFAULT_SHARD_ROWS, force: bool = False,
                 fail_after_shards: Optional[int] = None) -> Path:
    """The cache folder for a run config, building whatever is missing (requested layers or embeddings).

    When the cache is complete, neither the model nor the corpus text is loaded.
    """
    from sparse_coding import corpus as corpus_mod
    from sparse_coding import models

    models.validate_model_config(cfg)
    model_dir = models.prepare_model_dir(cfg.model)
    mfp = models.fingerprint_files(model_dir)
    token_emb = cfg.activation == "token_embeddings"
    cfp = None if token_emb else corpus_mod.corpus_fingerprint(cfg.corpus)
    out = cache_dir_for(cfg, mfp, cfp)
    if token_emb:
        keys = ["embeddings"]
    else:
        num_layers, _ = models.read_model_shape(model_dir, cfg.model.name)
        keys = [layer_key(k) for k in models.parse_layers(cfg.layer, num_layers, cfg.model.name)]
    if not force and (out / "manifest.json").is_file() and all(k in read_manifest(out)["layers"] for k in keys):
        return out
    model, tokenizer, info = models.load_model(cfg.model)
    if token_emb:
        return build_token_embeddings(out, model, info, dtype=cfg.cache_dtype, shard_rows=shard_rows, force=force)
    return build_hidden_states(out, model, tokenizer, info, cfg.corpus, [int(k) for k in keys],
                               dtype=cfg.cache_dtype, shard_rows=shard_rows, corpus_fingerprint=cfp,
                               fail_after_shards=fail_after_shards, force=force)


def compose_config(overrides: list[str], config_dir: Optional[Path] = None, config_name: str = "train"):
    """The project's run config (conf/train.yaml) with Hydra-style overrides, via the compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparse_coding.config import register_configs

    register_configs()
    from sparse_coding.paths import config_dir as package_config_dir

    config_dir = Path(config_dir or package_config_dir())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2), like every other error of this tool."""

    def error(self, message: str):  # noqa: D102
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _shard_rows(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-rows={text!r} is not an integer") from None
    if not 1 <= value <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"--shard-rows={value} must be between 1 and {MAX_ROWS}")
    return value


def compose_build_config(overrides: list[str]):
    """The run config of `cache build`, with Hydra's own errors (unknown group, bad syntax) as one line."""
    try:
        return compose_config(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra raises several exception types for a bad override
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot compose the config from {' '.join(overrides) or '(no overrides)'}: {first}") from None


def main(argv: Optional[list[str]] = None) -> int:
    parser = _Parser(prog="python -m sparse_coding.cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="build the cache of a run config (Hydra overrides)")
    b.add_argument("--force", action="store_true", help="build a fresh cache and replace the existing one when done")
    b.add_argument("--shard-rows", type=_shard_rows, default=DEFAULT_SHARD_ROWS)
    b.add_argument("--cfg", action="store_true", help="print the composed config and exit (like train.py --cfg job)")
    b.add_argument("overrides", nargs="*", help="e.g. model=minilm layer=all corpus=wiki corpus.max_tokens=100000")
    i = sub.add_parser("import", help="turn an (n x d) array (.npy, .pt, .safetensors) into a cache")
    i.add_argument("--input", required=True)
    i.add_argument("--output", required=True)
    i.add_argument("--dtype", default="float32", choices=DTYPES)
    i.add_argument("--key", default=None, help="tensor name inside a .pt dict or .safetensors file")
    i.add_argument("--shard-rows", type=_shard_rows, default=DEFAULT_SHARD_ROWS)
    i.add_argument("--force", action="store_true", help="replace an existing cache (or partial import) of another source")
    v = sub.add_parser("verify", help="check every shard's shape and sha256")
    v.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from sparse_coding.config import validate

            cfg = compose_build_config(args.overrides)
            if args.cfg:
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(cfg), end="")
                return 0
            if cfg.model is None:
                raise ConfigError("build needs a model: add model=NAME (e.g. model=minilm layer=all)")
            validate(cfg)
            t0 = time.time()
            out = ensure_cache(cfg, shard_rows=args.shard_rows, force=args.force)
            m = read_manifest(out)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            print(f"{out}\n  layers {', '.join(m['layers'])}; {m['n_rows']} rows × d={m['d']} {m['dtype']}; "
                  f"{human_bytes(size)}; {time.time() - t0:.1f} s")
        elif args.command == "import":
            out = import_array(Path(args.input), Path(args.output), dtype=args.dtype, key=args.key,
                               shard_rows=args.shard_rows, force=args.force)
            m = read_manifest(out)
            print(f"{out}\n  {m['n_rows']} rows × d={m['d']} {m['dtype']} (layer 'data')")
        else:
            if not Path(args.path).is_dir():
                raise ConfigError(f"{args.path}: not a cache folder")
            r = verify(Path(args.path))
            print(f"{args.path}: OK ({r['files']} files, {human_bytes(r['bytes'])}, {r['seconds']} s)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are complete; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
