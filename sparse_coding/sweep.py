"""Run a W&B sweep file without a W&B server: offline runs, grouped, uploadable later.

`wandb sweep sweeps/X.yaml` + `wandb agent ID` needs a W&B server. This runs the same YAML locally:
wandb's own open-source sweep engine (the `sweeps` package, `next_run`) proposes each configuration
(grid, random or bayes), the command is built exactly as `wandb agent` builds it (wandb's
`create_sweep_command_args`, so `${args_no_hyphens}` becomes Hydra overrides `key=value`), and each
run is an offline W&B run of the group `SWEEP_ID`, written to OUT/SWEEP_ID/run-K/ with its metrics.json.
`wandb sync OUT/SWEEP_ID/run-*/wandb/offline-run-*` uploads them later as one group.

    python -m sparse_coding.sweep sweeps/synthetic_active.yaml              # grid: every point
    python -m sparse_coding.sweep sweeps/lambda_random.yaml --count 8       # random/bayes: N runs
    python -m sparse_coding.sweep sweeps/lambda_grid.yaml --dry-run         # print the commands only
    python -m sparse_coding.sweep sweeps/layers.yaml -- trainer.max_epochs=2  # extra overrides, every run

A sweep given `--name` that already has a sweep.json continues where it stopped (grid: the points
not yet run). Exit status: 0 when every run succeeded, 1 otherwise, 2 for a bad sweep file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from sparse_coding.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
METRIC = "val/normalized_loss"
RANK_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def load_sweep(path: "str | Path") -> dict:
    """A sweep YAML as a dict, checked by `check_sweep`."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the sweep file ({err})") from None
    check_sweep(config, str(path))
    return config


def check_sweep(config: Any, where: str = "sweep") -> None:
    """wandb's sweep schema plus this project's rules: program train.py, Hydra-style args, our metric."""
    try:
        import sweeps
    except ImportError:
        raise ConfigError("the offline sweep runner needs wandb's sweep engine: pip install --no-deps sweeps "
                          "(the extra sparse-coding[sweeps]; make setup installs it)") from None

    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a sweep file is a YAML mapping")
    problems = sweeps.schema_violations_from_proposed_config(config)
    if problems:
        raise ConfigError(f"{where}: {problems[0]}")
    if config.get("program") != "train.py":
        raise ConfigError(f"{where}: program must be train.py (got {config.get('program')!r})")
    command = [str(c) for c in config.get("command") or []]
    if "${args_no_hyphens}" not in command:
        raise ConfigError(f"{where}: command must contain ${{args_no_hyphens}} so parameters arrive as Hydra overrides")
    if (config.get("metric") or {}).get("name") != METRIC:
        raise ConfigError(f"{where}: metric.name must be {METRIC}")


def _plain(value: Any) -> Any:
    """numpy scalars and containers from the `sweeps` package as plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def propose(config: dict, history: list[dict]) -> Optional[dict]:
    """The next run's parameters {name: value} from the `sweeps` engine, or None when a grid is done."""
    from sweeps import RunState, SweepRun, next_run

    runs = [
        SweepRun(name=h["name"], state=RunState.finished if h["returncode"] == 0 else RunState.failed,
                 config={k: {"value": v} for k, v in h["params"].items()},
                 summary_metrics={METRIC: h["metric"]} if h.get("metric") is not None else {})
        for h in history
    ]
    run = next_run(config, runs, validate=True)
    if run is None:
        return None
    return {k: _plain(v["value"]) for k, v in run.config.items()}


def build_command(config: dict, params: dict, extra: list[str]) -> list[str]:
    """The command `wandb agent` would run for `params` (python = this interpreter), then `extra`."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=[sys.executable], program=[config["program"]], env=["/usr/bin/env"])
    out: list[str] = []
    for chunk in create_sweep_command(list(config.get("command") or [])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += sweep_vars.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out + list(extra)


def read_metric(run_dir: Path) -> Optional[float]:
    """val/normalized_loss from a finished run's metrics.json (None for a bank or a failed run)."""
    try:
        result = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    value = result.get("normalized_loss")
    return float(value) if value is not None else None


def run_sweep(path: "str | Path", *, count: Optional[int] = None, out: "str | Path" = "sweeps_out",
              name: Optional[str] = None, extra: tuple[str, ...] = (), dry_run: bool = False,
              wandb_mode: str = "offline", cwd: Path = ROOT) -> dict:
    """Run (or with dry_run, list) a sweep's configurations; returns the sweep record (also sweep.json)."""
    config = load_sweep(path)
    method = config["method"]
    if count is None and method != "grid":
        raise ConfigError(f"a {method} sweep never runs out of configurations: give --count N")
    sweep_id = name or f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(out).resolve() / sweep_id
    record_file = sweep_dir / "sweep.json"
    record = {"sweep_id": sweep_id, "file": str(path), "config": config, "runs": []}
    if record_file.is_file():
        record["runs"] = json.loads(record_file.read_text())["runs"]
    done_before = len(record["runs"])
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(WANDB_MODE=wandb_mode, WANDB_RUN_GROUP=sweep_id, WANDB_SILENT=env.get("WANDB_SILENT", "true"))
    while count is None or len(record["runs"]) - done_before < count:
        params = propose(config, record["runs"])
        if params is None:
            break
        run_name = f"run-{len(record['runs'])}"
        run_dir = sweep_dir / run_name
        ours = [f"hydra.run.dir={run_dir}", f"logger.group={sweep_id}", f"logger.run_name={sweep_id}-{run_name}",
                f"logger.tags=[sweep,{sweep_id}]"]
        command = build_command(config, params, [*ours, *extra])
        if dry_run:
            print(" ".join(command))
            record["runs"].append({"name": run_name, "params": params, "returncode": 0, "metric": None})
            continue
        print(f"[{sweep_id}] {run_name}: " + " ".join(f"{k}={v}" for k, v in params.items()), flush=True)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(sweep_dir / f"{run_name}.log", "w") as log:
            proc = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        entry = {"name": run_name, "params": params, "command": command, "returncode": proc.returncode,
                 "seconds": round(time.monotonic() - start, 1), "run_dir": str(run_dir),
                 "metric": read_metric(run_dir) if proc.returncode == 0 else None}
        record["runs"].append(entry)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        status = f"{METRIC}={entry['metric']:.4g}" if entry["metric"] is not None else f"exit {proc.returncode}"
        print(f"[{sweep_id}] {run_name}: {status} ({entry['seconds']} s; log {sweep_dir / (run_name + '.log')})",
              flush=True)
    if dry_run:
        record["runs"] = record["runs"][:done_before]
    elif record["runs"][done_before:]:
        print(f"sweep {sweep_id}: {len(record['runs'])} runs in {sweep_dir}\n"
              f"upload later: wandb sync {sweep_dir}/run-*/wandb/offline-run-*")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_coding.sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- are Hydra overrides added to every run.")
    parser.add_argument("sweep_file")
    parser.add_argument("--count", type=int, default=None, help="runs to start (required for random and bayes)")
    parser.add_argument("--out", default="sweeps_out", help="folder of the sweeps (default: sweeps_out)")
    parser.add_argument("--name", default=None, help="sweep id / W&B group (default: FILE-DATE-TIME); reuse to continue")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command, run nothing")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    try:
        record = run_sweep(args.sweep_file, count=args.count, out=args.out, name=args.name, extra=tuple(extra),
                           dry_run=args.dry_run, wandb_mode=args.wandb_mode)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(r["returncode"] == 0 for r in record["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
