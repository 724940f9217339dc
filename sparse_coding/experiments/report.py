"""docs/RESULTS.md from the tidy tables: the claims, settings, measured run times, what is not done,
then every experiment's figure and table (paper scale first, the quick d=64 scale as an extra where
its rows carry a `converged` column: older quick tables, never checked, are named and not shown).

Paper-scale tables live in docs/results/paper/, quick-scale ones in docs/results/; nothing here is
typed by hand except the prose around the numbers (tables.py, claims.py).
Also: the run-time bookkeeping (timing.json) and the W&B logging of a finished experiment.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

from sparse_coding.experiments import tables
from sparse_coding.experiments.claims import claims_section
from sparse_coding.experiments.figures import PLOTS, plot_experiment  # noqa: F401  (re-exported for the CLI)
from sparse_coding.experiments.grid import EXPERIMENTS, REMEDY
from sparse_coding.experiments.runner import read_csv

SECTIONS = [
    ("sparsity", "1. Metric vs true sparsity (claim 1)", tables.section_sparsity),
    ("controls", "2. Sparse vs controls (claim 2)", tables.section_controls),
    ("sparsity_fresh", "1+. Metric vs true sparsity, fresh batches (issue 19)", tables.section_sparsity),
    ("controls_fresh", "2+. Sparse vs controls, fresh batches and the real non-linear control (issue 19)",
     tables.section_controls),
    ("controls_d256", "2b. Sparse vs controls at d=256 with the quick settings", tables.section_controls),
    ("dict_size", "3. Dictionary-size robustness (claim 3)", tables.section_dict_size),
    ("embeddings", "4. Token embeddings (claim 4)", tables.section_embeddings),
    ("layers", "5. Layers (claims 5 and 6)", tables.section_layers),
    ("solver_gap", "6. Solver gap on the metric", tables.section_solver_gap),
    ("sensitivity", "7. Sensitivity to λ", tables.section_sensitivity),
    ("sample_size", "8. Sample size: held-out against in-sample (issue 19)", tables.section_sample_size),
    ("functional", "Extra. Functional check", tables.section_functional),
]
NOT_RECORDED = "not recorded"
SCALE_NOTE = ("`--scale paper` is named after the paper: its d=256, n=16384, 8d (16d for MiniLM's layers) and the rest are the "
              "settings SPEC §5–6 reads as the paper's, which SPEC says cannot be checked against the paper on this "
              "machine, so they are this project's own choices; every run trains until "
              "converged instead of for a fixed number of epochs. Settings, not measurements.")
PAPER_ORDER = ("sparsity", "controls", "dict_size", "embeddings", "layers", "layers_remedy", "solver_gap", "sensitivity",
               "sample_size", "sparsity_fresh", "controls_fresh")


# --------------------------------------------------------------------------------------------
# Bookkeeping and W&B


def record_timing(results: Path, name: str, scale: str, seconds: float, n_rows: int,
                  load: tuple[float, float] | None = None) -> None:
    """Per experiment: the sum of its points' own wall times (or an extra's wall time), the points'
    mean load average, how many points each CPU trained (`cpu_points`), and the load at the start and end of this
    invocation."""
    path = results / "timing.json"
    timing = json.loads(path.read_text()) if path.is_file() else {}
    rows = read_csv(results / f"{name}.csv") if (results / f"{name}.csv").is_file() else []
    runs = {r.get("run"): r for r in rows}  # a bank is one run with several rows
    timed = rows if name == "solver_gap" else runs.values()  # the solver gap times each dictionary
    point_seconds = sum(r["seconds"] for r in timed if isinstance(r.get("seconds"), (int, float)))
    loads = [r[k] for r in runs.values() for k in ("load_start", "load_end") if isinstance(r.get(k), (int, float))]
    entry = {"scale": scale, "rows": n_rows, "points": len(runs),
             "compute_seconds": point_seconds if point_seconds else max(seconds, timing.get(name, {}).get("compute_seconds", 0))}
    if loads:
        entry["mean_load"] = round(statistics.fmean(loads), 2)
    entry["cpu_points"] = dict(Counter(str(r["cpu"]) if r.get("cpu") else NOT_RECORDED for r in runs.values()))
    if load is not None:
        entry["load_at_invocation"] = [round(v, 2) for v in load]
    timing[name] = entry
    path.write_text(json.dumps(timing, indent=2, sort_keys=True) + "\n")


def log_to_wandb(name: str, scale: str, table: Path, plots: list[Path], root: Path) -> None:
    """One offline W&B run per experiment holding its tidy table and its figures."""
    import wandb

    rows = read_csv(table)
    if not rows:
        return
    columns = list(rows[0])
    save = Path(root) / scale
    save.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="sparse-coding", group="experiments", name=f"{name}-{scale}", dir=str(save),
                     mode="offline", job_type="experiment", config={"experiment": name, "scale": scale},
                     reinit="finish_previous")
    run.log({f"{name}/table": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows]),
             **{f"{name}/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


# --------------------------------------------------------------------------------------------
# Settings, run time, not done


def settings_section() -> str:
    from sparse_coding.experiments.runner import scale_settings

    s = {sc: scale_settings(sc) for sc in ("quick", "paper")}
    rows = []
    for fam in ("synthetic", "embeddings", "layers"):
        for key in s["quick"][fam]:
            q, f = s["quick"][fam][key], s["paper"][fam][key]
            if q is None and f is None:
                continue
            rows.append([fam, key, str(q), str(f)])
    return (tables.table(["family", "setting", "--scale quick (d=64 extra)", "--scale paper"], rows) + "\n\n"
            + SCALE_NOTE)


def runtime_section(dirs: dict[str, Path]) -> str:
    """Measured wall time per experiment (sum of its points' own wall times) with the machine's load and the CPUs
    that trained its points."""
    body = []
    for scale, d in dirs.items():
        path = d / "timing.json"
        if not path.is_file():
            continue
        for name, v in sorted(json.loads(path.read_text()).items()):
            pts = v.get("points") or v.get("rows")
            body.append([name, f"--scale {scale}", str(pts), f"{v['compute_seconds'] / 60:.1f}",
                         f"{v['compute_seconds'] / max(1, pts) / 60:.2f}", fmt_load(v), fmt_cpus(v)])
    if not body:
        return "_no run times recorded yet._"
    return (tables.table(["experiment", "scale", "points", "minutes (measured)", "minutes per point", "load average",
                          "CPU (points)"], body)
            + "\n\nMeasured, not extrapolated: the sum of each point's own wall time (an extra: "
            "its wall time) on a 2-core machine; the load average (`os.getloadavg()`, 1 min) recorded at each point's "
            "start and end says how shared the machine was (quick-scale rows before this column existed: 'n/r'). "
            "The CPU column counts the points trained on each processor: points of one experiment were trained on "
            "different machines over several sessions, several-fold apart in speed (docs/scaling.md, \"Same seed, "
            "another machine\"), so a per-point mean over mixed CPUs is a rough guide ('not recorded': points trained "
            "before runs recorded their CPU). "
            "Run times, not sparsity measurements.")


def fmt_cpus(v: dict) -> str:
    cpus = v.get("cpu_points")
    if not cpus:
        return NOT_RECORDED
    return "; ".join(f"{cpu} ×{n}" for cpu, n in sorted(cpus.items(), key=lambda kv: (kv[0] == NOT_RECORDED, kv[0])))


def fmt_load(v: dict) -> str:
    if "mean_load" in v:
        return f"{v['mean_load']:.2f}"
    if "load_at_invocation" in v:
        return "–".join(f"{x:.2f}" for x in v["load_at_invocation"])
    return "n/r"


def not_done_section(paper_dir: Path) -> str:
    """Every paper-scale experiment (per model; sensitivity per case): points planned, finished, and the
    measured cost of what remains."""
    body, measured = [], {}
    for name in PAPER_ORDER:
        points = EXPERIMENTS[name]("paper") if name in EXPERIMENTS else None
        path = paper_dir / f"{name}.csv"
        rows = read_csv(path) if path.is_file() else []
        split = "case" if name == "sensitivity" else "model"  # costs differ by model (sensitivity: by case)
        models = sorted({p.x[split] for p in points if split in p.x}) if points else []
        for model in models or [None]:
            mine = [r for r in rows if model is None or r.get(split) == model]
            planned = None if points is None else sum(1 for p in points if model is None or p.x.get(split) == model)
            runs = {r.get("run"): r for r in mine}
            secs = [r["seconds"] for r in runs.values() if isinstance(r.get("seconds"), (int, float))]
            per = statistics.fmean(secs) if secs else math.nan
            measured[(name, model)] = per
            note = ""
            if not secs and name == "layers_remedy" and math.isfinite(measured.get(("layers", model), math.nan)):
                per, note = measured[("layers", model)], " (the raw curve's)"  # a rough guide: fewer rows, other passes
            done = len(runs)
            if done >= (planned if planned is not None else 1):  # an extra (no planned grid) is done once run
                continue
            left = (planned - done) if planned is not None else None
            known = math.isfinite(per)
            body.append([name if model is None else f"{name} ({model})",
                         str(planned if planned is not None else "extra"), str(done),
                         f"{per / 60:.1f}{note}" if known else "no point measured yet",
                         f"{left * per / 3600:.1f}" if known and left is not None else "—"])
    if not body:
        return "Every paper-scale experiment is complete."
    return (tables.table(["experiment", "points planned", "finished", "measured minutes per point",
                          "hours left (measured × points left)"], body)
            + "\n\nRun them in this order with `python -m sparse_coding.experiments run NAME --scale paper` (resumes: "
            "finished points are skipped). The cost per point is the mean of that experiment's finished points.")


# --------------------------------------------------------------------------------------------
# The report


def _experiment_sections(results: Path, output: Path, scale: str, names: list[str] | None = None) -> list[str]:
    parts = []
    for name, title, fn in SECTIONS:
        if (names is not None and name not in names) or (scale == "paper" and name == "controls_d256"):
            continue  # at the paper scale `controls` is already d=256
        path = results / f"{name}.csv"
        rows = read_csv(path) if path.is_file() else []
        if name == "layers" and (results / "layers_remedy.csv").is_file():
            rows += read_csv(results / "layers_remedy.csv")
        parts += ["", f"### {title}" if scale == "quick" else f"## {title}", ""]
        if not rows:
            parts.append(f"_not run at the {scale} scale: no `{path.name}` in {results}._")
            continue
        pngs = plot_experiment(name, results)
        parts += [f"![{name}]({p.relative_to(output.parent) if p.is_relative_to(output.parent) else p})" for p in pngs]
        try:
            parts += ["", fn(rows)]
        except (ValueError, KeyError, ZeroDivisionError, TypeError) as err:  # partial tables (tests, cut runs)
            parts += ["", f"_table unavailable for these partial results: {type(err).__name__}: {err}_"]
    return parts


def quick_tables(results: Path) -> tuple[list[str], list[str]]:
    """The quick-scale tables in `results`: (every row says whether it converged, the others: not measurements).

    The layers table also holds layers_remedy.csv's rows, so both must pass."""
    checked, unchecked = [], []
    for name, _, _ in SECTIONS:
        paths = [results / f"{n}.csv" for n in ((name, "layers_remedy") if name == "layers" else (name,))]
        rows = [r for p in paths if p.is_file() for r in read_csv(p)]
        if rows:
            (checked if all(r.get("converged") is not None for r in rows) else unchecked).append(name)
    return checked, unchecked


def write_report(results: Path, output: Path) -> Path:
    results, output = Path(results), Path(output)
    paper_dir = results / "paper"
    paper = {n: read_csv(paper_dir / f"{n}.csv") for n in PAPER_ORDER if (paper_dir / f"{n}.csv").is_file()}
    parts = [
        "# Results: reproducing *Measuring Feature Sparsity in Language Models* (arXiv 2310.07837)",
        "",
        "Generated by `python -m sparse_coding.experiments report` from the tables in `docs/results/paper/` "
        "(`--scale paper`: d=256, every run trained until converged; the settings are our reading of the paper's, "
        "not verified) and `docs/results/` (the earlier quick scale, d=64, fixed short training: shown as an extra "
        "only where its rows were checked for convergence) — do not edit by hand. Metrics follow docs/method.md §5 exactly. "
        "SPEC §7 withdrew the figure values an earlier spec attributed to the paper (no source on this machine): this "
        "report checks the paper's claims in their words and prints no number as the paper's. "
        + tables.held_out_note([r for rows in paper.values() for r in rows]) + " Every table says, per point, how many of its seeds' runs converged. "
        + tables.PAPER_MODELS_NOTE,
        "",
        "## The paper's claims, checked on our runs",
        "",
        claims_section(paper),
        "",
        "## Settings, run time and what is not done",
        "",
    ]
    try:
        parts.append(settings_section())
    except Exception as err:  # composing the configs; never fail the report on it
        parts.append(f"(settings table unavailable: {type(err).__name__}: {err})")
    parts += ["", "**Run time.**", "", runtime_section({"paper": paper_dir, "quick": results}), "",
              "**Not done at `--scale paper`.**", "", not_done_section(paper_dir)]
    parts += _experiment_sections(paper_dir, output, "paper")
    massive = results / "massive.json"
    if massive.is_file():
        parts += ["", "## 5b. Massive activations (SmolLM2's mid-layer collapse)", "",
                  "`python -m sparse_coding.experiments massive CACHE…` on the wiki caches the layer curves train "
                  "on, saved as docs/results/massive.json. The remedy switches are `data.drop_positions=K` (leave out "
                  "context positions < K), `data.max_norm_ratio=R` (leave out every row whose norm exceeds R × the "
                  "layer's median row norm, wherever it sits) and `data.normalize=token` (every centred row to norm "
                  "√d); `layers_remedy` is the layer curve with `" + " ".join(REMEDY) + "`. "
                  "The tiny GPT-2 of the tests has random weights, so its position 0 says nothing about GPT-2; the "
                  "analysis runs on that path in the test suite only. These are statistics of the cached activations "
                  "themselves (no dictionary is trained, so neither convergence nor held-out rows apply).", "",
                  tables.section_massive(json.loads(massive.read_text()))]
    checked, unchecked = quick_tables(results)
    parts += ["", "## Extra: the quick scale (d=64 synthetic, short fixed training)", ""]
    if unchecked:
        parts.append(f"Not shown: {', '.join(f'`{n}.csv`' for n in unchecked)} in docs/results/ predate the convergence "
                     "check (rows without `converged`): their dictionaries were trained for a fixed short time and never "
                     "checked, so their numbers are not measurements. `python -m sparse_coding.experiments run NAME "
                     "--scale quick` reruns one with the current code, and it then appears here.")
    if checked:
        parts += ["", "Short fixed training at d=64; each row says whether its dictionary converged."]
        parts += _experiment_sections(results, output, "quick", checked)
    if not checked and not unchecked:
        parts.append("Not run with the current code: `python -m sparse_coding.experiments run NAME --scale quick` "
                     "writes docs/results/NAME.csv (every row with `converged`), and it then appears here.")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(parts) + "\n")
    return output
