"""Building activation caches: hidden states of a model over a corpus, token embeddings, a user's array.

Every builder holds the build lock, claims its output folder with a build identity, writes
shards that resume after an interruption and writes the manifest last (the format is in
`cache.store`). `ensure_cache` gives the cache folder of a run config, building what is missing.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from sparse_coding.cache.store import (
    DTYPES,
    MAX_D,
    MAX_ROWS,
    LayerStats,
    ShardFile,
    build_lock,
    check_replaceable,
    claim_output,
    finish_build,
    finish_layer,
    human_bytes,
    layer_key,
    open_shard,
    read_manifest,
    replacing,
    sha256_file,
    shard_done,
    shard_name,
    write_manifest,
    write_npy,
    write_shard,
)
from sparse_coding.errors import ConfigError, DataError, StorageError

DEFAULT_SHARD_ROWS = 32768


# --------------------------------------------------------------------------------------------
# Disk space and progress


def check_disk(out: Path, need: int) -> None:
    """Print the space a build needs and refuse when the disk does not have it."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    print(f"[cache] {out}: needs {human_bytes(need)} on disk (free: {human_bytes(free)})", file=sys.stderr)
    if need > free:
        raise StorageError(
            f"cache {out} needs {human_bytes(need)} but only {human_bytes(free)} is free: lower corpus.max_tokens, "
            "use cache_dtype=float16, fewer layers, or another cache_dir"
        )


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


# --------------------------------------------------------------------------------------------
# Building from a model


class _BackgroundWriter:
    """Runs jobs on one thread, in the order given, while the caller goes on (the next forward pass).

    `submit` waits while `depth` jobs are unfinished and raises the first error of a finished one; `wait` waits
    for them all and raises the first error; `close` waits for them all without raising (an error of the
    caller's is already on its way).
    """

    def __init__(self, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._pending: list = []
        self._depth = depth

    def submit(self, fn: Callable, *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        from concurrent.futures import wait

        wait(self._pending)
        self._pending = []
        self._pool.shutdown()


def _device_of(model: Any) -> Any:
    """The device the model's weights are on (the forward pass runs there)."""
    import torch

    return next(model.parameters(), torch.empty(0)).device


def _describe_device(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _kept_positions(keep: np.ndarray, device: Any) -> Any:
    """The context positions stored, as a slice when they are contiguous (always, for `build_contexts`'s
    contexts: the special tokens are at the ends), else as an index tensor on `device`."""
    import torch

    positions = np.flatnonzero(keep)
    if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return torch.as_tensor(positions, device=device)


def _locked_build(build: Callable[..., Any], out: Path, force: bool, *args: Any, **kwargs: Any) -> Path:
    """Run `build(out, ...)` under the build lock (`build_lock`). `force` builds a fresh cache beside `out` and
    swaps it in when complete (only over a cache: `check_replaceable`)."""
    out = Path(out)
    if force:
        check_replaceable(out)  # before the lock file beside it is made; again under the lock
    with build_lock(out):
        if not force:
            return build(out, *args, **kwargs)
        with replacing(out) as new:
            build(new, *args, **kwargs)
        return out


def build_hidden_states(out: Path, *args: Any, force: bool = False, **kwargs: Any) -> Path:
    """Run the model over the corpus once and store `hidden_states[K]` for every K in `layers`.

    Holds the build lock; see `_build_hidden_states` for the arguments and `_locked_build` for `force`.
    """
    return _locked_build(_build_hidden_states, out, force, *args, **kwargs)


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
) -> Path:
    """Run the model over the corpus once and store `hidden_states[K]` for every K in `layers`.

    The forward pass runs where the model is (CPU or CUDA) in its own dtype; each batch's hidden states are copied
    once, into the shard being filled, in the cache dtype. A finished shard is written (sha256, file, fsync) and
    added to its layer's statistics on a background thread while the next shard's forward passes run.
    Resumes an interrupted build; adds layers to an existing cache of the same tokens.
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
                "dtype": dtype, "shard_rows": int(shard_rows), "model_dtype": model_info.get("dtype", "float32")}
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
            raise DataError(f"{tokens_file}: holds other tokens than this corpus gives; rebuild with --force")
    else:
        write_npy(tokens_file, token_ids)

    def path_of(key: str, s: int) -> Path:
        return out / "layers" / key / shard_name(s)

    def shard_rows_of(s: int) -> int:
        return min(rows_per_shard, n_rows - s * rows_per_shard)

    missing = [[key for key in keys if not shard_done(path_of(key, s))] for s in range(n_shards)]
    itemsize = np.dtype(dtype).itemsize
    need = sum(shard_rows_of(s) * d * itemsize * len(miss) for s, miss in enumerate(missing))
    check_disk(out, need)
    rows_done = n_rows - sum(shard_rows_of(s) for s, miss in enumerate(missing) if miss)
    device = _device_of(model)
    kept = _kept_positions(ctx.keep, device)
    stats = {key: LayerStats(d) for key in keys}
    opened: list[ShardFile] = []  # every shard file begun (a finished one is left alone by `discard`)

    def write_rows(pieces: list[tuple[ShardFile, np.ndarray]]) -> None:
        for file, rows in pieces:
            file.write(rows)

    def finish_shard(s: int, shard: dict[str, tuple[ShardFile, np.ndarray]]) -> None:
        """Shard `s` of every layer in place (those in `shard`, each let go once done) and added to the layer's
        statistics, in shard order."""
        for key in keys:
            file, arr = shard.pop(key, (None, None))
            if file is None:  # written by an earlier, interrupted build
                arr = open_shard(path_of(key, s), shard_rows_of(s), d, dtype)
            else:
                file.finish()
            stats[key].add(arr, shard_name(s))
            del arr

    bar = _progress(n_rows, rows_done, f"{model_info['name']} layers {','.join(keys)}")
    # the forward pass runs here; a background thread writes each batch's rows as they come (sha256 and file),
    # and finishes each shard (fsync, sidecar, rename, statistics)
    writer = _BackgroundWriter()
    try:
        with torch.inference_mode():
            for s in range(n_shards):
                if not missing[s]:
                    writer.submit(finish_shard, s, {})
                    continue
                c0, c1 = s * ctx_per_shard, min((s + 1) * ctx_per_shard, n_ctx)
                n = shard_rows_of(s)
                files = {key: ShardFile(path_of(key, s), n, d, dtype) for key in missing[s]}
                opened.extend(files.values())
                # shard s of every missing layer, filled batch by batch: one copy from the model's output
                shard = {key: np.empty((c1 - c0, k, d), dtype=dtype) for key in missing[s]}
                for b0 in range(c0, c1, B):
                    b1 = min(b0 + B, c1)
                    ids = torch.as_tensor(ctx.input_ids[b0:b1]).to(device)
                    hs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
                    for key, arr in shard.items():
                        torch.from_numpy(arr[b0 - c0 : b1 - c0]).copy_(hs[int(key)][:, kept])
                    lo, hi = (b0 - c0) * k, min((b1 - c0) * k, n)  # the rows of this batch the shard keeps
                    writer.submit(write_rows, [(files[key], arr.reshape(-1, d)[lo:hi]) for key, arr in shard.items()])
                    bar.update(hi - lo)
                writer.submit(finish_shard, s, {key: (files[key], arr.reshape(-1, d)[:n]) for key, arr in shard.items()})
                del shard, files  # the writer holds them now, and lets each layer go once done
        writer.wait()
    finally:
        writer.close()
        bar.close()
        for file in opened:  # shards left unfinished by an error or an interrupt
            file.discard()

    entries = {key: finish_layer(out, key, n_rows, rows_per_shard, d, dtype, stats[key]) for key in keys}
    base = {
        "kind": "hidden_states",
        "model": {**{key: model_info[key] for key in ("name", "hub_id", "fingerprint", "num_layers", "hidden_size")},
                  "dtype": model_info.get("dtype", "float32")},
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
        "build_device": _describe_device(device),  # provenance only: not part of the build identity
        "build": identity,
    }
    write_manifest(out, base, entries, old)
    finish_build(out)
    return out


def write_array_cache(out: Path, *args: Any, force: bool = False, **kwargs: Any) -> Path:
    """A one-layer cache from a row source, under the build lock; see `_write_array_cache` and `_locked_build`."""
    return _locked_build(_write_array_cache, out, force, *args, **kwargs)


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
        write_npy(out / "tokens.npy", token_ids.astype(np.int32))
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
        raise DataError(f"{out}: width d={d} is outside what a cache holds (1..{MAX_D})")
    if not 1 <= n_rows <= MAX_ROWS:
        raise DataError(f"{out}: {n_rows} rows is outside what a cache holds (1..{MAX_ROWS})")
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
        "model": {**{key: model_info[key] for key in ("name", "hub_id", "fingerprint", "num_layers", "hidden_size")},
                  "dtype": model_info.get("dtype", "float32")},
        "corpus": None,
        "n_tokens": 0,
    }
    identity = {"kind": "token_embeddings", "model_fingerprint": model_info["fingerprint"], "dtype": dtype,
                "rows_per_shard": shard_rows, "model_dtype": model_info.get("dtype", "float32")}
    return write_array_cache(out, lambda lo, hi: weight[lo:hi], weight.shape[0], weight.shape[1], "embeddings", base,
                             dtype=dtype, shard_rows=shard_rows, token_ids=np.arange(weight.shape[0]),
                             identity=identity, force=force)


# --------------------------------------------------------------------------------------------
# Importing a user's array


def load_user_array(path: Path, key: Optional[str] = None) -> np.ndarray:
    """An (n × d) float array from .npy (memory-mapped), .pt (weights_only) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = _load_npy(path)
    elif suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise DataError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({e})") from None
        arr = _pick_tensor(obj, key, path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged or foreign file
            raise DataError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:160]})") from None
        arr = _pick_tensor(tensors, key, path)
    else:
        raise DataError(f"{path}: use a .npy, .pt or .safetensors file")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{path}: expected a 2-D (n × d) array, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: expected floating-point values, got {arr.dtype}")
    return arr


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped, with a message that says what is wrong with a bad one."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise DataError(f"{path}: not a .npy file (no NumPy header): save the array with numpy.save") from None
        try:
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{path}: damaged .npy header ({str(e).splitlines()[0][:120]})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects (pickled data), which are never loaded: save a float array")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise DataError(f"{path}: truncated: its header says {shape} {dtype} ({human_bytes(need)}) but the file "
                        f"holds {human_bytes(size)}; copy or save it again")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot be read as .npy ({str(e).splitlines()[0][:160]})") from None


def _pick_tensor(obj: Any, key: Optional[str], path: Path) -> np.ndarray:
    import torch

    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if key is not None:
            if key not in tensors:
                raise DataError(f"{path}: no tensor named {key!r} (has {', '.join(tensors)})")
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise DataError(f"{path}: holds tensors {', '.join(tensors)}; choose one with --key")
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def check_representable(arr: np.ndarray, dtype: str, path: Path, chunk_rows: int = 65536) -> None:
    """Refuse, with one line, finite values that the cache's dtype cannot hold (float64 above float32's range, or
    float32 above float16's): stored they would become inf without a word."""
    target = np.dtype(dtype)
    if np.finfo(arr.dtype).max <= np.finfo(target).max:
        return
    count, largest = 0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, arr.shape[0], chunk_rows):
            a = np.asarray(arr[lo:lo + chunk_rows])
            bad = np.isfinite(a) & ~np.isfinite(a.astype(target))
            if bad.any():
                count += int(bad.sum())
                largest = max(largest, float(np.abs(a[bad]).max()))
    if count:
        raise DataError(f"{path}: {count} finite value{'s' if count != 1 else ''} (largest |x| = {largest:.3g}) "
                        f"exceed the range of {dtype} (|x| <= {float(np.finfo(target).max):.3g}) and would be stored "
                        f"as inf: scale the array down{' or import with --dtype float32' if dtype == 'float16' else ''}")


def import_array(input: Path, output: Path, *, dtype: str = "float32", key: Optional[str] = None,
                 shard_rows: int = DEFAULT_SHARD_ROWS, force: bool = False) -> Path:
    """Turn a user's own (n × d) activations into a cache (layer key 'data').

    The input's sha256 and the settings are the build's identity: resuming an interrupted import, or
    importing into a finished cache, with another file or settings is refused (`force` replaces it).
    """
    input = Path(input)
    if Path(output).exists() and not Path(output).is_dir():
        raise ConfigError(f"--output {output} is an existing file, not a cache folder: choose another folder")
    if force:
        check_replaceable(Path(output))  # before reading the input: a run directory given by mistake is refused at once
    arr = load_user_array(input, key)
    check_sizes(Path(output), int(arr.shape[0]), int(arr.shape[1]), shard_rows)
    check_representable(arr, dtype, input)
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
# From a run config


def cache_dir_for(cfg: Any, model_fingerprint: str, corpus_fingerprint: Optional[str]) -> Path:
    """The cache folder of a run: every setting that changes the activations it holds (model weights and tokenizer,
    activation kind, corpus, context, size, specials, the model's compute dtype `model.dtype`, the stored dtype).
    A model run in float32 (the default) keeps the folder name it always had; another `model.dtype` adds
    `-model_DTYPE` (a float16 model's activations are not a float32 model's)."""
    name = str(cfg.model.name).replace("/", "--")  # model=hf model.name=ORG/NAME: one folder, as in the hub cache
    root = Path(str(cfg.cache_dir)).expanduser() / f"{name}-{model_fingerprint[:10]}"
    model_dtype = str(getattr(cfg.model, "dtype", None) or "float32")
    computed = "" if model_dtype == "float32" else f"-model_{model_dtype}"
    if cfg.activation == "token_embeddings":
        return root / f"token_embeddings-{cfg.cache_dtype}{computed}"
    c = cfg.corpus
    special = "special" if c.keep_special_tokens else "nospecial"
    return root / "hidden_states" / (
        f"{c.name}-{corpus_fingerprint[:10]}-ctx{c.context_len}-{c.max_tokens}tok-{special}-{cfg.cache_dtype}{computed}"
    )


def ensure_cache(cfg: Any, *, model: Any = None, shard_rows: int = DEFAULT_SHARD_ROWS, force: bool = False) -> Path:
    """The cache folder for a run config, building whatever is missing (requested layers or embeddings).

    `model`: the validated plan's model (`RunPlan.data.model`), whose shape is then not read again. Without it the
    model, layer and corpus settings are checked first (the model's shape read once), so a caller that did not
    validate the config gets one line, not a traceback. When the cache is complete, neither the model nor the
    corpus text is loaded.
    """
    from sparse_coding import corpus as corpus_mod
    from sparse_coding import models
    from sparse_coding.config.checks import check_model
    from sparse_coding.config.plan import resolve_model

    if model is None:
        model = resolve_model(cfg)  # the model's folder and shape (config.json read once)
        check_model(cfg, model)
    model_dir = models.prepare_model_dir(cfg.model)
    mfp = models.fingerprint_files(model_dir)
    token_emb = cfg.activation == "token_embeddings"
    cfp = None if token_emb else corpus_mod.corpus_fingerprint(cfg.corpus)
    out = cache_dir_for(cfg, mfp, cfp)
    if token_emb:
        keys = ["embeddings"]
    else:
        keys = [layer_key(k) for k in models.parse_layers(cfg.layer, model.num_layers, cfg.model.name)]
    if not force and (out / "manifest.json").is_file() and all(k in read_manifest(out)["layers"] for k in keys):
        return out
    # the forward pass runs on model.device (token embeddings are read from the weights: no forward pass)
    model, tokenizer, info = models.load_model(cfg.model, device="cpu" if token_emb else models.resolve_device(cfg.model))
    if token_emb:
        return build_token_embeddings(out, model, info, dtype=cfg.cache_dtype, shard_rows=shard_rows, force=force)
    return build_hidden_states(out, model, tokenizer, info, cfg.corpus, [int(k) for k in keys],
                               dtype=cfg.cache_dtype, shard_rows=shard_rows, corpus_fingerprint=cfp, force=force)
