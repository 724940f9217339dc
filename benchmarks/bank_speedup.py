"""A bank of K dictionaries (one pass over the data) against K separate runs: time and equality.

    python -m benchmarks.bank_speedup model=minilm layer=3 dictionary.mult=1 trainer.max_epochs=1

Runs `train.py` once with dictionary.lam=[l1,...,lK] and K times with one lambda each (same seed,
fixed lambdas from --lams), reports wall-clock and CPU seconds (children's user+sys: steadier than
wall time on a shared machine) and the largest difference between the bank's Phi and metrics and
the separate runs' (expected: none).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


def timed_run(args: list[str], out: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *QUIET, *args, f"hydra.run.dir={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lams", default="0.25,0.5,1.0,2.0")
    parser.add_argument("--out", default=None)
    args, overrides = parser.parse_known_args()
    lams = args.lams.split(",")
    out = Path(args.out or tempfile.mkdtemp(prefix="bank_speedup_"))
    bank_wall, bank_cpu = timed_run([*overrides, f"dictionary.lam=[{','.join(lams)}]"], out / "bank")
    sep_wall = sep_cpu = 0.0
    for lam in lams:
        w, c = timed_run([*overrides, f"dictionary.lam={lam}"], out / f"lam{lam}")
        sep_wall, sep_cpu = sep_wall + w, sep_cpu + c
    from safetensors.torch import load_file

    bank = json.loads((out / "bank" / "metrics.json").read_text())["dictionaries"]
    bank_phi = load_file(str(out / "bank" / "dictionary.safetensors"))
    phi_diff = metric_diff = 0.0
    for entry, lam in zip(bank, lams):
        alone = json.loads((out / f"lam{lam}" / "metrics.json").read_text())
        alone_phi = load_file(str(out / f"lam{lam}" / "dictionary.safetensors"))[alone["label"]]
        phi_diff = max(phi_diff, float((bank_phi[entry["label"]] - alone_phi).abs().max()))
        metric_diff = max(metric_diff, max(abs(entry[k] - alone[k]) for k in ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu")))
    report = {"overrides": overrides, "lams": lams, "bank_wall_s": round(bank_wall, 1), "bank_cpu_s": round(bank_cpu, 1),
              "separate_wall_s": round(sep_wall, 1), "separate_cpu_s": round(sep_cpu, 1),
              "speedup_wall": round(sep_wall / bank_wall, 2), "speedup_cpu": round(sep_cpu / bank_cpu, 2),
              "max_phi_difference": phi_diff, "max_metric_difference": metric_diff}
    print(json.dumps(report, indent=2))
    (out / "bank_speedup.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
