"""The files `sparse-coding-features` writes into RUN_DIR/features/ (the numbers come from
sparse_coding.features):

- `features.json`: the whole report (every feature's density, active rows, mean coefficient when active, its
  top-k rows with their value and context; synthetic sparse-linear data: the recovery of the true features);
- `features.html`: one static page, no scripts and nothing fetched (plain HTML and CSS, the histogram embedded
  as a data: URI, every text escaped); a feature's contexts open with <details>;
- `density_histogram.png`: log10 activation density of the live features, one panel per dictionary, the dead
  features counted in its title;
- a W&B run (offline unless told otherwise, the mode rule of sparse_coding.loggers) with a table of the
  features, the histogram and the summary numbers.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from sparse_coding.errors import SparseCodingError, StorageError

FILES = ("features.json", "features.html", "density_histogram.png")


def write_report(out_dir: Path, report: dict) -> list[Path]:
    """features.json, density_histogram.png and features.html, each written atomically; their paths."""
    from sparse_coding.atomic import atomic_write_bytes

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "features.json", json_text(report).encode())
        png = histogram_png(report)
        atomic_write_bytes(out_dir / "density_histogram.png", png)
        atomic_write_bytes(out_dir / "features.html", render_html(report, png).encode())
    except OSError as err:
        raise StorageError(f"{out_dir}: cannot write the features ({err.strerror or err}): make the run directory "
                           "writable") from None
    return [out_dir / name for name in FILES]


def json_text(report: dict) -> str:
    """features.json: the report as JSON, one line per feature (grep-able; tokens kept as UTF-8)."""
    def dump(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)

    entries = []
    for d in report["dictionaries"]:
        head = dump({k: v for k, v in d.items() if k != "features"})[:-1]
        lines = ",\n".join(f"   {dump(f)}" for f in d["features"])
        entries.append(f'  {head}, "features": [\n{lines}\n  ]}}')
    top = dump({k: v for k, v in report.items() if k != "dictionaries"})[:-1]
    return f'{top}, "dictionaries": [\n' + ",\n".join(entries) + "\n]}\n"


def histogram_png(report: dict) -> bytes:
    """The density histogram (one panel per dictionary) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = report["dictionaries"]
    cols = min(len(entries), 3)
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, e in zip(axes.flat, entries):
        density = np.array([f["density"] for f in e["features"]])
        live = density[density > 0]
        if len(live):
            ax.hist(np.log10(live), bins=min(50, max(10, len(live) // 10)), color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no feature is active on these rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{e['label']}: {e['dead']} of {e['dict_size']} dead (density 0, not shown)", fontsize=9)
        ax.set_xlabel("log10 activation density (fraction of rows with α > 0)")
        ax.set_ylabel("features")
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    fig.suptitle(f"Feature density on {report['rows_used']:,} {report['split']} rows", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.summary td { padding: 0.1em 1em 0.1em 0; }
details { border-bottom: 1px solid #eee; padding: 0.15em 0; }
summary { cursor: pointer; }
summary .idx { display: inline-block; min-width: 4.5em; font-weight: 600; }
summary .num { display: inline-block; min-width: 9em; color: #555; font-variant-numeric: tabular-nums; }
ol { margin: 0.3em 0 0.6em; }
li { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; }
.val { display: inline-block; min-width: 6em; color: #555; }
mark { background: #ffd54a; padding: 0 1px; }
.note { color: #666; } .dead { color: #888; font-size: 13px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _context_html(entry: dict) -> str:
    if "token" not in entry:
        return f"row {entry['row']}"
    def line(s: str) -> str:
        return _e(s.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵"))
    return f"{line(entry['left'])}<mark>{line(entry['token'])}</mark>{line(entry['right'])}"


def render_html(report: dict, png: bytes) -> str:
    """The static page: a summary, the histogram and, per dictionary, every live feature with its contexts."""
    e = _e
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Features of {e(report['run_dir'])}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>Features of {e(report['run_dir'])}</h1>"]
    where = (f"cache {report['cache_path']} layer {report['layer']}" if report["source"] == "cache"
             else f"synthetic data={report['data']}, regenerated from the run's config")
    info = [("rows coded", f"{report['rows_used']:,} {report['split']} rows of {report['rows_in_split']:,}"),
            ("data", where), ("density", report["density_definition"]), ("top-k", report["top_k"])]
    for key in ("contexts", "truth"):
        if report.get(key):
            info.append((key, report[key]))
    parts.append('<table class="summary">' + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in info)
                 + "</table>")
    parts.append(f'<p><img alt="feature density histogram" src="data:image/png;base64,'
                 f'{base64.b64encode(png).decode()}"></p>')
    for d in report["dictionaries"]:
        parts.append(f"<h2>{e(d['label'])}: m = {d['dict_size']}, λ = {d['lam']:.4g}</h2>")
        rec = d.get("recovery")
        if rec:
            q = rec["max_cosine_quantiles"]
            parts.append(f"<p>Recovered <b>{rec['recovered']} of {rec['true_features']}</b> true features "
                         f"({rec['recovered_fraction']:.1%}): max cosine to an atom &gt; {rec['threshold']}; "
                         f"median max cosine {q['q50']:.3f}, 10 % {q['q10']:.3f}.</p>")
        dead = [f["index"] for f in d["features"] if f["active_rows"] == 0]
        parts.append(f"<p>{d['dead']} dead features ({d['dead_fraction']:.1%}: never active on these rows)"
                     + (f'<br><span class="dead">{e(", ".join(map(str, dead)))}</span>' if dead else "") + "</p>")
        for f in d["features"]:
            if not f["top"]:  # dead: listed above
                continue
            first = f["top"][0]
            head = f" · <mark>{e(first['token'])}</mark>" if "token" in first else ""
            extra = (f'<span class="num">cos {f["closest_true_cosine"]:.3f} to #{f["closest_true_feature"]}</span>'
                     if "closest_true_cosine" in f else "")
            items = "".join(f'<li><span class="val">{t["value"]:.4g}</span>{_context_html(t)}</li>' for t in f["top"])
            parts.append(f'<details><summary><span class="idx">#{f["index"]}</span>'
                         f'<span class="num">density {f["density"]:.3g}</span>'
                         f'<span class="num">max {first["value"]:.4g}</span>{extra}{head}</summary>'
                         f"<ol>{items}</ol></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def log_wandb(run, out_dir: Path, report: dict) -> str:
    """Log the features as a W&B table (with the histogram and summary numbers) on a run of its own
    (job_type "features", grouped with the run's W&B group); the mode rule of sparse_coding.loggers."""
    import wandb

    from sparse_coding.loggers import check_online_login, flat_config, wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    log = run.cfg.get("logger") or {}
    mode = wandb_mode(log.get("mode"))
    if mode == "online":
        check_online_login(wandb)
    from omegaconf import OmegaConf

    config = {"run_dir": str(run.path), "split": report["split"], "rows_used": report["rows_used"],
              "top_k": report["top_k"], **flat_config(OmegaConf.to_container(run.cfg, resolve=True))}
    columns = ["dictionary", "feature", "density", "active_rows", "mean_when_active", "max_coefficient", "top_context"]
    rows = [[d["label"], f["index"], f["density"], f["active_rows"], f["mean_when_active"],
             f["top"][0]["value"] if f["top"] else 0.0,
             (f["top"][0].get("text") or f"row {f['top'][0]['row']}") if f["top"] else ""]
            for d in report["dictionaries"] for f in d["features"]]
    try:
        if wandb.run is not None:
            wandb.finish()
        wb = wandb.init(project=log.get("project") or "sparse-coding", entity=log.get("entity"), group=log.get("group"),
                        job_type="features", name=f"features-{Path(run.path).resolve().name}", dir=str(out_dir),
                        mode=mode, config=config)
        try:
            wb.log({"features/table": wandb.Table(columns=columns, data=rows),
                    "features/density_histogram": wandb.Image(str(out_dir / "density_histogram.png"))})
            for d in report["dictionaries"]:
                prefix = "features" if len(report["dictionaries"]) == 1 else f"features/{d['label']}"
                wb.summary[f"{prefix}/dead_fraction"] = d["dead_fraction"]
                if d.get("recovery"):
                    wb.summary[f"{prefix}/recovered"] = d["recovery"]["recovered"]
                    wb.summary[f"{prefix}/recovered_fraction"] = d["recovery"]["recovered_fraction"]
            wb.summary["features/rows_used"] = report["rows_used"]
            where = getattr(wb, "dir", None) or str(out_dir / "wandb")
        finally:
            wb.finish()
    except SparseCodingError:
        raise
    except Exception as err:  # noqa: BLE001 - wandb's own errors (service, network): one line
        raise StorageError(f"W&B logging failed ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                           f"the files in {out_dir} are written: rerun with --no-wandb to skip it") from None
    return f"{mode} run in {Path(where).parent if mode == 'offline' else where}"
