""""The paper's claims at its own scale": each claim of the paper checked against the paper-scale rows.

Each check returns (claim, verdict, the numbers behind it). Verdicts: *confirmed*, *not confirmed*,
*inconclusive*. A check is inconclusive when its rows are missing, or when a point it rests on did
not converge on every seed or hit the solver cap (`tables.group`'s `flagged`): an unconverged
measurement can neither confirm nor refute. The thresholds are stated in each check's text.
"""

from __future__ import annotations

from sparse_coding.experiments.grid import LAYER_MODELS, LAYER_STRIDE
from sparse_coding.experiments.tables import (
    CONTROL_ORDER, PAPER_SPARSITY, PAPER_MODELS_NOTE, all_collapsed, control_groups, dict_size_groups, group,
    layer_curves, layer_groups, table,
)

CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE = "confirmed", "not confirmed", "inconclusive"
PAPER_BAND = (0.6, 1.4)  # ours / the paper's value for a <= 20: SPEC §7's "within ~40 %" bar
PLATEAU_GROWTH = 2.0  # "plateaus": the metric grows < 2× from a=64 to the largest a, while a/2 grows 8×
ROBUST_SPREAD = 1.25  # "robust to dictionary size": max/min of normalized_loss over 4d–16d ≤ 1.25 (> 1.5: refuted)


def _verdict(ok: bool | None, flagged: list[str]) -> str:
    if ok is None:
        return INCONCLUSIVE
    if flagged:
        return INCONCLUSIVE
    return CONFIRMED if ok else NOT_CONFIRMED


def _flag_note(flagged: list[str]) -> str:
    return f" Unconverged, capped or collapsed points it rests on: {', '.join(flagged)}." if flagged else ""


def claim_tracks(rows: list[dict]) -> tuple[str, str, str]:
    """The paper's own curve is not a/2 either (its normalized_loss is 2.2 at a=2, 2.2x a/2), so the check is
    its shape, with SPEC §7's bar for the digits: the metric rises with a up to 20, sits within ~40 % of
    the paper's values there (PAPER_BAND), and plateaus for a >= 64. The ratio to a/2 is reported."""
    claim = "Fig. 1a: normalized_loss and S₁ track the true sparsity a/2 up to a ≈ 20, then plateau"
    if not rows:
        return claim, INCONCLUSIVE, "not run at the paper's scale"
    g = sorted(group(rows, ("a",), ("normalized_loss", "avg_coef_norm")), key=lambda r: r["a"])
    small = [r for r in g if r["a"] <= 20]
    big = [r for r in g if r["a"] >= 64]
    if not small or len(big) < 2:
        return claim, INCONCLUSIVE, "too few points (need a ≤ 20 and two a ≥ 64)"
    ratios = [r["normalized_loss"] / (r["a"] / 2) for r in small]
    mono = all(b["normalized_loss"] > a["normalized_loss"] for a, b in zip(small, small[1:]))
    growth = big[-1]["normalized_loss"] / big[0]["normalized_loss"]
    vs_paper = [(r["a"], r["normalized_loss"] / PAPER_SPARSITY[int(r["a"])][1]) for r in small
                if int(r["a"]) in PAPER_SPARSITY]
    near_paper = all(PAPER_BAND[0] <= q <= PAPER_BAND[1] for _, q in vs_paper)
    ok = mono and near_paper and growth < PLATEAU_GROWTH
    flagged = [f"a={r['a']:g}" for r in small + big if r["flagged"]]
    nums = (f"rising with a for a ≤ 20: {'yes' if mono else 'no'}; ours / paper for a ≤ 20: "
            + ", ".join(f"a={a:g}: {q:.2f}" for a, q in vs_paper)
            + f" (bar {PAPER_BAND[0]}–{PAPER_BAND[1]}); normalized_loss/(a/2): {min(ratios):.2f}–{max(ratios):.2f} "
            f"(the paper's own: 2.2 at a=2, 0.98 at a=20); a={big[0]['a']:g} → {big[-1]['a']:g}: "
            f"{big[0]['normalized_loss']:.3g} → {big[-1]['normalized_loss']:.3g} (×{growth:.2f}, plateau if < "
            f"{PLATEAU_GROWTH:g} while a/2 grows ×{big[-1]['a'] / big[0]['a']:g}).")
    return claim, _verdict(ok, flagged), nums + _flag_note(flagged)


def claim_l0(rows: list[dict]) -> tuple[str, str, str]:
    claim = "Fig. 1a: L0 over-estimates the number of active features"
    if not rows:
        return claim, INCONCLUSIVE, "not run at the paper's scale"
    g = sorted(group(rows, ("a",), ("l0",)), key=lambda r: r["a"])
    pts = [r for r in g if r["a"] <= 64]
    over = [r["l0"] / r["a"] for r in pts]
    flagged = [f"a={r['a']:g}" for r in pts if r["flagged"]]
    nums = "l0 / a for a ≤ 64: " + ", ".join(f"a={r['a']:g}: {v:.2f}" for r, v in zip(pts, over)) + "."
    return claim, _verdict(min(over) > 1 if over else None, flagged), nums + _flag_note(flagged)


def claim_controls(rows: list[dict]) -> list[tuple[str, str, str]]:
    claims = ["Fig. 1b: normalized_loss puts every isotropic control above every sparse-linear set",
              "Fig. 1b: L0 fails to separate the heavy-tailed control",
              "Fig. 1b: the final loss fails to separate the Gaussian control"]
    if not rows:
        return [(c, INCONCLUSIVE, "not run at the paper's scale") for c in claims]
    g = control_groups(rows)
    sparse = [g[k] for k in CONTROL_ORDER if k.startswith("a=") and k in g]
    ctrls = [g[k] for k in ("gaussian", "rademacher", "heavy_tailed") if k in g]
    if not sparse or not ctrls:
        return [(c, INCONCLUSIVE, "sparse sets or controls missing") for c in claims]
    flagged = [r["label"] for r in sparse + ctrls if r["flagged"]]
    out = []
    top = max(r["normalized_loss"] for r in sparse)
    low = min(r["normalized_loss"] for r in ctrls)
    out.append((claims[0], _verdict(low > top, flagged),
                f"highest sparse-linear {top:.3g}, lowest control {low:.3g} ("
                + ", ".join(f"{r['label']} {r['normalized_loss']:.3g}" for r in ctrls) + ")." + _flag_note(flagged)))
    for i, (ctrl, m) in enumerate((("heavy_tailed", "l0"), ("gaussian", "loss")), start=1):
        if ctrl not in g:
            out.append((claims[i], INCONCLUSIVE, f"{ctrl} missing"))
            continue
        top_m = max(r[m] for r in sparse)
        fails = g[ctrl][m] <= top_m
        fl = [x for x in flagged if x in (ctrl, *[r["label"] for r in sparse])]
        out.append((claims[i], _verdict(fails, fl),
                    f"{m}: {ctrl} {g[ctrl][m]:.3g} vs highest sparse-linear {top_m:.3g} (fails = not above it)."
                    + _flag_note(fl)))
    return out


def claim_embeddings(rows: list[dict]) -> tuple[str, str, str]:
    claim = "Fig. 2: token embeddings score far below a Gaussian of the same d"
    if not rows:
        return claim, INCONCLUSIVE, "not run at the paper's scale"
    g = group(rows, ("source", "dim"), ("normalized_loss",))
    pairs = []
    for r in g:
        ctrl = [c for c in g if str(c["source"]) == f"gaussian_d{r['dim']}"]
        if not str(r["source"]).startswith("gaussian") and ctrl:
            pairs.append((r, ctrl[0]))
    if not pairs:
        return claim, INCONCLUSIVE, "no model with its Gaussian"
    flagged = [str(x["source"]) for p in pairs for x in p if x["flagged"]]
    nums = "; ".join(f"{r['source']} {r['normalized_loss']:.3g} vs Gaussian d={r['dim']} {c['normalized_loss']:.3g}"
                     for r, c in pairs) + f". Our models are MiniLM and SmolLM2. {PAPER_MODELS_NOTE}"
    return claim, _verdict(all(r["normalized_loss"] < c["normalized_loss"] for r, c in pairs), flagged), \
        nums + _flag_note(flagged)


def _seeds(pts: list[dict]) -> str:
    lo, hi = min(r["n_seeds"] for r in pts), max(r["n_seeds"] for r in pts)
    return f"{lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"{lo}–{hi} seeds"


def planned_layers(model: str) -> list[int]:
    """The hidden states the paper-scale grid trains for `model` (a shape needs its whole curve)."""
    if model not in LAYER_MODELS:
        return []
    return list(range(0, LAYER_MODELS[model] + 1, LAYER_STRIDE["paper"][model]))


def claim_layers(rows: list[dict]) -> list[tuple[str, str, str]]:
    claim = "Fig. 3: sparsest at the embedding output and the last layer, least sparse in the middle"
    if not rows:
        return [(claim, INCONCLUSIVE, "not run at the paper's scale")]
    out = []
    g = layer_groups(rows)
    for (model, prep, mult), pts in layer_curves(g):
        name = f"{claim} — {model} ({prep}, {mult}d)"
        missing = sorted(set(planned_layers(model)) - {int(r["layer"]) for r in pts})
        have = ", ".join(f"{r['layer']}: {r['normalized_loss']:.3g}" for r in pts)
        if missing:
            out.append((name, INCONCLUSIVE,
                        f"the curve is incomplete: hidden states {', '.join(map(str, missing))} not run (have {have})."))
            continue
        if len(pts) < 3:
            out.append((name, INCONCLUSIVE, f"fewer than 3 hidden states (have {have})."))
            continue
        mid = pts[1:-1]
        top = max(mid, key=lambda r: r["normalized_loss"])
        peak = top["normalized_loss"]
        ok = pts[0]["normalized_loss"] < peak and pts[-1]["normalized_loss"] < peak
        # a point whose every seed collapsed (most features dead: e.g. a massive activation taking the whole
        # dictionary) is not a sparsity measurement: the curve's verdict waits for the remedy curve
        flagged = [f"layer {r['layer']}" + (" (collapsed)" if all_collapsed(r) else "")
                   for r in pts if r["flagged"] or all_collapsed(r)]
        out.append((name, _verdict(ok, flagged),
                    f"first {pts[0]['normalized_loss']:.3g}, middle peak {peak:.3g} (hidden state {top['layer']} of "
                    f"{pts[-1]['layer']}), last {pts[-1]['normalized_loss']:.3g} "
                    f"({_seeds(pts)} a point)."
                    + _flag_note(flagged)))
    return out


def claim_dict_size(rows: list[dict]) -> list[tuple[str, str, str]]:
    claim = "§3: the metric is robust to the dictionary size (misspecification)"
    if not rows:
        return [(claim, INCONCLUSIVE, "not run at the paper's scale")]
    g = dict_size_groups(rows)
    out = []
    for lab in sorted({r["label"] for r in g}):
        pts = {r["dict_mult"]: r for r in g if r["label"] == lab}
        big = [pts[m] for m in sorted(pts) if m >= 4]
        if len(big) < 2:
            out.append((f"{claim} — {lab}", INCONCLUSIVE, "fewer than two sizes from 4d"))
            continue
        v = [r["normalized_loss"] for r in big]
        spread = max(v) / min(v)
        ok = True if spread <= ROBUST_SPREAD else False if spread > 1.5 else None
        flagged = [f"{r['dict_mult']}d" for r in big if r["flagged"]]
        nums = (", ".join(f"{r['dict_mult']}d {r['normalized_loss']:.3g}" for r in big) + f" (×{spread:.2f}; robust if "
                f"≤ {ROBUST_SPREAD}, refuted if > 1.5)" + (f"; 2d {pts[2]['normalized_loss']:.3g} (known to inflate)"
                                                            if 2 in pts else "") + ".")
        out.append((f"{claim} — {lab}", _verdict(ok, flagged), nums + _flag_note(flagged)))
    return out


def claims_section(paper: dict[str, list[dict]]) -> str:
    """The claims table from the paper-scale rows ({experiment: rows})."""
    checks = [claim_tracks(paper.get("sparsity", [])), claim_l0(paper.get("sparsity", [])),
              *claim_controls(paper.get("controls", [])), *claim_dict_size(paper.get("dict_size", [])),
              claim_embeddings(paper.get("embeddings", [])),
              *claim_layers(paper.get("layers", []) + paper.get("layers_remedy", []))]
    body = [[c, f"**{v}**", n] for c, v, n in checks]
    counts = {v: sum(1 for _, x, _ in checks if x == v) for v in (CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE)}
    return (table(["claim", "verdict", "numbers (paper scale)"], body) + "\n\n" + ", ".join(
        f"{n} {v}" for v, n in counts.items()) + ". Verdicts are computed from docs/results/paper/*.csv by "
        "`sparse_coding/experiments/claims.py` (thresholds stated there and in each row); a claim resting on a point "
        "that did not converge, whose solver hit its cap, or whose every seed collapsed, is inconclusive.")
