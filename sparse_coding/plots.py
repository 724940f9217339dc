"""Matplotlib figures for a single run: the metrics beside the ground truth, and lambda's path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHOWN = ("normalized_loss", "avg_coef_norm", "l0")


def plot_run(out_dir: Path, result: dict) -> list[Path]:
    """Write plots/metrics.png and plots/lam_history.png; returns their paths."""
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    entries = result.get("dictionaries", [result])
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(entries)
    for k, e in enumerate(entries):
        xs = [i + k * width for i in range(len(SHOWN))]
        ax.bar(xs, [e[name] for name in SHOWN], width=width, label=f"{e['label']} (lam={e['lam']:.3g})")
    if "truth" in result:
        ax.axhline(result["truth"]["ground_truth"], color="k", ls="--", label="ground truth a/2")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SHOWN))], SHOWN)
    ax.set_ylabel("value on held-out data")
    ax.set_title(f"Sparsity metrics (d={result['dim']})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(plot_dir / "metrics.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        history = e.get("lam_history") or [e["lam"]]
        ax.plot(range(len(history)), history, marker="o", label=e["label"])
    ax.set_xlabel("auto-lambda round (0 = initial guess)")
    ax.set_ylabel("lambda")
    ax.set_title("Penalty lambda per round")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(plot_dir / "lam_history.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
