"""The whole fit loop against the GEMMs a training step really needs (issue 10, part B).

For each (d, m, batch) this runs the real `train.py` pipeline (`sparse_coding.run.run`: Lightning,
the periodic held-out evaluations, checkpoints; logger off) on sparse-linear data for a fixed number
of optimizer steps, reads `timing.fit_seconds` from its metrics, and times in the same process the
two GEMMs every step needs: the encode X Phi (B*d*m) and the Gram Phi^T Phi (d*m^2). The figure of
merit is fit_seconds / (optimizer_steps * (encode + Gram)); the target is <= 3.

    python -m benchmarks.fit_bench [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import best_time, machine, write_results

SHAPES = [(256, 2048, 1024), (384, 6144, 1024)]
QUICK_SHAPES = [(64, 512, 256)]


def gemm_seconds(d: int, m: int, batch: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=gen)
    phi = torch.randn(d, m, generator=gen)
    phi /= phi.norm(dim=0)
    encode = best_time(lambda: x @ phi, repeats=5)
    gram = best_time(lambda: phi.T @ phi, repeats=5)
    return encode, gram


def fit_run(d: int, m: int, batch: int, steps: int, out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from sparse_coding.config.schema import register_configs
    from sparse_coding.paths import config_dir
    from sparse_coding.run import run

    register_configs()
    overrides = [
        "data=sparse_linear", f"data.dim={d}", "data.active=10", "data.n=16384", "data.n_val=4096",
        f"data.batch_size={batch}", f"dictionary.mult={m // d}", "logger=none", "trainer.enable_progress_bar=false",
        f"convergence.max_samples={steps * batch}", "convergence.max_minutes=0", f"out_dir={out}",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name="train", overrides=overrides)
    return run(cfg, out)


def warm_up() -> None:
    """Load (or compile, after a code change) the solver kernel outside the timed fits."""
    from sparse_coding.solver import solve

    x, phi = torch.randn(64, 8), torch.randn(8, 32)
    solve(x, phi / phi.norm(dim=0), 0.1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=96, help="optimizer steps per fit (fixed budget)")
    parser.add_argument("--device", default="cpu", help="cpu only (the fit runs the default accelerator)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    warm_up()
    record = {"machine": machine("cpu"), "rows": []}
    for d, m, batch in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = fit_run(d, m, batch, args.steps, Path(tmp))
            wall = time.perf_counter() - start
        encode, gram = gemm_seconds(d, m, batch)
        steps = result["optimizer_steps"]
        fit = result["timing"]["fit_seconds"]
        row = dict(d=d, m=m, batch=batch, optimizer_steps=steps, samples_seen=result["samples_seen"],
                   fit_seconds=fit, eval_seconds=result["timing"]["eval_seconds"], wall_seconds=round(wall, 2),
                   encode_ms=encode * 1e3, gram_ms=gram * 1e3, fit_step_ms=fit / steps * 1e3,
                   ratio=fit / (steps * (encode + gram)), mean_steps=result["mean_steps"], l0=result["l0"],
                   load_at_start=load)
        record["rows"].append(row)
        print(json.dumps(row))
    lines = ["# Fit loop vs its GEMMs (issue 10 B)", "",
             f"Machine: {record['machine']}", "",
             "fit = `timing.fit_seconds` of a real run (Lightning, periodic held-out evaluation, checkpoints) on "
             "sparse-linear a=10 data for a fixed number of optimizer steps; GEMMs = encode X·Φ + Gram ΦᵀΦ, "
             "timed in the same process. Target: fit / GEMMs ≤ 3.", "",
             "| d | m | batch | steps | fit | of which eval | fit per step | encode | Gram | fit / GEMMs | "
             "solver steps/sample | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['d']} | {r['m']} | {r['batch']} | {r['optimizer_steps']} | {r['fit_seconds']:.1f} s | "
                     f"{r['eval_seconds']:.1f} s | {r['fit_step_ms']:.1f} ms | {r['encode_ms']:.1f} ms | "
                     f"{r['gram_ms']:.1f} ms | **{r['ratio']:.2f}×** | {r['mean_steps']:.1f} | {r['load_at_start']:.1f} |")
    write_results("fit_quick" if args.quick else "fit", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
