"""CLI: run experiments, the extras, the massive-activation analysis, or regenerate the report.

    python -m sparse_coding.experiments run sparsity --scale paper          # -> docs/results/paper/
    python -m sparse_coding.experiments run layers --scale paper --only model=smollm2
    python -m sparse_coding.experiments massive data/cache/<cache folder>   # per-position / per-dimension norms
    python -m sparse_coding.experiments report
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparse_coding.errors import SparseCodingError
from sparse_coding.experiments.grid import EXPERIMENTS, SCALE_ALIASES, SCALES

EXTRAS = ("solver_gap", "functional")
RESULTS = {"quick": Path("docs/results"), "paper": Path("docs/results/paper")}


def _only(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--only {item!r}: use KEY=VALUE, e.g. --only model=smollm2")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_coding.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every point of the named experiments (finished points are skipped)")
    r.add_argument("names", nargs="+", choices=[*EXPERIMENTS, *EXTRAS])
    r.add_argument("--scale", choices=[*SCALES, *SCALE_ALIASES], default="quick",
                   help="quick: the d=64 report's settings; paper: the settings this project reads as the paper's (not "
                        "verified), trained until converged (full = paper)")
    r.add_argument("--root", type=Path, default=Path("outputs/experiments"), help="where run directories go")
    r.add_argument("--results", type=Path, default=None,
                   help="where tables and plots go (default: docs/results for quick, docs/results/paper for paper)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    r.add_argument("--no-wandb", action="store_true", help="do not log tables and plots to W&B (offline)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for every point (e.g. --set=trainer.max_epochs=1); changes run keys")
    r.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="only the points whose KEY is VALUE (e.g. --only model=smollm2 --only seed-free keys of the "
                        "tables: a, data, model, layer, source); the CSV then holds every finished point. "
                        "functional: model=NAME, layer=K[,K...], preprocess=raw|remedy")
    r.add_argument("--limit", type=int, default=None, help="only the first N points of each experiment")
    r.add_argument("--collect-only", action="store_true",
                   help="train nothing: tabulate the points that have finished (a run cut short by its budget)")
    m = sub.add_parser("massive", help="per-position and per-dimension norms of a cache's layers (massive activations)")
    m.add_argument("cache", type=Path, nargs="+", help="cache folder(s) built by `python -m sparse_coding.cache build`")
    m.add_argument("--layers", default=None, help="comma-separated layer keys (default: every layer)")
    m.add_argument("--max-rows", type=int, default=65536, help="rows read per layer (from the start of the cache)")
    m.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p = sub.add_parser("report", help="redraw the figures and write docs/RESULTS.md from docs/results/")
    p.add_argument("--results", type=Path, default=Path("docs/results"),
                   help="quick-scale tables; the paper-scale ones are read from RESULTS/paper/")
    p.add_argument("--output", type=Path, default=Path("docs/RESULTS.md"))
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return run_command(args)
    except SparseCodingError as err:  # a bad --set override, a missing cache, a full disk: one line
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    if args.command == "report":
        from sparse_coding.experiments.report import write_report

        print(write_report(args.results, args.output))
        return 0
    if args.command == "massive":
        from sparse_coding.experiments.massive import main as massive_main

        return massive_main(args.cache, args.layers, args.max_rows, args.json)

    import torch

    scale = SCALE_ALIASES.get(args.scale, args.scale)
    results = args.results if args.results is not None else RESULTS[scale]
    only = _only(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparse_coding.experiments import extras, report, runner

    for name in args.names:
        if name in EXPERIMENTS and not EXPERIMENTS[name](scale):
            print(f"{name}: no points at scale {scale} (controls_d256 is the quick scale's d=256 repeat; "
                  "at paper scale `controls` is d=256)", flush=True)
            continue
        t0 = time.time()
        load = os.getloadavg()[0]
        if name == "solver_gap":
            rows = extras.solver_gap(scale, args.root, extra=args.set)
        elif name == "functional":
            if set(only) - {"model", "layer", "preprocess"}:
                raise SystemExit(f"--only {sorted(set(only) - {'model', 'layer', 'preprocess'})[0]}=...: the functional "
                                 "check selects by model=NAME, layer=K[,K...] and preprocess=raw|remedy only (it uses "
                                 "each layer's seed-0 dictionary)")
            if only.get("preprocess", "raw") not in ("raw", "remedy"):
                raise SystemExit(f"--only preprocess={only['preprocess']}: raw (the layers curve) or remedy "
                                 "(layers_remedy)")
            curve = "layers_remedy" if only.get("preprocess") == "remedy" else "layers"
            checked = tuple(only["model"].split(",")) if "model" in only else extras.FUNCTIONAL_MODELS
            if not set(checked) <= set(extras.FUNCTIONAL_MODELS):
                raise SystemExit(f"--only model={only['model']}: the functional check runs on "
                                 f"{', '.join(extras.FUNCTIONAL_MODELS)}")
            try:  # the check's own layer list: --only layer=15,18 (the other rows of functional.csv are kept)
                layers = [int(k) for k in only["layer"].split(",")] if "layer" in only else None
            except ValueError:
                raise SystemExit(f"--only layer={only['layer']}: give hidden states as integers, e.g. layer=15,18")
            rows = extras.functional_check(scale, args.root, models_to_check=checked, layers=layers, extra=args.set,
                                           curve=curve)
        elif args.collect_only:
            rows = runner.collect(name, scale, args.root, extra=args.set)
        else:
            runner.run_experiment(name, scale, args.root, log=lambda s: print(s, flush=True), extra=args.set,
                                  limit=args.limit, only=only)
            # the table holds every finished point, also those an --only/--limit run did not touch
            rows = runner.collect(name, scale, args.root, extra=args.set)
        rows = runner.keep_committed(rows, results / f"{name}.csv")
        table = runner.write_csv(rows, results / f"{name}.csv")
        report.record_timing(results, name, scale, time.time() - t0, len(rows), load=(load, os.getloadavg()[0]))
        plots = report.plot_experiment(name, results)
        if not args.no_wandb:
            report.log_to_wandb(name, scale, table, plots, args.root)
        print(f"{name}: {len(rows)} rows -> {table}; plots {', '.join(map(str, plots))}; {time.time() - t0:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
