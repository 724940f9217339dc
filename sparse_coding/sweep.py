"""Run a W&B sweep file without a W&B server: offline runs, grouped, uploadable later.

`wandb sweep FILE.yaml` + `wandb agent ID` needs a W&B server. This runs the same YAML locally:
wandb's own open-source sweep engine (the `sweeps` package, `next_run`) proposes each configuration
(grid, random or bayes), the command is built exactly as `wandb agent` builds it (wandb's
`create_sweep_command_args`, so `${args_no_hyphens}` becomes Hydra overrides `key=value`), and each
run is a W&B run of the group SWEEP_ID (offline unless --wandb-mode says otherwise), written to
OUT/SWEEP_ID/run-K/ with its metrics.json. Offline runs upload later as one group with
`wandb sync OUT/SWEEP_ID/run-*/wandb/offline-run-*`.

    sparse-coding-sweep --list                                    # the sweep files shipped with the package
    sparse-coding-sweep lambda_grid                               # a shipped sweep by name (grid: every point)
    sparse-coding-sweep lambda_random --count 8                   # random/bayes: N runs
    sparse-coding-sweep lambda_grid --dry-run                     # print the commands only
    sparse-coding-sweep my_sweep.yaml -- trainer.max_epochs=2     # a file; extra overrides for every run

(`python -m sparse_coding.sweep` is the same.) Runs start in the current directory, as under `wandb
agent`. The sweep files run the training entry point as `python -m sparse_coding OVERRIDES` (`program:
sparse_coding`), so they work from any directory wherever the package is installed, under this runner
and under `wandb agent` alike; in a repository checkout `program: train.py` runs its train.py too.
A sweep file's `command` could start any program: this runner runs only the training entry point and
refuses anything else (other programs, interpreter flags, Hydra flags, `hydra.*` keys and `_target_`
objects in the file's arguments) unless given --allow-any-command.

A run that fails stops the sweep with one line (its exit status, the last line of its log and the
log's path; --keep-going runs the remaining configurations instead). A sweep given `--name` that
already has a sweep.json continues where it stopped (grid: the points not yet run, failed ones again).
Exit status: 0 when every run succeeded, 1 when a run failed, 2 for a bad or refused sweep file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from sparse_coding.errors import ConfigError, SparseCodingError

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
METRIC = "val/normalized_loss"
ENTRY_MODULE = "sparse_coding"  # `python -m sparse_coding` = train.py = sparse-coding-train
CHECKOUT_PROGRAM = "train.py"  # a repository checkout's entry point (ROOT/train.py)
ENV_PROGRAM = "/usr/bin/env"  # what wandb agent puts for ${env}
RANK_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
ALLOW_HINT = "give --allow-any-command to run it anyway"


def sweeps_dir() -> Path:
    """The sweep files: shipped inside the package when installed (sparse_coding/sweeps), `sweeps/` in a checkout."""
    installed = PACKAGE_DIR / "sweeps"
    if any(installed.glob("*.yaml")):
        return installed
    return ROOT / "sweeps"


def sweep_names() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def find_sweep(name: "str | Path") -> Path:
    """A sweep file: a path to a file, else the name of a shipped sweep (`lambda_grid`, `lambda_grid.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = sweeps_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    names = ", ".join(sweep_names()) or "none"
    raise ConfigError(f"{name}: no such sweep file, nor a shipped sweep of that name (shipped: {names})")


def load_sweep(path: "str | Path", allow_any_command: bool = False) -> dict:
    """A sweep YAML as a dict, checked by `check_sweep`."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the sweep file ({err})") from None
    check_sweep(config, str(path), allow_any_command)
    return config


def check_sweep(config: Any, where: str = "sweep", allow_any_command: bool = False) -> None:
    """wandb's sweep schema plus this project's rules: program sparse_coding (or train.py in a checkout),
    Hydra-style args, our metric."""
    try:
        with warnings.catch_warnings():  # its pydantic-v1 style config warns on every import: noise to a user
            warnings.simplefilter("ignore", UserWarning)
            import sweeps
    except ImportError:
        raise ConfigError("the offline sweep runner needs wandb's sweep engine: pip install --no-deps sweeps "
                          "(the extra sparse-coding[sweeps]; make setup installs it)") from None

    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a sweep file is a YAML mapping")
    problems = sweeps.schema_violations_from_proposed_config(config)
    if problems:
        raise ConfigError(f"{where}: {problems[0]}")
    if not allow_any_command and config.get("program") not in (ENTRY_MODULE, CHECKOUT_PROGRAM):
        raise ConfigError(f"{where}: program must be {ENTRY_MODULE} (run as python -m {ENTRY_MODULE}; got "
                          f"{config.get('program')!r}); {ALLOW_HINT}")
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


def _program(config: dict) -> str:
    """`${program}`: train.py is the checkout's own file (absolute: runs start in the current directory)."""
    program = str(config.get("program") or "")
    if program == CHECKOUT_PROGRAM and (ROOT / CHECKOUT_PROGRAM).is_file():
        return str(ROOT / CHECKOUT_PROGRAM)
    return program


def build_command(config: dict, params: dict, extra: list[str]) -> list[str]:
    """The command `wandb agent` would run for `params` (python = this interpreter), then `extra`."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=[sys.executable], program=[_program(config)], env=[ENV_PROGRAM])
    out: list[str] = []
    for chunk in create_sweep_command(list(config.get("command") or [])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += sweep_vars.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out + list(extra)


def entry_point_problem(command: list[str]) -> Optional[str]:
    """None when `command` (built from a sweep file, before our own overrides) runs the training entry point
    with plain Hydra overrides; else what is wrong with it."""
    rest = command[1:] if command[:1] == [ENV_PROGRAM] else command
    checkout = str(ROOT / CHECKOUT_PROGRAM)
    if rest[:3] == [sys.executable, "-m", ENTRY_MODULE]:
        args = rest[3:]
    elif rest[:2] == [sys.executable, checkout] and Path(checkout).is_file():
        args = rest[2:]
    else:
        shown = " ".join(command[:4]) + (" ..." if len(command) > 4 else "")
        return f"it runs {shown!r}, not the training entry point ({sys.executable} -m {ENTRY_MODULE} OVERRIDES)"
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if arg.startswith("-") or "=" not in arg:
            return f"its argument {arg!r} is not a Hydra override key=value"
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            return f"its argument {arg!r} changes Hydra itself"
        if "_target_" in arg:
            return f"its argument {arg!r} builds an arbitrary Python object (_target_)"
    return None


def read_metric(run_dir: Path) -> Optional[float]:
    """val/normalized_loss from a finished run's metrics.json (None for a bank or a failed run)."""
    try:
        result = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    value = result.get("normalized_loss")
    return float(value) if value is not None else None


def last_line(log: Path) -> str:
    """The last non-empty line of a run's log (its error), shortened."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_sweep(path: "str | Path", *, count: Optional[int] = None, out: "str | Path" = "sweeps_out",
              name: Optional[str] = None, extra: tuple[str, ...] = (), dry_run: bool = False,
              wandb_mode: str = "offline", cwd: "str | Path | None" = None, allow_any_command: bool = False,
              keep_going: bool = False) -> dict:
    """Run (or with dry_run, list) a sweep's configurations; returns the sweep record (also sweep.json).

    `path` is a sweep file or the name of a shipped one. Runs start in `cwd` (default: the current directory).
    """
    path = find_sweep(path)
    config = load_sweep(path, allow_any_command)
    method = config["method"]
    if count is None and method != "grid":
        raise ConfigError(f"a {method} sweep never runs out of configurations: give --count N")
    sweep_id = name or f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(out).resolve() / sweep_id
    record_file = sweep_dir / "sweep.json"
    record = {"sweep_id": sweep_id, "file": str(path), "config": config, "runs": []}
    if record_file.is_file():
        record["runs"] = json.loads(record_file.read_text())["runs"]
    done_before = len(record["runs"])
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(WANDB_MODE=wandb_mode, WANDB_RUN_GROUP=sweep_id, WANDB_SILENT=env.get("WANDB_SILENT", "true"))
    record["stopped_by"] = None
    while count is None or len(record["runs"]) - done_before < count:
        # failed runs of an earlier invocation are proposed again (a grid point is run until it succeeds)
        history = [r for i, r in enumerate(record["runs"]) if r["returncode"] == 0 or i >= done_before]
        params = propose(config, history)
        if params is None:
            break
        run_name = f"run-{len(record['runs'])}"
        run_dir = sweep_dir / run_name
        base = build_command(config, params, [])
        problem = None if allow_any_command else entry_point_problem(base)
        if problem:
            raise ConfigError(f"{path}: refusing to run this sweep's command: {problem}; {ALLOW_HINT}")
        ours = [f"hydra.run.dir={run_dir}", f"logger.group={sweep_id}", f"logger.run_name={sweep_id}-{run_name}",
                f"logger.tags=[sweep,{sweep_id}]"]
        command = base + ours + list(extra)
        if dry_run:
            print(" ".join(command))
            record["runs"].append({"name": run_name, "params": params, "returncode": 0, "metric": None})
            continue
        print(f"[{sweep_id}] {run_name}: " + " ".join(f"{k}={v}" for k, v in params.items()), flush=True)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log_path = sweep_dir / f"{run_name}.log"
        start = time.monotonic()
        with open(log_path, "w") as log:
            try:
                returncode = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            except OSError as err:  # only with --allow-any-command: a program that does not exist or cannot run
                print(f"cannot start {command[0]!r}: {err}", file=log)
                returncode = 127
        entry = {"name": run_name, "params": params, "command": command, "returncode": returncode,
                 "seconds": round(time.monotonic() - start, 1), "run_dir": str(run_dir),
                 "metric": read_metric(run_dir) if returncode == 0 else None}
        record["runs"].append(entry)
        if returncode != 0:
            entry["error"] = last_line(log_path)
        if returncode != 0 and not keep_going:
            record["stopped_by"] = run_name
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        if returncode != 0:
            failure = f"{run_name} failed (exit {returncode}: {entry['error'] or 'no output'}; log {log_path})"
            if not keep_going:
                print(f"sweep {sweep_id} stopped: {failure}; continue with --name {sweep_id} "
                      "(--keep-going runs the rest after a failure)", file=sys.stderr, flush=True)
                break
            print(f"[{sweep_id}] {failure}", file=sys.stderr, flush=True)
            continue
        status = f"{METRIC}={entry['metric']:.4g}" if entry["metric"] is not None else "done"
        print(f"[{sweep_id}] {run_name}: {status} ({entry['seconds']} s; log {log_path})", flush=True)
    if dry_run:
        record["runs"] = record["runs"][:done_before]
        return record
    new = record["runs"][done_before:]
    record["started"] = len(new)  # this invocation's runs (main's exit status)
    if not new or record["stopped_by"] is not None:  # nothing to do, or the one failure line said it all
        return record
    failed = sum(r["returncode"] != 0 for r in new)
    print(f"sweep {sweep_id}: {len(new) - failed} of {len(new)} runs succeeded, in {sweep_dir}", flush=True)
    # only runs that logged to W&B offline have something to upload (online: already there; csv/none: nothing)
    if wandb_mode == "offline" and any(sweep_dir.glob("run-*/wandb/offline-run-*")):
        print(f"upload later: wandb sync {sweep_dir}/run-*/wandb/offline-run-*", flush=True)
    return record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-coding-sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- are Hydra overrides added to every run.")
    parser.add_argument("sweep_file", nargs="?", help="a sweep YAML, or the name of a shipped sweep (see --list)")
    parser.add_argument("--list", action="store_true", help="list the shipped sweeps and exit")
    parser.add_argument("--count", type=int, default=None, help="runs to start (required for random and bayes)")
    parser.add_argument("--out", default="sweeps_out", help="folder of the sweeps (default: sweeps_out)")
    parser.add_argument("--name", default=None, help="sweep id / W&B group (default: FILE-DATE-TIME); reuse to continue")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command, run nothing")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--keep-going", action="store_true", help="after a failed run, run the remaining ones")
    parser.add_argument("--allow-any-command", action="store_true",
                        help="run the sweep file's command even when it is not the training entry point "
                             "(it can run any program: only for files you trust)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    if args.list:
        where = sweeps_dir()
        for stem in sweep_names():
            print(f"{stem}\t{where / (stem + '.yaml')}")
        return 0
    if not args.sweep_file:
        parser.error("give a sweep file or the name of a shipped sweep (--list shows them)")
    try:
        record = run_sweep(args.sweep_file, count=args.count, out=args.out, name=args.name, extra=tuple(extra),
                           dry_run=args.dry_run, wandb_mode=args.wandb_mode,
                           allow_any_command=args.allow_any_command, keep_going=args.keep_going)
    except SparseCodingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    new = record["runs"][len(record["runs"]) - record.get("started", 0):]
    return 0 if all(r["returncode"] == 0 for r in new) else 1


if __name__ == "__main__":
    sys.exit(main())
