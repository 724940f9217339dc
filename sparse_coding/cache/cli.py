"""The cache CLI (console script `sparse-coding-cache`)::

    python -m sparse_coding.cache build model=minilm layer=all corpus=wiki corpus.max_tokens=100000
    python -m sparse_coding.cache import --input acts.npy --output DIR
    python -m sparse_coding.cache verify DIR

`build` composes a run config from the overrides, checks it (sparse_coding.config.checks) and builds
what is missing (`cache.build.ensure_cache`); `import` turns an array into a cache; `verify` checks
every file against the manifest. Errors are one line (exit 2); Ctrl-C keeps the finished shards (130).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from sparse_coding.cache.build import DEFAULT_SHARD_ROWS, ensure_cache, import_array
from sparse_coding.cache.store import DTYPES, MAX_ROWS, human_bytes, read_manifest, verify
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError, DataError, SparseCodingError


DESCRIPTION = "The activation cache: sharded memory-mappable `.npy` files per layer, checksummed, resumable."


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
    parser = _Parser(prog="python -m sparse_coding.cache", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="build the cache of a run config (Hydra overrides)")
    b.add_argument("--force", action="store_true",
                   help="build a fresh cache and replace the existing one when done (only a cache folder is replaced)")
    b.add_argument("--shard-rows", type=_shard_rows, default=DEFAULT_SHARD_ROWS)
    b.add_argument("--cfg", action="store_true", help="print the composed config and exit (like train.py --cfg job)")
    b.add_argument("overrides", nargs="*", help="e.g. model=minilm layer=all corpus=wiki corpus.max_tokens=100000")
    i = sub.add_parser("import", help="turn an (n x d) array (.npy, .pt, .safetensors) into a cache")
    i.add_argument("--input", required=True)
    i.add_argument("--output", required=True)
    i.add_argument("--dtype", default="float32", choices=DTYPES)
    i.add_argument("--key", default=None, help="tensor name inside a .pt dict or .safetensors file")
    i.add_argument("--shard-rows", type=_shard_rows, default=DEFAULT_SHARD_ROWS)
    i.add_argument("--force", action="store_true", help="replace an existing cache (or partial import) of another source; "
                   "a folder that is not a cache (a run directory, your files) is refused, never replaced")
    v = sub.add_parser("verify", help="check every shard's shape and sha256")
    v.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from sparse_coding.config.checks import validate

            cfg = compose_build_config(args.overrides)
            if args.cfg:
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(cfg), end="")
                return 0
            if cfg.model is None:
                raise ConfigError("build needs a model: add model=NAME (e.g. model=minilm layer=all)")
            plan = validate(cfg)
            t0 = time.time()
            out = ensure_cache(cfg, model=plan.data.model, shard_rows=args.shard_rows, force=args.force)
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
                raise DataError(f"{args.path}: not a cache folder")
            r = verify(Path(args.path))
            print(f"{args.path}: OK ({r['files']} files, {human_bytes(r['bytes'])}, {r['seconds']} s)")
    except SparseCodingError as e:
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
