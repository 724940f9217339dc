"""The figures of docs/RESULTS.md, one function per experiment, each returning the PNG paths it wrote.

Every point carries an error bar (sd over seeds; the run's SE with one seed; [min, max] around the
median from 5 seeds) and a point that did not converge on every seed, or whose solver hit its step
cap on >= 1% of samples, is drawn hollow (see tables.group's `flagged`).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparse_coding.experiments.grid import LAYER_MODELS  # noqa: E402
from sparse_coding.experiments.runner import read_csv  # noqa: E402
from sparse_coding.experiments.tables import (  # noqa: E402
    CONTROL_ORDER, METRICS4, control_groups, all_collapsed, dict_size_groups, group, layer_curves, layer_groups, sensitivity_factor,
)

HOLLOW_NOTE = "held-out; hollow: unconverged seed or capped ≥ 1%; X: all seeds collapsed"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def yerr(g: dict, m: str) -> tuple[float, float]:
    v = g.get(m)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 0.0, 0.0
    if g.get("robust"):
        return v - g[f"{m}_lo"], g[f"{m}_hi"] - v
    e = g.get(f"{m}_err")
    e = 0.0 if e is None or (isinstance(e, float) and math.isnan(e)) else e
    return e, e


def series(ax, xs, g: list[dict], m: str, color, label: str, marker="o", ls="-", ms=5):
    """A line through the points, each with its error bar, hollow when flagged, a cross when every seed collapsed."""
    ax.plot(xs, [r[m] for r in g], ls=ls, color=color, label=label)
    for x, r in zip(xs, g):
        lo, hi = yerr(r, m)
        sunk = all_collapsed(r)
        ax.errorbar([x], [r[m]], yerr=[[lo], [hi]], fmt="X" if sunk else marker, ms=ms * 1.6 if sunk else ms,
                    color=color, capsize=3, mfc="none" if r.get("flagged") else color)


def plot_sparsity(rows, out: Path, name: str = "sparsity") -> list[Path]:
    g = sorted(group(rows, ("a",), ("normalized_loss", "avg_coef_norm", "l0", "loss", "true_avg_coef_norm")),
               key=lambda r: r["a"])
    d = rows[0]["dim"]
    x = [r["a"] / 2 for r in g]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for m, c in (("normalized_loss", "C0"), ("avg_coef_norm", "C1"), ("l0", "C2"), ("loss", "C3")):
        series(ax, x, g, m, c, "final loss" if m == "loss" else m)
    ax.plot(x, [r["true_avg_coef_norm"] for r in g], ls=":", color="C1", label="true S1 of the generated alpha")
    ax.plot([min(x), max(x)], [min(x), max(x)], "k--", label="y = x (ground truth a/2)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ground truth a/2 (a = mean active features)")
    ax.set_ylabel("metric on held-out data")
    ax.set_title(f"Metric vs true sparsity (d={d})\n{HOLLOW_NOTE}", fontsize="small")
    ax.legend(fontsize="x-small")
    return [_save(fig, out / f"{name}.png")]


def plot_controls(rows, out: Path, name: str = "controls") -> list[Path]:
    g = control_groups(rows)
    labels = [lab for lab in CONTROL_ORDER if lab in g]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    for ax, m in zip(axes, METRICS4):
        for i, lab in enumerate(labels):
            color = "C2" if lab.startswith("a=") else "C3"
            lo, hi = yerr(g[lab], m)
            ax.bar([i], [g[lab][m]], color=color, fill=not g[lab]["flagged"], edgecolor=color, lw=1.5)
            ax.errorbar([i], [g[lab][m]], yerr=[[lo], [hi]], color="k", capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(m)
    fig.suptitle(f"Sparse-linear (green) vs controls (red), d={rows[0]['dim']}; median [min–max] from 5 seeds, else "
                 f"mean ± sd; {HOLLOW_NOTE}", fontsize="small")
    return [_save(fig, out / f"{name}.png")]


def plot_dict_size(rows, out: Path) -> list[Path]:
    g = dict_size_groups(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, m in zip(axes, ("normalized_loss", "avg_coef_norm", "l0")):
        for i, lab in enumerate(sorted({r["label"] for r in g})):
            pts = [r for r in g if r["label"] == lab]
            series(ax, [r["dict_mult"] for r in pts], pts, m, f"C{i}", lab)
            if lab.startswith("a=") and m != "l0":
                ax.axhline(int(lab[2:]) / 2, color=f"C{i}", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size m / d")
        ax.set_ylabel(m)
        ax.set_yscale("log")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Dictionary-size robustness (dashed: a/2); {HOLLOW_NOTE}", fontsize="small")
    return [_save(fig, out / "dict_size.png")]


def plot_embeddings(rows, out: Path) -> list[Path]:
    g = group(rows, ("source", "dim"), ("normalized_loss", "avg_coef_norm"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m in zip(axes, ("normalized_loss", "avg_coef_norm")):
        for r in g:
            gauss = str(r["source"]).startswith("gaussian")
            series(ax, [r["dim"]], [r], m, "C3" if gauss else "C0", "_nolegend_", marker="s" if gauss else "o")
            ax.annotate(str(r["source"]), (r["dim"], r[m]), fontsize="x-small", xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("embedding width d")
        ax.set_ylabel(m)
        ax.set_yscale("log")
        ax.set_title(f"{m}: models (blue) vs Gaussian (red)\n{HOLLOW_NOTE}", fontsize="small")
    return [_save(fig, out / "embeddings.png")]


def plot_layers(rows, out: Path) -> list[Path]:
    g = layer_groups(rows)
    models = sorted({r["model"] for r in g})
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.2 * (len(models) + 1), 4.2))
    for ax, model in zip(axes, models):
        ax2 = ax.twinx()
        for (_, prep, mult), pts in [c for c in layer_curves(g) if c[0][0] == model]:
            ls = "--" if prep == "remedy" else "-"
            tag = prep if len({r["dict_mult"] for r in g if r["model"] == model}) == 1 else f"{prep}, {mult}d"
            xs = [r["layer"] for r in pts]
            for m, c in (("normalized_loss", "C0"), ("avg_coef_norm", "C1")):
                series(ax, xs, pts, m, c, f"{m} ({tag})", ls=ls, ms=3)
            series(ax2, xs, pts, "explained_variance", "C2", f"explained variance ({tag})", marker=".", ls=":", ms=3)
        ax.set_xlabel("hidden state (0 = embedding output, i = after block i)")
        ax.set_ylabel("sparsity metric")
        ax2.set_ylabel("explained variance (1 - fvu)", color="C2")
        ax2.set_ylim(0, 1.02)
        mults = "/".join(f"{m}d" for m in sorted({r["dict_mult"] for r in g if r["model"] == model}))
        ax.set_title(f"{model}, {mults} dictionary (dashed: position 0 dropped)", fontsize="small")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize="xx-small", loc="upper left")
    ax = axes[-1]
    for i, ((model, prep, mult), pts) in enumerate(layer_curves(g)):
        n = LAYER_MODELS.get(model) or max(r["layer"] for r in pts)
        series(ax, [r["layer"] / n for r in pts], pts, "normalized_loss", f"C{i + 4}",
               f"{model} {prep} {mult}d",
               ls="-" if prep == "raw" else "--", ms=3)
    ax.set_xlabel("relative depth (layer / number of blocks)")
    ax.set_ylabel("normalized_loss")
    ax.set_title(f"Shape across depth\n{HOLLOW_NOTE}", fontsize="small")
    ax.legend(fontsize="x-small")
    return [_save(fig, out / "layers.png")]


def plot_sensitivity(rows, out: Path) -> list[Path]:
    for r in rows:
        r["factor"] = sensitivity_factor(r)
    g = sorted(group(rows, ("case", "factor"), ("normalized_loss", "avg_coef_norm", "l0")),
               key=lambda r: (r["case"], r["factor"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m in zip(axes, ("normalized_loss", "avg_coef_norm")):
        for i, case in enumerate(sorted({r["case"] for r in g})):
            pts = [r for r in g if r["case"] == case]
            series(ax, [r["factor"] for r in pts], pts, m, f"C{i}", case)
        ax.axvline(1.0, color="k", ls=":", label="auto lambda")
        ax.set_xscale("log")
        factors = sorted({r["factor"] for r in g})
        ax.set_xticks(factors, [f"{f:g}" for f in factors])
        ax.minorticks_off()
        ax.set_xlabel("lambda / auto lambda (fixed during training)")
        ax.set_ylabel(m)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Sensitivity to lambda; {HOLLOW_NOTE}", fontsize="small")
    return [_save(fig, out / "sensitivity.png")]


def plot_solver_gap(rows, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    exps = sorted({r["experiment"] for r in rows})
    for i, e in enumerate(exps):
        pts = [r for r in rows if r["experiment"] == e]
        xs = [i + 0.3 * (j - (len(pts) - 1) / 2) / max(1, len(pts)) for j in range(len(pts))]
        axes[0].scatter(xs, [r["gap_ratio"] for r in pts], color=f"C{i}")
        if pts[0].get("lasso_normalized_loss") is not None:
            axes[1].scatter([r["greedy_normalized_loss"] for r in pts], [r["lasso_normalized_loss"] for r in pts],
                            color=f"C{i}", label=e)
    axes[0].axhline(1.0, color="k", ls="--", label="exact lasso optimum")
    axes[0].set_xticks(range(len(exps)), exps)
    axes[0].set_ylabel("greedy objective / exact lasso objective")
    axes[0].legend(fontsize="x-small")
    lim = [min(axes[1].get_xlim()[0], axes[1].get_ylim()[0]), max(axes[1].get_xlim()[1], axes[1].get_ylim()[1])]
    axes[1].plot(lim, lim, "k--", lw=0.8, label="y = x")
    axes[1].set_xlabel("normalized_loss, greedy code")
    axes[1].set_ylabel("normalized_loss, exact lasso code")
    axes[1].legend(fontsize="x-small")
    fig.suptitle("Solver gap on trained dictionaries (held-out samples, same Φ and λ)")
    return [_save(fig, out / "solver_gap.png")]


def plot_functional(rows, out: Path) -> list[Path]:
    """A row of two panels per model: the increase in its behaviour measure, and the share recovered."""
    curves = sorted({(r["model"], r.get("preprocess") or "raw") for r in rows}, key=lambda k: (k[0] != "smollm2", k))
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 4 * len(curves)), squeeze=False)
    for (ax, ax_r), (model, prep) in zip(axes, curves):
        mine = sorted((r for r in rows if (r["model"], r.get("preprocess") or "raw") == (model, prep)),
                      key=lambda r: r["layer"])
        xs = [r["layer"] for r in mine]
        ax.plot(xs, [r["loss_increase"] for r in mine], marker="o", label="reconstruction - clean")
        ax.plot(xs, [r["zero_ablation_loss"] - r["clean_loss"] for r in mine], marker="x", ls=":",
                label="zero-ablation - clean")
        if any(r.get("mean_ablation_loss") is not None for r in mine):  # rows older than the mean baseline: gaps
            ax.plot(xs, [r["mean_ablation_loss"] - r["clean_loss"] if r.get("mean_ablation_loss") is not None
                         else float("nan") for r in mine], marker="+", ls="--", label="mean-ablation - clean")
        ax.set_yscale("symlog", linthresh=0.1 if model == "smollm2" else 1e-3)
        ax.set_xlabel("hidden state replaced")
        ax.set_ylabel(f"{model} ({prep}): increase in " + ("next-token loss (nats)" if model == "smollm2"
                                                   else "1 - cos(embedding, clean)"))
        ax.legend(fontsize="x-small")
        ax_r.plot(xs, [r["fraction_recovered"] for r in mine], marker="o", color="C2", label="recovered (vs zero-ablation)")
        if any(r.get("fraction_recovered_vs_mean") is not None for r in mine):
            ax_r.plot(xs, [r.get("fraction_recovered_vs_mean") for r in mine], marker="s", color="C3",
                      label="recovered (vs mean-ablation)")
        if any(r.get("retrieval_top1") is not None for r in mine):
            ax_r.plot(xs, [r.get("retrieval_top1") for r in mine], marker="^", color="C4", ls="--",
                      label="retrieval top-1 (Φα)")
        ax_r.axhline(1.0, color="k", ls="--", lw=0.8)
        ax_r.set_xlabel("hidden state replaced")
        ax_r.set_ylabel("fraction recovered / retrieval top-1" if model != "smollm2" else "fraction recovered")
        ax_r.legend(fontsize="x-small", loc="lower left")
    fig.suptitle("Functional check: Φα patched into the forward pass (one seed, one context set)")
    return [_save(fig, out / "functional.png")]


def plot_sample_size(rows, out: Path) -> list[Path]:
    """Held-out (filled) and in-sample (dashed) normalized_loss against the fitted sample size; fresh data as a line."""
    from sparse_coding.experiments.tables import sample_size_groups

    g = sample_size_groups(rows)
    names = sorted({x["series"] for x in g})
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [x for x in g if x["series"] == name and x["size"] != "fresh"]
        xs = [float(x["size"]) for x in pts]
        series(ax, xs, pts, "normalized_loss", "C0", "held-out")
        series(ax, xs, pts, "in_sample_normalized_loss", "C1", "in-sample", marker="s", ls="--")
        for x in (x for x in g if x["series"] == name and x["size"] == "fresh"):
            ax.axhline(x["normalized_loss"], color="C2", ls=":", label="fresh batches (held-out)")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (cache size)" if "hidden state" in name else "training rows (data.n)")
        ax.set_ylabel("normalized_loss")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Sample size: held-out vs in-sample; " + HOLLOW_NOTE.split(";", 1)[1].strip(), fontsize=8)
    return [_save(fig, out / "sample_size.png")]


PLOTS = {"sparsity": plot_sparsity, "controls": plot_controls,
         "controls_d256": lambda rows, out: plot_controls(rows, out, "controls_d256"), "dict_size": plot_dict_size,
         "embeddings": plot_embeddings, "layers": plot_layers, "sensitivity": plot_sensitivity,
         "solver_gap": plot_solver_gap, "functional": plot_functional, "sample_size": plot_sample_size,
         "sparsity_fresh": lambda rows, out: plot_sparsity(rows, out, "sparsity_fresh"),
         "controls_fresh": lambda rows, out: plot_controls(rows, out, "controls_fresh")}


def plot_experiment(name: str, results: Path) -> list[Path]:
    """Redraw one experiment's figure from its CSV (the layer figure holds both the raw and the remedy curves)."""
    if name in ("layers", "layers_remedy"):
        rows = [r for n in ("layers", "layers_remedy") if (results / f"{n}.csv").is_file()
                for r in read_csv(results / f"{n}.csv")]
        return plot_layers(rows, results) if rows else []
    path = results / f"{name}.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    return PLOTS[name](rows, results) if rows else []
