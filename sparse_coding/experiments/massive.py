"""Massive activations in a cache: per-position and per-dimension norms of every layer (issue 11, item 5).

    python -m sparse_coding.experiments massive data/cache/<model>/hidden_states/<corpus folder>

A cache stores contexts of `corpus.context_len` tokens back to back, keeping the positions listed
in the manifest's `corpus.keep_positions` (special tokens such as [CLS]/[SEP] are not kept unless
`corpus.keep_special_tokens`), so cached row i sits at context position
`keep_positions[i % rows_per_context]` (shards hold whole contexts). For each layer this reports:

- the mean token norm at the first kept position against the other positions (an attention sink
  or BOS-like first token has a norm many times the rest), and the share of the centred variance
  Σ‖x − x̄‖² that the first position's rows carry;
- the dimensions with the largest mean |x| and their share of Σ‖x‖² (raw) and of Σ‖x − x̄‖²
  (centred, what the dictionary is trained on): a few massive dimensions carry most of it;
- the share of Σ‖x − x̄‖² carried by the 1 % of rows with the largest centred norm (a heavy row
  tail: the metrics are ratios of sums over rows, so a few rows can decide them);
- the rows whose norm exceeds NORM_RATIO x the median row norm (the `data.max_norm_ratio` rule)
  and how many of them are not at the first position (attention sinks elsewhere in a context);
- the same centred shares after the remedies of `sparse_coding.data.preprocess`: `data.drop_positions=1`;
  that and `data.normalize=token`; and the remedy curve's (`data.drop_positions=1` with
  `data.max_norm_ratio=NORM_RATIO`).

Cheap: numpy only, the first `max_rows` rows of each layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparse_coding.cache.store import open_shard, read_manifest, shard_paths
from sparse_coding.data.preprocess import context_positions, norm_outlier_mask
from sparse_coding.experiments.grid import NORM_RATIO  # the data.max_norm_ratio reported: the remedy curve's

TOP_DIMS = 5


def layer_rows(path: Path, manifest: dict, key: str, max_rows: int) -> np.ndarray:
    """The first `max_rows` rows of one layer (float64)."""
    files = shard_paths(path, manifest, key)
    out, have = [], 0
    for f, e in zip(files, manifest["shards"][key]):
        arr = open_shard(f, int(e["rows"]), int(manifest["d"]), manifest["dtype"])
        take = min(int(e["rows"]), max_rows - have)
        out.append(np.asarray(arr[:take], dtype=np.float64))
        have += take
        if have >= max_rows:
            break
    return np.concatenate(out)


def centred_share(x: np.ndarray, mask: np.ndarray) -> float:
    """Share of Σ‖x − x̄‖² carried by the rows in `mask` (x̄ over all rows)."""
    c = x - x.mean(0)
    sq = (c * c).sum(1)
    return float(sq[mask].sum() / sq.sum())


def top_dims(x: np.ndarray, k: int = TOP_DIMS) -> dict:
    """The k dimensions with the largest mean |x|, with their shares of Σ‖x‖² and of Σ‖x − x̄‖²."""
    mean_abs = np.abs(x).mean(0)
    order = np.argsort(-mean_abs)[:k]
    raw = (x * x).sum(0)
    c = x - x.mean(0)
    cen = (c * c).sum(0)
    return {"dims": [int(i) for i in order], "mean_abs": [float(mean_abs[i]) for i in order],
            "median_mean_abs": float(np.median(mean_abs)),
            "raw_share": float(raw[order].sum() / raw.sum()), "centred_share": float(cen[order].sum() / cen.sum()),
            "top_centred_dims": [int(i) for i in np.argsort(-cen)[:k]],
            "top_centred_share": float(np.sort(cen)[::-1][:k].sum() / cen.sum())}


def top_rows_share(x: np.ndarray, fraction: float = 0.01) -> float:
    """Share of Σ‖x − x̄‖² carried by the `fraction` of rows with the largest centred norm."""
    c = x - x.mean(0)
    sq = np.sort((c * c).sum(1))[::-1]
    return float(sq[: max(1, int(len(sq) * fraction))].sum() / sq.sum())


def analyse_layer(x: np.ndarray, positions: np.ndarray) -> dict:
    norms = np.linalg.norm(x, axis=1)
    first = positions == positions.min()
    per_pos = {int(p): float(norms[positions == p].mean()) for p in np.unique(positions)}
    rest_mean = float(norms[~first].mean()) if (~first).any() else float("nan")
    dims = top_dims(x)
    # after the remedies: drop the first kept position, then scale every token to unit norm
    kept = x[~first] if (~first).any() else x
    unit = kept / np.maximum(np.linalg.norm(kept, axis=1, keepdims=True), 1e-12)
    massive = norm_outlier_mask(norms, NORM_RATIO)[0]
    remedied = x[~first & ~massive]  # the remedy curve's data: position 0 and the norm rule's rows left out
    return {
        "rows": int(x.shape[0]),
        "first_position": int(positions.min()),
        "norm_first": float(norms[first].mean()),
        "norm_rest_mean": rest_mean,
        "norm_rest_median": float(np.median(norms[~first])) if (~first).any() else float("nan"),
        "first_over_rest": float(norms[first].mean() / rest_mean) if rest_mean else float("nan"),
        "first_variance_share": centred_share(x, first),
        "first_row_share": float(first.mean()),
        "max_norm_position": max(per_pos, key=per_pos.get),
        "norm_p99_over_median": float(np.quantile(norms, 0.99) / np.median(norms)),
        "dims": dims,
        "drop_first": {"top_centred_share": top_dims(kept)["top_centred_share"], "top_rows_share": top_rows_share(kept),
                       "norm_max_over_median": float(np.linalg.norm(kept, axis=1).max()
                                                     / np.median(np.linalg.norm(kept, axis=1)))},
        "drop_first_token_norm": {"top_centred_share": top_dims(unit)["top_centred_share"]},
        "top_rows_share": top_rows_share(x),
        "norm_rule": {"ratio": NORM_RATIO, "rows": int(massive.sum()), "rows_not_first": int((massive & ~first).sum()),
                      "positions_not_first": sorted({int(p) for p in positions[massive & ~first]}),
                      "norm_max_over_median": float(norms[~massive].max() / np.median(norms))},
        "remedy": {"rows_left_out": int((first | massive).sum()),
                   "top_centred_share": top_dims(remedied)["top_centred_share"],
                   "top_rows_share": top_rows_share(remedied)},
    }


def analyse_cache(path: Path, layers: list[str] | None = None, max_rows: int = 65536) -> dict:
    path = Path(path)
    m = read_manifest(path)
    keys = layers or sorted(m["shards"], key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))
    n = min(int(m["n_rows"]), max_rows)
    positions = context_positions(m, np.arange(n))
    out = {"cache": str(path), "model": (m.get("model") or {}).get("name"), "d": int(m["d"]),
           "context_len": (m.get("corpus") or {}).get("context_len"),
           "keep_positions_first": (m.get("corpus") or {}).get("keep_positions", [None])[:1], "layers": {}}
    for key in keys:
        out["layers"][key] = analyse_layer(layer_rows(path, m, key, n), positions)
    return out


def format_report(result: dict) -> str:
    lines = [f"{result['model']} (d={result['d']}, context {result['context_len']}, first kept context position "
             f"{result['keep_positions_first']}) — {result['cache']}",
             "layer | ‖x‖ first pos | ‖x‖ rest (mean) | ratio | first pos share of centred var | top-5 |x| dims "
             "(mean |x|; median dim) | their raw / centred share of Σ‖x‖² | top-5 centred share: raw, -pos0, "
             f"-pos0+token norm, remedy (-pos0 -rows>{NORM_RATIO:g}x median norm) | rows>{NORM_RATIO:g}x (not at first "
             "pos) | top-1% rows' centred share: raw, -pos0, remedy"]
    for key, r in result["layers"].items():
        d = r["dims"]
        lines.append(
            f"{key:>5} | {r['norm_first']:9.3g} | {r['norm_rest_mean']:9.3g} | {r['first_over_rest']:6.3g} | "
            f"{r['first_variance_share']:.3f} (rows {r['first_row_share']:.3f}) | "
            f"{d['dims']} ({', '.join(f'{v:.3g}' for v in d['mean_abs'][:3])}…; {d['median_mean_abs']:.3g}) | "
            f"{d['raw_share']:.3f} / {d['centred_share']:.3f} | {d['top_centred_share']:.3f}, "
            f"{r['drop_first']['top_centred_share']:.3f}, {r['drop_first_token_norm']['top_centred_share']:.3f}, "
            f"{r['remedy']['top_centred_share']:.3f} | {r['norm_rule']['rows']} ({r['norm_rule']['rows_not_first']}) | "
            f"{r['top_rows_share']:.3f}, {r['drop_first']['top_rows_share']:.3f}, {r['remedy']['top_rows_share']:.3f}")
    return "\n".join(lines)


def main(caches: list[Path], layers: str | None, max_rows: int, json_path: Path | None) -> int:
    results = []
    for c in caches:
        res = analyse_cache(c, layers.split(",") if layers else None, max_rows)
        print(format_report(res), flush=True)
        results.append(res)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0
