"""Run an experiment's points (skipping finished ones) and gather them into one tidy table.

Run directories live under `<root>/<scale>/runs/<point key>/` (git-ignored `outputs/`); a point
whose `metrics.json` exists is not rerun, so an interrupted experiment resumes where it stopped.
`point.json` beside it records the overrides, the wall time of the run and the machine's load
average at its start and end (`os.getloadavg()`), so run times are read with their load.

Convergence fields (`converged`, `samples_seen`, `optimizer_steps`, `timing`, the standard
errors) are read with `.get()`: runs made before they existed still tabulate, with empty cells.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from sparse_coding.experiments.grid import EXPERIMENTS, SENSITIVITY_FACTORS, Point

DEFAULT_ROOT = Path("outputs/experiments")
QUIET = ["logger=none"]

# Columns of every tidy table, in order; point-specific columns (a, data, model, ...) come first, then the metrics
# (`metric_columns`) with the dictionary's own fields among them.
DICTIONARY_COLUMNS = ("lam", "lam_mode", "lam_converged", "dict_mult", "dict_size")
# run-level fields (issue 10): at the top of metrics.json, also for a bank; a dictionary's own value wins
RUN_COLUMNS = ("converged", "samples_seen", "optimizer_steps")
TIMING_COLUMNS = ("fit_seconds", "eval_seconds", "samples_per_second")
TRUTH_COLUMNS = ("ground_truth", "true_l0", "true_avg_coef_norm", "nonlinear_share", "preact_std")
# issue 19: the generalization gap beside the in-sample measurement, and how the SEs were clustered
GAP_COLUMNS = ("generalization_gap", "generalization_gap_se", "normalized_loss_se_rows", "se_clusters")
DATA_COLUMNS = ("drop_positions", "max_norm_ratio", "norm_outliers_dropped", "normalize")  # the preprocessing of real activations (sparse_coding.data.preprocess)


def compose(overrides: list[str]):
    from sparse_coding.config.compose import compose_config

    return compose_config(overrides)


def run_dir(root: Path, scale: str, point: Point) -> Path:
    return root / scale / "runs" / point.key(scale)


def points_of(name: str, scale: str, extra: list[str] | None = None, limit: int | None = None,
              only: dict | None = None) -> list[Point]:
    """The experiment's points; `extra` overrides are appended to each (tests shrink runs this way).

    `only` keeps the points whose x matches every {key: value} (compared as strings), e.g.
    {"model": "smollm2"} or {"seed": 0}; `limit` then keeps the first N.
    """
    points = [p for p in EXPERIMENTS[name](scale)
              if all(str(p.x.get(k, getattr(p, k, None))) == str(v) for k, v in (only or {}).items())][:limit]
    for p in points:
        p.overrides += list(extra or [])
    return points


def resolve(point: Point, scale: str, root: Path) -> Point:
    """Fill in run-time overrides: the sensitivity bank needs its base point's auto lambda."""
    if point.experiment != "sensitivity":
        return point
    base_point = Point("base", point.family, list(point.overrides), point.seed)
    base_dir = run_dir(root, scale, base_point)
    if not (base_dir / "metrics.json").is_file():
        run_point(base_point, scale, root)
    lam = json.loads((base_dir / "metrics.json").read_text())["lam"]
    lams = [float(f"{lam * f:.6g}") for f in SENSITIVITY_FACTORS[scale]]
    out = Point(point.experiment, point.family, point.overrides + ["dictionary.lam=[" + ",".join(map(str, lams)) + "]"],
                point.seed, {**point.x, "auto_lam": lam})
    return out


def run_point(point: Point, scale: str, root: Path = DEFAULT_ROOT) -> Path:
    """Train one point unless its metrics.json exists; returns the run directory.

    A point cut short (killed, out of session time) resumes from its last checkpoint; the run
    refuses to resume if the point's settings changed since.
    """
    out = run_dir(root, scale, point)
    if (out / "metrics.json").is_file():
        return out
    from sparse_coding.config.checks import validate
    from sparse_coding.config.resources import cpu_model
    from sparse_coding.run import run

    resumed = (out / "checkpoints" / "last.ckpt").is_file()
    overrides = point.all_overrides(scale) + QUIET + [f"out_dir={out}"] + (["ckpt_path=last"] if resumed else [])
    cfg = compose(overrides)
    plan = validate(cfg)
    load_start = os.getloadavg()[0]
    t0 = time.time()
    run(cfg, out, plan=plan)
    seconds = time.time() - t0
    if resumed and (out / "metrics.json").is_file():  # this invocation is only the end: the fit's clock spans all
        fit = json.loads((out / "metrics.json").read_text()).get("timing", {}).get("fit_seconds") or 0.0
        seconds = max(seconds, float(fit))
    info = {"overrides": overrides, "x": point.x, "seconds": seconds, "resumed": resumed, "load_start": load_start,
            "load_end": os.getloadavg()[0], "cpus": os.cpu_count(), "cpu": cpu_model()}
    (out / "point.json").write_text(json.dumps(info, indent=2))
    return out


def metric_columns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the held-out columns, the in-sample ones) of a table, from the groups of `sparse_coding.metrics.METRIC_NAMES`
    (imported here: it imports torch, which the report, a reader of these tables, does not need)."""
    from sparse_coding.metrics import DIAGNOSTICS, FIT, SPARSITY

    return (*SPARSITY, *FIT, *DICTIONARY_COLUMNS, *DIAGNOSTICS, "mean_max"), (*SPARSITY, "n_samples")


def rows_of(point: Point, scale: str, out: Path) -> list[dict]:
    """One tidy row per dictionary of a finished run."""
    held_out_columns, in_sample_columns = metric_columns()
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "point.json").read_text()) if (out / "point.json").is_file() else {}
    entries = metrics.get("dictionaries", [metrics])
    truth = metrics.get("truth") or {}
    rows = []
    for e in entries:
        row = {"experiment": point.experiment, "scale": scale, "seed": point.seed, **point.x, "dim": metrics["dim"]}
        row.update({k: e.get(k) for k in held_out_columns})
        row.update({k: e.get(k, metrics.get(k)) for k in RUN_COLUMNS})
        timing = e.get("timing") or metrics.get("timing") or {}
        row.update({k: timing.get(k) for k in TIMING_COLUMNS})
        row.update({k: truth.get(k) for k in TRUTH_COLUMNS if k in truth})
        if "in_sample" in e:
            row.update({f"in_sample_{k}": e["in_sample"].get(k) for k in in_sample_columns})
            row.update({k: e.get(k) for k in GAP_COLUMNS})
            row["sample_sufficient"] = metrics.get("sample_sufficient")
        data = metrics.get("data", {})
        row.update({k: data[k] for k in ("fresh", "se_unit") if k in data})
        row["n_train"] = data.get("n_train", data.get("train_rows"))
        row.update({k: data.get(k) for k in DATA_COLUMNS if k in data})
        row["seconds"] = info.get("seconds")
        row["load_start"] = info.get("load_start")
        row["load_end"] = info.get("load_end")
        row["cpu"] = info.get("cpu")
        row["run"] = out.name
        rows.append(row)
    return rows


def run_experiment(name: str, scale: str, root: Path = DEFAULT_ROOT, log=print, extra: list[str] | None = None,
                   limit: int | None = None, only: dict | None = None) -> list[dict]:
    """Run (or skip) every point of an experiment; returns the tidy rows."""
    points = points_of(name, scale, extra, limit, only)
    rows = []
    for i, point in enumerate(points):
        point = resolve(point, scale, root)
        t0 = time.time()
        cached = (run_dir(root, scale, point) / "metrics.json").is_file()
        out = run_point(point, scale, root)
        log(f"[{name} {i + 1}/{len(points)}] {point.x} seed={point.seed}: "
            f"{'cached' if cached else f'{time.time() - t0:.0f} s'} -> {out}")
        rows += rows_of(point, scale, out)
    return rows


def collect(name: str, scale: str, root: Path = DEFAULT_ROOT, extra: list[str] | None = None,
            only: dict | None = None) -> list[dict]:
    """The tidy rows of the points that have finished (without running anything)."""
    rows = []
    for point in points_of(name, scale, extra, only=only):
        if point.experiment == "sensitivity":
            if not (run_dir(root, scale, Point("base", point.family, list(point.overrides), point.seed))
                    / "metrics.json").is_file():
                continue
            point = resolve(point, scale, root)
        out = run_dir(root, scale, point)
        if (out / "metrics.json").is_file():
            rows += rows_of(point, scale, out)
    return rows


def keep_committed(rows: list[dict], path: Path) -> list[dict]:
    """`rows` (the finished points on this machine) plus the rows of the table at `path` whose run is not among
    them: a campaign resumed on another machine, or after its run directories were cleared, keeps what it
    measured before. A point trained again here replaces its old row in place."""
    if not path.is_file():
        return rows
    new = {r["run"]: r for r in rows if r.get("run")}
    merged, seen = [], set()
    for old in read_csv(path):
        run = old.get("run")
        merged.append(new.get(run, old))
        seen.add(run)
    return merged + [r for r in rows if r.get("run") not in seen]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in columns})
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def scale_settings(scale: str) -> dict:
    """The composed settings of each family at this scale, for labelling tables."""
    out = {}
    for family in ("synthetic", "embeddings", "layers"):
        cfg = compose([f"+experiment={family}_{scale}", "model=minilm"] if family != "synthetic"
                      else [f"+experiment={family}_{scale}"])
        out[family] = {
            "dim": cfg.data.dim if family == "synthetic" else None,
            "n_train": cfg.data.n if family == "synthetic" else None,
            "n_val": cfg.data.n_val if family == "synthetic" else None,
            "batch_size": cfg.data.batch_size,
            "dict_mult": cfg.dictionary.mult,
            "max_epochs": cfg.trainer.max_epochs,
            "limit_train_batches": cfg.trainer.limit_train_batches,
            "corpus_tokens": cfg.corpus.max_tokens if family == "layers" else None,
            "solver_max_steps": cfg.solver.max_steps,
            "lr": cfg.dictionary.lr,
        }
        conv = cfg.get("convergence")  # issue 10's group; absent from older configs
        out[family]["training"] = ("until converged (" + ", ".join(
            f"{k}={conv.get(k)}" for k in ("tol", "window", "max_samples", "max_minutes") if conv.get(k) is not None)
            + ")") if conv is not None and conv.get("stop", False) else "fixed epochs"
    return out
