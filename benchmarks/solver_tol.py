"""How the solver's step tolerance moves the measurement (issue 10 C): the table behind `solver.tol`.

For trained dictionaries (run directories: their Φ, λ and held-out rows), solve the held-out rows at
tol in TOLS and report S1 (avg_coef_norm), L_norm (normalized_loss), L0, mean greedy steps, the capped
fraction and the float32 solve time, each metric relative to tol -> 0 (1e-6, float64). The default
must move S1 and L_norm by < 0.1 %. Also reports float32 vs float64 steps at the default.

    python -m benchmarks.solver_tol RUN_DIR [RUN_DIR ...] [--rows 4096]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.common import best_time, machine, write_results
from sparse_coding.experiments.extras import held_out_rows, load_dictionaries
from sparse_coding.metrics import SparsityMetrics
from sparse_coding.solver import DEFAULT_TOL, solve

TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4]
REFERENCE_TOL = 1e-6
MAX_STEPS = 4096


def measure(x: torch.Tensor, phi: torch.Tensor, lam: float, tol: float) -> dict:
    gram = phi.T @ phi
    codes = solve(x, phi, lam, MAX_STEPS, gram=gram, tol=tol)
    metric = SparsityMetrics(phi.shape[0], phi.shape[1]).to(torch.float64)
    metric.update(x, codes, codes.decode(phi))
    metric.lam = lam
    values = {k: float(v) for k, v in metric.compute().items()}
    return values


def table_for(run: Path, rows: int) -> tuple[str, list[dict]]:
    config, dictionaries = load_dictionaries(run)
    label, phi, lam, _ = dictionaries[0]
    x = held_out_rows(config, rows)
    x64, phi64 = x.double(), phi.double()
    ref = measure(x64, phi64, lam, REFERENCE_TOL)
    out = []
    for tol in TOLS + [REFERENCE_TOL]:
        v = measure(x64, phi64, lam, tol)
        gram32 = phi.T @ phi
        seconds = best_time(lambda: solve(x, phi, lam, MAX_STEPS, gram=gram32, tol=tol), repeats=3)
        f32 = solve(x, phi, lam, MAX_STEPS, gram=gram32, tol=tol)
        out.append(dict(tol=tol, avg_coef_norm=v["avg_coef_norm"], normalized_loss=v["normalized_loss"], l0=v["l0"],
                        mean_steps=v["mean_steps"], capped=v["capped_fraction"],
                        d_s1=v["avg_coef_norm"] / ref["avg_coef_norm"] - 1,
                        d_lnorm=v["normalized_loss"] / ref["normalized_loss"] - 1,
                        se_s1=v["avg_coef_norm_se"], seconds_f32=seconds,
                        steps_f32=float(f32.steps.double().mean()), l0_f32=float(f32.l0.double().mean())))
    data = config.get("data", {})
    model = config.get("model") or {}
    name = (f"{model.get('name')} layer {config.get('layer')}" if model else
            f"{data.get('name')} d={data.get('dim')} a={data.get('active')}")
    return f"{name}, m={phi.shape[1]}, λ={lam:.4g}, {x.shape[0]} held-out rows", out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args(argv)
    record = {"machine": machine("cpu"), "default_tol": DEFAULT_TOL, "tables": []}
    lines = ["# Solver step tolerance vs the measurement (issue 10 C)", "",
             f"Machine: {record['machine']}", "",
             f"Greedy solve of held-out rows under a trained dictionary at its λ; metrics in float64, relative to "
             f"tol = {REFERENCE_TOL:g} (the tol → 0 limit); max_steps = {MAX_STEPS}. Time: float32 solve of the same "
             f"rows. Default tol = {DEFAULT_TOL:g}.", ""]
    for run in args.runs:
        load = os.getloadavg()[0]
        title, rows = table_for(run, args.rows)
        record["tables"].append({"run": str(run), "title": title, "rows": rows, "load": load})
        lines += [f"## {title} (load {load:.1f})", "",
                  "| tol | S1 | ΔS1 | L_norm | ΔL_norm | SE(S1) | L0 | steps (f64) | steps (f32) | L0 (f32) | capped | "
                  "time f32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['tol']:g} | {r['avg_coef_norm']:.4f} | {r['d_s1']:+.3%} | {r['normalized_loss']:.4f} | "
                         f"{r['d_lnorm']:+.3%} | {r['se_s1']:.3f} | {r['l0']:.2f} | {r['mean_steps']:.1f} | "
                         f"{r['steps_f32']:.1f} | {r['l0_f32']:.2f} | {r['capped']:.3f} | {r['seconds_f32'] * 1e3:.0f} ms |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]))
    write_results("solver_tol", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
