"""Optional preprocessing of cached activations against massive activations (`data.drop_positions`,
`data.max_norm_ratio`, `data.normalize`); one step in the streaming reader's row path.

Some models put a huge norm on the first position of every context (an attention sink, or a BOS
token) and carry a few "massive" dimensions; the sparse-coding metrics then describe those few rows
and dimensions rather than the typical token (`python -m sparse_coding.experiments massive` measures
it). The standard remedies, off by default:

- `data.drop_positions=K`: leave out the rows at context positions 0..K-1 (positions of the
  model's input, special tokens included: a cache that did not keep [CLS] has no row at position 0
  to drop). A cache stores contexts back to back, keeping the positions in its manifest's
  `corpus.keep_positions`, so row i is at position `keep_positions[i % rows_per_context]`. The
  dropped rows are left out of training, evaluation, Φ's data init and the centring mean (which is
  then recomputed over the kept rows: the stored mean minus the dropped rows, read alone).
- `data.max_norm_ratio=R`: leave out the rows whose norm (as stored, before centring) exceeds R times
  the median row norm of the layer. Attention sinks are not only at position 0: in 21 of the ~780
  contexts of a 100k-token wiki cache (contexts that start on a newline or inside a word) SmolLM2
  puts the same ~24,000-norm activation on position 1 or 2, and once position 0 is gone the top 1 %
  of rows still carry 41-92 % of the centred variance at hidden states 12-28 (2-3 % after this rule).
  The norm rule catches every such row whatever its position. At SmolLM2 hidden states
  12-28 the gap is wide (sinks at 60-190x the median, every other row below 10x), so R=10 is not a
  tuned value there; at hidden states 3-8 the norms form a continuous tail crossing 10x (597 rows
  of 100k at hidden state 3) and the rule trims that tail (`norm_outliers_dropped` in the data
  description says how many rows it left out). Dropped rows are handled as for `drop_positions`.
- `data.normalize=token`: after centring, scale every row to norm √d. S₁ and normalized_loss are
  invariant to one global scale (auto-λ scales with the data), so the target norm is immaterial
  and the option is well defined; what it changes is the weighting: both metrics are ratios of
  sums over rows, dominated by the large-norm rows, and after per-token normalisation every token
  counts the same. It is a different data set, so compare metrics only within one setting.

Synthetic data and imported arrays carry no positions: `drop_positions` needs a cache built from a
model over a corpus (checked when the data module opens the cache).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sparse_coding.errors import ConfigError

NORMALIZE = ("none", "token")


def context_positions(manifest: dict, rows: np.ndarray) -> np.ndarray:
    """Context position (0-based, in the model's input) of each global row index of a hidden-state cache."""
    corpus = manifest.get("corpus") or {}
    keep = corpus.get("keep_positions")
    if manifest.get("kind") != "hidden_states" or not keep:
        raise ConfigError(f"this cache (kind={manifest.get('kind')!r}) records no context positions: "
                          "data.drop_positions needs a cache built from a model over a corpus")
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.asarray(rows, dtype=np.int64) % len(keep)]


def dropped_rows(manifest: dict, shard_rows: list[int], blocks: list[tuple[int, int, int]],
                 drop_positions: int) -> dict[int, np.ndarray]:
    """{block index: row indices within the block to leave out} for rows at positions < drop_positions."""
    if drop_positions <= 0:
        return {}
    offsets = np.concatenate([[0], np.cumsum(shard_rows)])
    out = {}
    for i, (s, lo, hi) in enumerate(blocks):
        pos = context_positions(manifest, np.arange(offsets[s] + lo, offsets[s] + hi))
        idx = np.flatnonzero(pos < drop_positions)
        if len(idx):
            out[i] = idx
    return out


def merge_skips(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Union of two {block: row indices} maps (sorted, unique indices)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = np.union1d(out[k], v) if k in out else np.asarray(v)
    return out


def norm_outlier_mask(norms: np.ndarray, ratio: float) -> tuple[np.ndarray, float]:
    """(rows whose norm exceeds ratio x the median of the finite norms, that median); the
    `data.max_norm_ratio` rule, also used by `python -m sparse_coding.experiments massive`."""
    finite = np.isfinite(norms)
    if not finite.any():
        return np.zeros(len(norms), bool), float("nan")
    median = float(np.median(norms[finite]))
    return finite & (norms > ratio * median), median


def norm_outliers(read_block, n_blocks: int, ratio: float) -> tuple[dict[int, np.ndarray], float]:
    """({block: row indices whose norm exceeds ratio x the median row norm}, that median).

    `read_block(i)` returns block i's raw rows; norms are taken as stored (before centring: the
    outliers would distort the mean), the median over the finite rows (NaN/Inf rows are skipped
    elsewhere).
    """
    norms = [np.linalg.norm(np.asarray(read_block(i), dtype=np.float64), axis=1) for i in range(n_blocks)]
    mask, median = norm_outlier_mask(np.concatenate(norms) if norms else np.zeros(0), ratio)
    out, start = {}, 0
    for i, nb in enumerate(norms):
        idx = np.flatnonzero(mask[start:start + len(nb)])
        start += len(nb)
        if len(idx):
            out[i] = idx
    return out, median


def kept_mean(mean: np.ndarray, n_finite: int, read_block, skips: dict[int, np.ndarray]) -> np.ndarray:
    """float64 mean of the finite rows left after `skips`, from the cache's stored float64 mean of all
    `n_finite` finite rows; reads only the skipped rows (`read_block(i)` returns block i's raw rows)."""
    total, count = np.asarray(mean, np.float64) * n_finite, n_finite
    for i, idx in skips.items():
        x = np.asarray(read_block(i)[np.unique(idx)], dtype=np.float64)  # a row listed twice is one row
        x = x[np.isfinite(x).all(axis=1)]  # non-finite rows are not in the stored mean
        total -= x.sum(0)
        count -= len(x)
    if count <= 0:
        raise ConfigError("data.drop_positions / data.max_norm_ratio leave no rows in the cache: lower "
                          "drop_positions or raise max_norm_ratio")
    return total / count


def normalize_rows(x: np.ndarray, how: str) -> np.ndarray:
    """Per-token normalisation (in place when possible): every row to norm √d; a zero row stays zero."""
    if how == "none":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x *= np.sqrt(x.shape[1]) / np.where(norms > 0, norms, 1.0)
    return x


def describe(drop_positions: int, normalize: str, mean_recomputed: Optional[bool] = None,
             max_norm_ratio: float = 0.0, norm_dropped: Optional[int] = None,
             median_norm: Optional[float] = None) -> dict:
    out = {"drop_positions": int(drop_positions), "max_norm_ratio": float(max_norm_ratio), "normalize": normalize}
    if mean_recomputed is not None:
        out["mean_over_kept_rows"] = bool(mean_recomputed)
    if max_norm_ratio > 0:
        out["norm_outliers_dropped"] = int(norm_dropped or 0)  # beyond drop_positions, train + held-out
        out["median_row_norm"] = median_norm
    return out
