"""What a finished run leaves behind: metrics.json, the dictionaries, plots and the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig

from sparse_coding.atomic import atomic_write_bytes
from sparse_coding.dictionary import save_dictionaries
from sparse_coding.errors import StorageError, TrainingError
from sparse_coding.metrics import DIAGNOSTICS, FIT, SPARSITY
from sparse_coding.module import SparseCodingModule


def collect_results(cfg: DictConfig, datamodule, module: SparseCodingModule) -> dict:
    entries = module.final_metrics
    common = {"dim": datamodule.dim, "data": datamodule.describe(), "seed": cfg.seed}
    if datamodule.truth:
        common["truth"] = datamodule.truth
    if len(entries) == 1:
        return {**entries[0], **common}
    return {**common, "dictionaries": entries}


def write_outputs(out_dir: Path, cfg: DictConfig, module: SparseCodingModule, result: dict, datamodule=None) -> None:
    """The dictionary first, then dictionary.json, metrics.json and plots; each written atomically and
    independently of the others (one that fails does not stop the rest). Raises StorageError afterwards
    when any output failed, TrainingError when a held-out metric is not finite (written as null and listed
    under `not_finite`).
    The in-sample measurement and the gap may be undefined (e.g. a standard error of one training row): they are
    written as null and listed, and the run still counts (`sample_sufficient` is then null)."""
    nonfinite = nonfinite_paths(result)
    metrics = finite_or_null(result)
    if nonfinite:
        metrics["not_finite"] = nonfinite
    bad = [p for p in nonfinite if not is_in_sample_path(p)]
    failed = []

    def attempt(name: str, write, errors=(OSError,)) -> None:
        try:
            write()
        except errors as e:
            failed.append(f"{name} ({getattr(e, 'strerror', None) or e})")

    save_dictionaries(out_dir, cfg, module, attempt, datamodule)  # dictionary.safetensors, then dictionary.json
    attempt("metrics.json", lambda: atomic_write_bytes(out_dir / "metrics.json", _json_bytes(metrics)))
    if not failed and not bad:  # no figures of numbers that are not results
        from sparse_coding.plots import plot_run

        attempt("plots/", lambda: plot_run(out_dir, result), (Exception,))  # figures are the least essential
    if failed:
        written = [n for n in ("dictionary.safetensors", "dictionary.json", "metrics.json") if not any(f.startswith(n) for f in failed)]
        raise StorageError(f"{out_dir}: could not write {', '.join(failed)}; written: "
                           f"{', '.join(written) or 'nothing'}; the checkpoint in checkpoints/ is intact: fix the "
                           "directory and rerun with ckpt_path=last")
    if bad:
        raise TrainingError(f"{out_dir}/metrics.json: {', '.join(bad)} not finite (written as null): the held-out data "
                            "are too few or too degenerate to measure; use more data or a larger data.val_fraction")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def is_in_sample_path(path: str) -> bool:
    """A metrics.json path of the in-sample measurement or the generalization gap (`in_sample.l0`,
    `dictionaries[1].generalization_gap_se`)."""
    return any(part.split("[")[0] in ("in_sample", "generalization_gap", "generalization_gap_se")
               for part in path.split("."))


def nonfinite_paths(obj, prefix: str = "") -> list[str]:
    """Dotted paths of every NaN/Inf float inside a JSON-like object."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "value"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{prefix}[{i}]")]
    return []


def finite_or_null(obj):
    """A copy with every NaN/Inf float replaced by None (valid JSON, never a fake number)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def print_table(result: dict) -> None:
    """One column per dictionary, one row per metric."""
    from rich.console import Console
    from rich.table import Table

    entries = result.get("dictionaries", [result])
    unit = (result.get("data") or {}).get("se_unit", "rows")
    table = Table(title=f"Held-out sparsity metrics (d={result['dim']}; standard errors over {unit})")
    table.add_column("metric")
    for e in entries:
        table.add_column(e["label"], justify="right")
    rows = [*SPARSITY, *FIT, "lam", "lam_converged", "dict_size", *DIAGNOSTICS]
    for row in rows:
        table.add_row(row, *[f"{e[row]:.4g}" if isinstance(e[row], float) else str(e[row]) for e in entries])
    if all("in_sample" in e for e in entries):
        for row in (k for k in SPARSITY if k != "avg_coef_norm_se"):  # one in-sample SE: normalized_loss's, which the gap uses
            table.add_row(f"in-sample {row}", *[f"{e['in_sample'][row]:.4g}" for e in entries])
        table.add_row("generalization_gap", *[f"{e['generalization_gap']:+.2%} ± {e['generalization_gap_se']:.2%}"
                                              for e in entries])
    if "sample_sufficient" in result:
        table.add_row("sample_sufficient", *[str(result["sample_sufficient"])] * len(entries))
    if "converged" in result:
        table.add_row("converged", *[str(result["converged"])] * len(entries))
        table.add_row("samples_seen", *[f"{result['samples_seen']:,}"] * len(entries))
    console = Console()
    console.print(table)
    for e in entries:
        if e["capped_fraction"] > 0.01:
            console.print(
                f"warning: {e['capped_fraction']:.0%} of samples ({e['label']}) stopped at solver.max_steps; "
                "their coefficients are truncated — raise solver.max_steps for an uncapped measurement"
            )
    if "truth" in result:
        t = result["truth"]
        console.print(
            f"ground truth: a/2 = {t['ground_truth']:.4g}, true avg_coef_norm = {t['true_avg_coef_norm']:.4g}, "
            f"true l0 = {t['true_l0']:.4g}"
        )
