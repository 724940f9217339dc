"""What a finished run leaves behind: metrics.json, the dictionaries, plots and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparse_coding.module import SparseCodingModule


def collect_results(cfg: DictConfig, datamodule, module: SparseCodingModule) -> dict:
    entries = module.final_metrics
    common = {"dim": datamodule.dim, "data": datamodule.describe(), "seed": cfg.seed}
    if datamodule.truth:
        common["truth"] = datamodule.truth
    if len(entries) == 1:
        return {**entries[0], **common}
    return {**common, "dictionaries": entries}


def flatten_for_summary(result: dict) -> dict:
    entries = result.get("dictionaries", [result])
    flat = {}
    for entry in entries:
        prefix = "final" if len(entries) == 1 else f"final/{entry['label']}"
        flat.update({f"{prefix}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
    return flat


def write_outputs(out_dir: Path, cfg: DictConfig, module: SparseCodingModule, result: dict) -> None:
    from safetensors.torch import save_file

    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    tensors = {label: phi.detach().cpu().contiguous() for label, phi in zip(module.labels, module.phis)}
    save_file(tensors, str(out_dir / "dictionary.safetensors"))
    meta = {
        "dim": module.hparams.dim,
        "dictionaries": [
            {"tensor": label, "dict_mult": m, "dict_size": m * module.hparams.dim, "lam": module.lam(k)}
            for k, (label, (m, _)) in enumerate(zip(module.labels, module.grid))
        ],
        "layout": "phi is (d, m); columns are unit-norm features",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out_dir / "dictionary.json").write_text(json.dumps(meta, indent=2) + "\n")
    from sparse_coding.plots import plot_run

    plot_run(out_dir, result)


def print_table(result: dict) -> None:
    """One column per dictionary, one row per metric."""
    from rich.console import Console
    from rich.table import Table

    entries = result.get("dictionaries", [result])
    table = Table(title=f"Held-out sparsity metrics (d={result['dim']})")
    table.add_column("metric")
    for e in entries:
        table.add_column(e["label"], justify="right")
    rows = ["normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "explained_variance", "lam", "dict_size",
            "dead_fraction", "capped_fraction", "mean_steps"]
    for row in rows:
        table.add_row(row, *[f"{e[row]:.4g}" if isinstance(e[row], float) else str(e[row]) for e in entries])
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
