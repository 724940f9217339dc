"""Checks beyond the paper, on dictionaries the experiments trained.

- `solver_gap`: on a subset of held-out samples, the greedy code against the exact non-negative
  lasso optimum for the same Phi and lam (`sparse_coding.exact_lasso`: batched accelerated projected
  gradient in float64 with exact solves on each support, certified by its KKT violation <= 1e-3 lam;
  tested against scikit-learn's `Lasso(positive=True)`): the objective ratio and S1,
  normalized_loss, l0 and fvu under each code (docs/method.md §2.5).
- `functional_check`: the model's behaviour when one hidden state is replaced by its dictionary
  reconstruction Phi alpha (+ the cache mean that centring removed), against the clean model and
  zero- and mean-ablation of the same hidden state, on held-out text: SmolLM2's next-token loss, MiniLM's
  sentence embedding (1 - cos to the clean one, and whether it still retrieves its own context).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sparse_coding.experiments.grid import LAYER_MODELS, SEEDS, Point
from sparse_coding.experiments.runner import DEFAULT_ROOT, compose, points_of, run_dir
from sparse_coding.atomic import atomic_write_bytes
from sparse_coding.config.resources import cpu_model
from sparse_coding.exact_lasso import exact_lasso
from sparse_coding.solver import DEFAULT_TOL, solve

GAP_SAMPLES = {"quick": 64, "paper": 256}
GAP_LAYERS = {"minilm": (0, 3, 6), "smollm2": (0, 15, 30)}
FUNCTIONAL_CONTEXTS = {"quick": 4, "paper": 64}
FUNCTIONAL_MODELS = ("smollm2", "minilm")
# a subset of SmolLM2's hidden states (a forward pass is slow on a shared CPU); paper: every third, as trained;
# a model not named here: every hidden state
FUNCTIONAL_LAYERS = {"quick": {"smollm2": (0, 6, 12, 18, 24, 30)},
                     "paper": {"smollm2": (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30)}}


def load_dictionaries(out: Path) -> tuple[dict, list[tuple[str, torch.Tensor, float, int]]]:
    """The run's resolved config and [(label, phi, lam, dict_mult)] from its dictionary files."""
    from safetensors.torch import load_file

    meta = json.loads((out / "dictionary.json").read_text())
    tensors = load_file(str(out / "dictionary.safetensors"))
    return meta["config"], [(d["tensor"], tensors[d["tensor"]], float(d["lam"]), int(d["dict_mult"]))
                            for d in meta["dictionaries"]]


def held_out_rows(config: dict, n: int) -> torch.Tensor:
    """The first n held-out rows the run evaluated on (same generator or cache split, centred)."""
    from sparse_coding.config.plan import resolve
    from sparse_coding.run import build_datamodule

    cfg = OmegaConf.create(config)
    dm = build_datamodule(cfg, resolve(cfg))
    if hasattr(dm, "setup"):
        dm.setup("validate")
    rows = []
    for batch, _clusters in dm.val_dataloader():
        rows.append(batch)
        if sum(r.shape[0] for r in rows) >= n:
            break
    return torch.cat(rows)[:n].float()


KKT_TOL = 1e-3  # the exact solution counts as converged when its KKT violation is <= KKT_TOL * lam


def code_metrics(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, lam: float) -> dict:
    """The metrics of docs/method.md §5 of one code alpha (float64 sums over these rows)."""
    x, phi, alpha = x.double(), phi.double(), alpha.double()
    resid = (x - alpha @ phi.T).pow(2).sum(1)
    l1 = alpha.sum(1)
    mean_max = float(alpha.max(1).values.mean())
    loss = float((resid + lam * l1).mean())
    return {"loss": loss, "normalized_loss": loss / (lam * mean_max) if mean_max > 0 else math.nan,
            "avg_coef_norm": float(l1.mean()) / mean_max if mean_max > 0 else math.nan,
            "l0": float((alpha > 0).sum(1).double().mean()),
            "fvu": float(resid.sum() / (x - x.mean(0)).pow(2).sum())}


def lasso_gap(x: torch.Tensor, phi: torch.Tensor, lam: float, max_steps: int, tol: float = DEFAULT_TOL) -> dict:
    """Greedy vs exact non-negative lasso on the same rows, same Phi and lam: objective and the metrics."""
    greedy = solve(x, phi, lam, max_steps, tol=tol)
    a, kkt_rows = exact_lasso(x, phi, lam, tol=KKT_TOL)
    kkt = float(kkt_rows.max())
    g, e = code_metrics(x, phi, greedy.alpha, lam), code_metrics(x, phi, a, lam)
    return {
        "greedy_objective": g["loss"],
        "lasso_objective": e["loss"],
        "gap_ratio": g["loss"] / e["loss"],
        **{f"greedy_{k}": g[k] for k in ("normalized_loss", "avg_coef_norm", "l0", "fvu")},
        **{f"lasso_{k}": e[k] for k in ("normalized_loss", "avg_coef_norm", "l0", "fvu")},
        "kkt_violation_over_lam": kkt,
        "lasso_converged": kkt <= KKT_TOL,
        "greedy_capped_fraction": float(greedy.capped.double().mean()),
    }


def gap_points(scale: str, extra: list[str] | None = None) -> list[Point]:
    """Seed-0 points of every experiment (layers: a few per model); the issue's cases (synthetic, the
    controls, real layers) first, so that a campaign cut short has them."""
    pts = []
    for name in ("sparsity", "controls", "layers", "embeddings", "dict_size", "layers_remedy"):
        for p in points_of(name, scale, extra):
            if p.seed != SEEDS[0]:
                continue
            if name in ("layers", "layers_remedy") and p.x["layer"] not in GAP_LAYERS[p.x["model"]]:
                continue
            pts.append(p)
    return pts


def solver_gap(scale: str, root: Path = DEFAULT_ROOT, log=print, extra: list[str] | None = None) -> list[dict]:
    """One row per dictionary of each finished gap point; each run's rows are kept in its directory
    (solver_gap.json), so a campaign cut short resumes where it stopped."""
    rows = []
    seen = set()
    for p in gap_points(scale, extra):
        out = run_dir(root, scale, p)
        if not (out / "metrics.json").is_file() or (p.experiment, out) in seen:  # finished runs only
            continue
        seen.add((p.experiment, out))
        converged = json.loads((out / "metrics.json").read_text()).get("converged")  # the dictionary's, not the lasso's
        for r in _gap_of_run(out, GAP_SAMPLES[scale], log):
            rows.append({"experiment": p.experiment, "scale": scale, **p.x, **r, "converged": converged, "run": out.name})
    return rows


def _gap_of_run(out: Path, samples: int, log) -> list[dict]:
    done = out / "solver_gap.json"
    dictionary = (out / "dictionary.safetensors").stat()
    key = {"samples": samples, "kkt_tol": KKT_TOL, "dictionary": [dictionary.st_size, dictionary.st_mtime_ns]}
    try:
        saved = json.loads(done.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved["rows"]
    except (OSError, ValueError, KeyError):
        pass  # absent, unreadable or another dictionary's: compute afresh
    config, dictionaries = load_dictionaries(out)
    x = held_out_rows(config, samples)
    cpu = cpu_model()
    rows = []
    for label, phi, lam, mult in dictionaries:
        t0 = time.perf_counter()
        r = lasso_gap(x, phi.float(), lam, int(config["solver"]["max_steps"]),
                      float(config["solver"].get("tol", DEFAULT_TOL)))
        rows.append({"dict_mult": mult, "lam": lam, "samples": x.shape[0], **r,
                     "seconds": time.perf_counter() - t0, "cpu": cpu})
        log(f"[solver_gap] {out.name} mult={mult}: greedy/exact = {r['gap_ratio']:.4f}, normalized_loss "
            f"{r['greedy_normalized_loss']:.3g} / {r['lasso_normalized_loss']:.3g}, KKT/lam "
            f"{r['kkt_violation_over_lam']:.1e}, {rows[-1]['seconds']:.0f} s")
    atomic_write_bytes(done, json.dumps({**key, "rows": rows}, indent=1).encode())
    return rows


# --------------------------------------------------------------------------------------------
# Functional check: the reconstruction spliced into the model (docs/method.md §10)


def _layer_modules(model):
    """(the module whose output is hidden_states[0], the blocks, the final norm or None) of a Llama-style decoder
    (SmolLM2) or a BERT-style encoder (MiniLM)."""
    if hasattr(model, "embed_tokens") and hasattr(model, "layers"):
        return model.embed_tokens, model.layers, getattr(model, "norm", None)
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):
        return model.embeddings, model.encoder.layer, None
    raise ValueError(f"the functional check knows Llama- and BERT-style models, not {type(model).__name__}")


def _hook_target(model, k: int, num_layers: int):
    """Candidate modules whose output is hidden_states[k] (checked against the model's own output)."""
    embed, blocks, norm = _layer_modules(model)
    if k == 0:
        return [embed]
    if k < num_layers or norm is None:
        return [blocks[k - 1]]
    return [norm, blocks[k - 1]]


def _output_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _with_output(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def is_decoder(model) -> bool:
    """A decoder's behaviour is its next-token prediction; an encoder's (MiniLM) its sentence embedding."""
    return hasattr(model, "embed_tokens")


def next_token_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy; the LM head is tied to the input embedding (SmolLM2)."""
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        logits = h[:, :-1] @ model.embed_tokens.weight.T
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                       ids[:, 1:].reshape(-1)))


def sentence_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the last hidden state over the tokens, unit norm
    (its sentence-transformers pipeline: Transformer, mean Pooling, Normalize)."""
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
        return torch.nn.functional.normalize(h.mean(1), dim=1)


def embedding_distance(model, ids: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    """(mean 1 - cos between each context's embedding and its clean one, the share of contexts whose embedding
    is nearer its own clean embedding than any other context's: retrieval top-1)."""
    e = sentence_embeddings(model, ids)
    sims = e @ clean.T
    own = sims.diagonal()
    # cos <= 1: a value above it is float rounding (the clean model against itself), not a negative distance
    return float((1 - own).clamp_min(0).mean()), float((sims.argmax(1) == torch.arange(len(e))).double().mean())


def held_out_contexts(cfg, tokenizer, n_ctx: int) -> tuple[torch.Tensor, np.ndarray]:
    """n_ctx contexts of the corpus that come after the ones in the activation cache (never trained on)."""
    from sparse_coding import corpus as corpus_mod

    corpus = OmegaConf.to_container(cfg.corpus, resolve=True)
    base = corpus_mod.build_contexts(OmegaConf.create(corpus), tokenizer)
    cached = base.input_ids.shape[0]
    corpus["max_tokens"] = int(corpus["max_tokens"]) + (n_ctx + 1) * int(corpus["context_len"])
    more = corpus_mod.build_contexts(OmegaConf.create(corpus), tokenizer)
    ids = more.input_ids[cached : cached + n_ctx]
    if ids.shape[0] < n_ctx:
        raise RuntimeError(f"the corpus has only {ids.shape[0]} held-out contexts")
    return torch.as_tensor(ids), more.keep


def functional_check(scale: str, root: Path = DEFAULT_ROOT, log=print, models_to_check: tuple[str, ...] = FUNCTIONAL_MODELS,
                     layers: list[int] | None = None, extra: list[str] | None = None,
                     curve: str = "layers", contexts: int | None = None) -> list[dict]:
    """Rows for every model of `models_to_check` whose layer curve (`layers`, or `layers_remedy`) has trained seed-0
    dictionaries under `root`, measured on `contexts` held-out contexts (default: the scale's FUNCTIONAL_CONTEXTS)."""
    rows = []
    for model_name in models_to_check:
        rows += functional_check_model(scale, root, log, model_name, layers, extra, curve, contexts)
    return rows


def replaced_rows(dictionary, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Which rows x (n, d) at model-input positions `positions` (n,) the dictionary describes: all of them, or under
    the remedy (docs/method.md §7.6) those at position >= drop_positions whose norm is at most max_norm_ratio x the
    median row norm of the run's cache layer. The others are left as the clean model computed them."""
    keep = positions >= dictionary.drop_positions
    if dictionary.max_norm_ratio > 0 and dictionary.median_row_norm is not None:
        keep &= x.norm(dim=1) <= dictionary.max_norm_ratio * dictionary.median_row_norm
    return keep


def functional_check_model(scale: str, root: Path, log, model_name: str, layers: list[int] | None = None,
                           extra: list[str] | None = None, curve: str = "layers",
                           contexts: int | None = None) -> list[dict]:
    from sparse_coding import models
    from sparse_coding.dictionary import SparseDictionary

    if layers is None:
        layers = FUNCTIONAL_LAYERS[scale].get(model_name, range(LAYER_MODELS[model_name] + 1))
    # the layer curve's own points (its dictionary size and other overrides), seed 0, so the run directories match
    trained = {p.x["layer"]: p for p in points_of(curve, scale, extra)
               if p.x["model"] == model_name and p.seed == SEEDS[0]}
    if not trained:
        log(f"[functional] {model_name}: the {curve} curve has no points at scale {scale}; skipped")
        return []
    found = {k: run_dir(root, scale, trained[k]) for k in layers
             if k in trained and (run_dir(root, scale, trained[k]) / "dictionary.json").is_file()}
    for k in layers:
        if k not in found:
            log(f"[functional] {model_name} layer {k}: no trained seed-0 dictionary of the {curve} curve under "
                f"{root}; skipped")
    if not found:
        return []  # the model is not even loaded
    cfg = compose(next(iter(trained.values())).all_overrides(scale))
    model, tokenizer, info = models.load_model(cfg.model)
    num_layers = info["num_layers"]
    decoder = is_decoder(model)
    n_ctx = FUNCTIONAL_CONTEXTS[scale] if contexts is None else contexts
    if n_ctx < 2:
        raise ValueError(f"the functional check needs at least 2 held-out contexts (got {n_ctx}): retrieval top-1 "
                         "compares each context's embedding with the others'")
    ids, keep = held_out_contexts(cfg, tokenizer, n_ctx)
    keep_t = torch.as_tensor(keep)
    # the model-input position of every cached row of a context, tiled over the contexts
    positions = torch.as_tensor(np.flatnonzero(keep)).repeat(ids.shape[0])
    clean_embedding = None if decoder else sentence_embeddings(model, ids)

    def behaviour() -> tuple[float, float | None]:
        """(the measure: next-token loss, or sentence-embedding distance to the clean embedding; retrieval top-1)"""
        return (next_token_loss(model, ids), None) if decoder else embedding_distance(model, ids, clean_embedding)

    clean, _ = behaviour()
    measure = "next-token loss (nats)" if decoder else "1 - cos(sentence embedding, clean)"
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    log(f"[functional] {model_name}: clean {measure} {clean:.4f} on {ids.numel()} held-out tokens")
    cpu = cpu_model()
    rows = []
    for k, out in found.items():
        # the run's own dictionary, λ, solver settings and preprocessing: the path every user of a run takes
        dictionary = SparseDictionary.load(out)
        if dictionary.normalize != "none":
            log(f"[functional] {model_name} layer {k}: a dictionary of normalised rows (data.normalize="
                f"{dictionary.normalize}) does not reconstruct activations; skipped")
            continue
        # which module's output is hidden_states[k]: the first candidate that reproduces it
        target, captured = None, {}
        for cand in _hook_target(model, k, num_layers):
            handle = cand.register_forward_hook(lambda mod, inp, o: captured.__setitem__("h", _output_tensor(o)))
            with torch.inference_mode():
                model(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]))
            handle.remove()
            if torch.allclose(captured["h"], hidden[k][:1], atol=1e-4, rtol=1e-4):
                target = cand
                break
        if target is None:
            raise RuntimeError(f"no module output matches hidden_states[{k}] of {model_name}")
        stats = {}

        def replace(mod, inp, o, how):
            h = _output_tensor(o)
            x = h[:, keep_t].reshape(-1, h.shape[-1]).float()
            sel = replaced_rows(dictionary, x, positions)
            xs = x[sel]
            if how == "zero":
                new_rows = torch.zeros_like(xs)
            elif how == "mean":  # the run's centring mean (or these rows' mean when it did not centre)
                mean = dictionary.mean if dictionary.mean is not None else xs.mean(0)
                new_rows = mean.float().expand_as(xs)
            else:
                alpha = dictionary.encode(xs)
                new_rows = dictionary.decode(alpha).float()
                xc = dictionary.preprocess(xs).float()
                stats["fvu"] = float((xs - new_rows).pow(2).sum() / (xc - xc.mean(0)).pow(2).sum())
                stats["l0"] = float((alpha > 0).sum(1).double().mean())
                stats["replaced"] = float(sel.double().mean())
            new_x = x.clone()
            new_x[sel] = new_rows
            h2 = h.clone()
            h2[:, keep_t] = new_x.reshape(h.shape[0], -1, h.shape[-1]).to(h.dtype)
            return _with_output(o, h2)

        measured = {}
        for how in ("reconstruction", "zero", "mean"):
            handle = target.register_forward_hook(lambda mod, inp, o, how=how: replace(mod, inp, o, how))
            try:
                measured[how] = behaviour()
            finally:
                handle.remove()
        losses = {how: m[0] for how, m in measured.items()}
        metrics = json.loads((out / "metrics.json").read_text())
        gap = losses["zero"] - clean
        row = {
            "experiment": "functional", "scale": scale, "model": model_name,
            "preprocess": "remedy" if curve == "layers_remedy" else "raw", "layer": k,
            "dict_mult": dictionary.dict_mult, "lam": dictionary.lam,
            "measure": measure, "tokens": int(ids.numel()), "replaced_share": stats.get("replaced"),
            "clean_loss": clean, "reconstruction_loss": losses["reconstruction"],
            "zero_ablation_loss": losses["zero"], "loss_increase": losses["reconstruction"] - clean,
            "fraction_recovered": (losses["zero"] - losses["reconstruction"]) / gap if gap > 0 else math.nan,
            "mean_ablation_loss": losses["mean"],
            "fraction_recovered_vs_mean": ((losses["mean"] - losses["reconstruction"]) / (losses["mean"] - clean)
                                           if losses["mean"] > clean else math.nan),
            "retrieval_top1": measured["reconstruction"][1], "retrieval_top1_mean_ablated": measured["mean"][1],
            "heldout_fvu": stats.get("fvu"), "heldout_l0": stats.get("l0"),
            "normalized_loss": metrics["normalized_loss"], "avg_coef_norm": metrics["avg_coef_norm"],
            "converged": metrics.get("converged"), "hook": type(target).__name__, "run": out.name,
            "cpu": cpu,
        }
        log(f"[functional] {model_name} layer {k}: +{row['loss_increase']:.4f}, recovered {row['fraction_recovered']:.3f} "
            f"(vs mean {row['fraction_recovered_vs_mean']:.3f}), {row['replaced_share']:.1%} of positions replaced")
        rows.append(row)
    return rows
