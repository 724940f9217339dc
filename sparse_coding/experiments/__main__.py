"""CLI: run experiments, the extras, or regenerate the report (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparse_coding.experiments.grid import EXPERIMENTS, SCALES

EXTRAS = ("solver_gap", "functional")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_coding.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every point of the named experiments (finished points are skipped)")
    r.add_argument("names", nargs="+", choices=[*EXPERIMENTS, *EXTRAS])
    r.add_argument("--scale", choices=SCALES, default="quick")
    r.add_argument("--root", type=Path, default=Path("outputs/experiments"), help="where run directories go")
    r.add_argument("--results", type=Path, default=Path("docs/results"), help="where tables and plots go")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    r.add_argument("--no-wandb", action="store_true", help="do not log tables and plots to W&B (offline)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for every point (e.g. --set=trainer.max_epochs=1); changes run keys")
    r.add_argument("--limit", type=int, default=None, help="only the first N points of each experiment")
    r.add_argument("--collect-only", action="store_true",
                   help="train nothing: tabulate the points that have finished (a run cut short by its budget)")
    p = sub.add_parser("report", help="redraw the figures and write docs/RESULTS.md from docs/results/")
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument("--output", type=Path, default=Path("docs/RESULTS.md"))
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    if args.command == "report":
        from sparse_coding.experiments.report import write_report

        print(write_report(args.results, args.output))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sparse_coding.experiments import extras, report, runner

    for name in args.names:
        t0 = time.time()
        if name == "solver_gap":
            rows = extras.solver_gap(args.scale, args.root, extra=args.set)
        elif name == "functional":
            rows = extras.functional_check(args.scale, args.root, extra=args.set)
        elif args.collect_only:
            rows = runner.collect(name, args.scale, args.root, extra=args.set)
        else:
            rows = runner.run_experiment(name, args.scale, args.root, log=lambda s: print(s, flush=True),
                                         extra=args.set, limit=args.limit)
        table = runner.write_csv(rows, args.results / f"{name}.csv")
        report.record_timing(args.results, name, args.scale, time.time() - t0, len(rows))
        plots = report.plot_experiment(name, args.results)
        if not args.no_wandb:
            report.log_to_wandb(name, args.scale, table, plots, args.root)
        print(f"{name}: {len(rows)} rows -> {table}; plots {', '.join(map(str, plots))}; {time.time() - t0:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
