"""Matplotlib figures for a single run: the metrics beside the ground truth, lambda's path and the
convergence history of the held-out measurement."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHOWN = ("normalized_loss", "avg_coef_norm", "l0")


def plot_run(out_dir: Path, result: dict) -> list[Path]:
    """Write plots/metrics.png, plots/lam_history.png and plots/convergence.png; returns their paths."""
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
    if result.get("history"):
        paths.append(plot_convergence(plot_dir / "convergence.png", result, [e["label"] for e in entries]))
    return paths


def plot_convergence(path: Path, result: dict, labels: list[str]) -> Path:
    """normalized_loss and avg_coef_norm (with +-2 SE bands) and lambda at every held-out evaluation."""
    history = result["history"]
    samples = [h["samples_seen"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for k, label in enumerate(labels):
        for ax, key in zip(axes[:2], ("normalized_loss", "avg_coef_norm")):
            values = [h["dictionaries"][k][key] for h in history]
            se = [h["dictionaries"][k].get(f"{key}_se", 0.0) for h in history]
            line, = ax.plot(samples, values, marker="o", ms=3, label=label)
            ax.fill_between(samples, [v - 2 * s for v, s in zip(values, se)], [v + 2 * s for v, s in zip(values, se)],
                            color=line.get_color(), alpha=0.2)
        axes[2].plot(samples, [h["dictionaries"][k]["lam"] for h in history], marker="o", ms=3, label=label)
    if "truth" in result:
        for ax in axes[:2]:
            ax.axhline(result["truth"]["ground_truth"], color="k", ls="--", lw=1, label="a/2")
    for ax, title in zip(axes, ("normalized_loss", "avg_coef_norm", "lambda")):
        ax.set_xlabel("training samples seen")
        ax.set_title(title)
    status = "converged" if result.get("converged") else "NOT converged"
    fig.suptitle(f"Held-out measurement during training ({status}; bands: ±2 SE)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
