"""Resuming a run: `resume_checkpoint` turns `ckpt_path` into the checkpoint `trainer.fit` continues from.

Before `trainer.fit` it turns `ckpt_path` into an intact checkpoint file (`last`: the one with the
most progress in `checkpoints/`; falling back to the newest intact one when the named one is damaged)
and refuses, with one line, a checkpoint whose settings or shapes differ from the config, one trained
on other data (`check_same_data`), one that has nothing left to train, one that is not a regular file
(a FIFO would block the run forever), and a run that would replace a finished run's results
(sparse_coding.lifecycle.rundir). Checkpoints are written by sparse_coding.lifecycle.checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch

from sparse_coding.atomic import not_a_regular_file
from sparse_coding.errors import ConfigError, DataError
from sparse_coding.lifecycle.rundir import check_fresh_run, is_launching_rank, set_aside_old_checkpoints
from sparse_coding.lightning_compat import checkpoint_epochs_done


def check_regular(path: Path) -> None:
    """Refuse, with one line, a checkpoint path that is not a regular file (opening a FIFO blocks forever)."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise DataError(f"{path} {problem}: a checkpoint must be a regular file; remove it or move it away "
                        "(or give ckpt_path=FILE of another checkpoint)")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents (weights_only, tensors memory-mapped); DataError when it is not a readable checkpoint."""
    check_regular(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, not a zip, unpickling refused: all "damaged"
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters", "loops"} <= set(ckpt):
        raise DataError(f"{path}: not a checkpoint of this tool (no state_dict/hyper_parameters/loops)")
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise DataError(f"{path}: damaged or crafted checkpoint ({problem})")
    return ckpt


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


NONNEGATIVE = ("samples_seen", "epoch_count", "epoch_sum_max", "since_active_")  # buffers that count or sum
NAN_BEFORE_FIRST_BATCH = ("lams", "data_power")  # NaN until the first batch set them


def checkpoint_problem(ckpt: dict) -> Optional[str]:
    """What makes a loaded checkpoint unusable to resume from (None: nothing found): the types Lightning's
    restore relies on, an optimizer state, and finite, consistent module state (unit-norm Phi columns, lambda > 0,
    counters >= 0). Without this a crafted file is a traceback from deep inside Lightning or the solver."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("global_step", "epoch"):
        if key in ckpt and not integer(ckpt[key]):
            return f"{key}={ckpt[key]!r} is not a count"
    if not isinstance(ckpt["loops"], dict) or not isinstance(ckpt["loops"].get("fit_loop", {}), dict):
        return f"loops is a {type(ckpt['loops']).__name__}, not Lightning's loop state"
    for key in ("callbacks", "hyper_parameters", "state_dict"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            return f"{key} is a {type(ckpt[key]).__name__}, not a dict"
    states = ckpt.get("optimizer_states")
    if not isinstance(states, list) or not states or not all(
            isinstance(o, dict) and {"state", "param_groups"} <= set(o) for o in states):
        return "no optimizer state (a weights-only checkpoint cannot resume training)"
    lam_history, history = ckpt.get("lam_history", []), ckpt.get("history", [])
    if not isinstance(lam_history, list) or not all(
            isinstance(h, list) and all(_number(v) and v > 0 for v in h) for h in lam_history):
        return "lam_history is not a list of positive lambdas per dictionary"
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and isinstance(h.get("dictionaries"), list) and _number(h.get("samples_seen"))
            for h in history):
        return "history is not a list of evaluation points"
    step = ckpt.get("global_step", 0)
    for key, t in ckpt["state_dict"].items():
        if not isinstance(t, torch.Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if not t.is_floating_point():
            continue
        values = t.detach()  # in its own dtype: a large Phi is not copied
        finite = torch.isfinite(values)
        if key in NAN_BEFORE_FIRST_BATCH and step == 0:
            finite |= torch.isnan(values)
        if not bool(finite.all()):
            return f"{key} holds NaN/Inf"
        if key == "lams" and bool((values[~torch.isnan(values)] <= 0).any()):
            return f"lambda {[round(float(v), 6) for v in values]} is not > 0"
        if key.startswith(NONNEGATIVE) and bool((values < 0).any()):
            return f"{key} holds negative values"
        if key.startswith("phis.") and values.ndim == 2 and values.numel():
            norms = values.float().norm(dim=0).double()
            if bool(((norms - 1).abs() > 1e-3).any()):
                return f"{key}'s columns are not unit-norm (norms {float(norms.min()):.3g} to {float(norms.max()):.3g})"
    return None


def _intact(folder: Path, skip: Optional[Path] = None) -> list[tuple[Path, dict]]:
    """The checkpoints in `folder` (but `skip`) that load, most progress first: the largest global step, then
    last*.ckpt before the top-k file of the same step, then the newest. One that is not a regular file is refused."""
    found = []
    for p in folder.glob("*.ckpt"):
        if skip is not None and p.resolve() == skip.resolve():
            continue
        check_regular(p)
        try:
            found.append((p, load_checkpoint(p)))
        except DataError:
            continue
    return sorted(found, key=lambda pc: (pc[1].get("global_step", -1), pc[0].name.startswith("last"),
                                         pc[0].stat().st_mtime), reverse=True)  # load_checkpoint: an int step


def _finished(ckpt: dict, trainer_cfg: Any) -> bool:
    epochs = checkpoint_epochs_done(ckpt)
    max_epochs, max_steps = int(trainer_cfg.max_epochs), int(trainer_cfg.max_steps)
    return (max_steps > 0 and ckpt.get("global_step", 0) >= max_steps) or (
        max_steps <= 0 and max_epochs > 0 and epochs >= max_epochs)


SETTING = {"dim": "the data width d", "grid": "(dictionary.mult, dictionary.lam)", "seed": "seed",
           "max_steps": "solver.max_steps", "tol": "solver.tol",
           "epoch_batches": "batches per epoch (data.batch_size and the training rows)",
           "lam_round_every": "batches between auto-lambda rounds (convergence.stop, convergence.eval_every, data.batch_size)",
           "eval_groups": "held-out clusters (the data)", "in_sample_groups": "in-sample clusters (the data)",
           }  # module hyper-parameter -> the config setting it comes from


def check_compatible(ckpt: dict, path: Path, module: torch.nn.Module) -> None:
    """Refuse a checkpoint whose hyper-parameters or tensor shapes differ from the module built from the config."""
    saved, wanted = ckpt["hyper_parameters"], dict(module.hparams)
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if _norm(a) != _norm(b):
            name = SETTING.get(key, f"dictionary.{key}")
            raise ConfigError(f"{path} was trained with {name}={_norm(a)!r}, this config gives {_norm(b)!r}: "
                              "resume with the same settings, or start a new run (another hydra.run.dir)")
    state = module.state_dict()
    for key in sorted(set(state) | set(ckpt["state_dict"])):
        a = tuple(ckpt["state_dict"][key].shape) if key in ckpt["state_dict"] else None
        b = tuple(state[key].shape) if key in state else None
        if a != b:
            raise ConfigError(f"{path} holds {key} of shape {a}, this config builds {b}: resume with the same data "
                              "and dictionary settings, or start a new run (another hydra.run.dir)")
    lam_history = ckpt.get("lam_history")
    if isinstance(lam_history, list) and hasattr(module, "grid") and len(lam_history) != len(module.grid):
        raise DataError(f"{path}: damaged or crafted checkpoint (lam_history holds {len(lam_history)} dictionaries, "
                        f"the run trains {len(module.grid)})")
    check_optimizer_state(ckpt, path, module)


def check_optimizer_state(ckpt: dict, path: Path, module: torch.nn.Module) -> None:
    """The checkpoint's optimizer state is one the module's optimizer can go on from: the same number of parameter
    groups and parameters, and per parameter the state keys and tensor shapes that one step of that optimizer
    makes, all finite (else Lightning's restore or the first step fails with a traceback)."""
    if not hasattr(module, "configure_optimizers") or not hasattr(module, "phis"):
        return
    made = module.configure_optimizers()
    params = [torch.nn.Parameter(p.detach().clone()) for p in module.phis]
    reference = type(made)(params, **made.defaults)
    for q in params:
        q.grad = torch.zeros_like(q)
    reference.step()
    want = reference.state_dict()
    saved = ckpt["optimizer_states"][0]

    def refuse(what: str) -> DataError:
        return DataError(f"{path}: damaged or crafted checkpoint (optimizer state: {what}); resume from another "
                         "checkpoint (ckpt_path=FILE) or start a new run")
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(want["param_groups"]) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise refuse(f"{len(groups) if isinstance(groups, list) else groups!r} parameter groups, the optimizer has "
                     f"{len(want['param_groups'])}")
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(params):
        raise refuse(f"{len(ids)} parameters, the dictionaries have {len(params)}")
    state = saved.get("state")
    if not isinstance(state, dict):
        raise refuse("no per-parameter state")
    ref_state = want["state"]
    for n, i in enumerate(ids):
        if i not in state:
            if ref_state.get(n):  # this optimizer keeps state per parameter after a step
                raise refuse(f"no state for parameter {n}")
            continue
        got, ref = state[i], ref_state.get(n, {})
        if not isinstance(got, dict) or set(got) != set(ref):
            raise refuse(f"parameter {n} holds {sorted(got) if isinstance(got, dict) else type(got).__name__}, "
                         f"{type(made).__name__} keeps {sorted(ref)}")
        for key, value in got.items():
            r = ref[key]
            if isinstance(r, torch.Tensor):
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(r.shape):
                    raise refuse(f"{key} of parameter {n} is not a tensor of shape {tuple(r.shape)}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise refuse(f"{key} of parameter {n} holds NaN/Inf")


def saved_data_identity(ckpt: dict) -> Optional[dict]:
    """The data identity a checkpoint recorded (the data module's state_dict, stored under its class name), or
    None for a checkpoint written before it was recorded."""
    for value in ckpt.values():
        if isinstance(value, dict) and isinstance(value.get("data_identity"), dict):
            return value["data_identity"]
    return None


def check_same_data(ckpt: dict, path: Path, data: Any) -> None:
    """Refuse, with one line naming what differs, a checkpoint trained on other data than the config's (another
    generator setting, another cache or a cache swapped under the same path, another layer or preprocessing)."""
    if data is None or not hasattr(data, "identity"):
        return
    saved, wanted = saved_data_identity(ckpt), data.identity()
    if saved is None:
        print(f"[resume] {path} does not record which data it was trained on (an older checkpoint): the data "
              "cannot be checked", file=sys.stderr)
        return
    differ = [k for k in sorted(set(saved) | set(wanted)) if not k.startswith("_") and saved.get(k) != wanted.get(k)]
    if not differ:
        return
    def show(ident: dict, key: str) -> str:
        value = ident.get(key, "(none)")
        if key in ("cache content", "cache build") and ident.get("_data.path"):
            return f"{value} at {ident['_data.path']}"
        return repr(value) if isinstance(value, str) else str(value)
    what = "; ".join(f"{k}: {show(saved, k)} there, {show(wanted, k)} here" for k in differ[:4])
    more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
    raise ConfigError(f"{path} was trained on other data ({what}{more}): resume with the same data, or start a new "
                      "run (another hydra.run.dir)")


def _norm(v: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint may hold either)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def resume_checkpoint(ckpt_path: Optional[str], out_dir: Path, module: torch.nn.Module, trainer_cfg: Any,
                      data: Any = None) -> Optional[str]:
    """The checkpoint file `trainer.fit` should resume from (None: start fresh); see the module docstring.
    `data`: the run's data module, whose identity must match the checkpoint's (`check_same_data`)."""
    if is_launching_rank():
        check_fresh_run(out_dir, ckpt_path)  # a finished run's results are never replaced by a fresh run
    if ckpt_path is None:
        if is_launching_rank():
            set_aside_old_checkpoints(out_dir)
        return None
    folder = out_dir / "checkpoints"
    if str(ckpt_path) == "last":
        path = folder / "last.ckpt"
        if not path.exists() and not path.is_symlink() and not any(folder.glob("*.ckpt")):
            print(f"[resume] no checkpoint in {folder}: starting from the beginning", file=sys.stderr)
            return None
        if path.exists() or path.is_symlink():
            check_regular(path)
        ranked = _intact(folder)  # the most progress first: a moved or copied run may have left last-v1.ckpt
        if not ranked:
            why = "is missing"
            if path.exists():
                try:
                    load_checkpoint(path)
                except DataError as e:
                    why = f"is unusable ({str(e).removeprefix(f'{path}: ')})"
            raise DataError(f"{path} {why} and there is no other intact checkpoint in {folder}: "
                            "start a new run (without ckpt_path, or in another directory)")
        newest, ckpt = ranked[0]
        if newest.resolve() != path.resolve():
            loaded = {p.resolve() for p, _ in ranked}
            why = "is missing" if not path.exists() else "is damaged" if path.resolve() not in loaded else \
                "holds less progress"
            print(f"[resume] {path} {why}; resuming from {newest} (global step {ckpt.get('global_step')}) instead",
                  file=sys.stderr)
            path = newest
    else:
        path = Path(str(ckpt_path)).expanduser()
        problem = not_a_regular_file(path)
        if problem is not None:
            raise ConfigError(f"ckpt_path={ckpt_path!r} {problem}: give a checkpoint file or ckpt_path=last")
        folder = path.parent
        try:
            ckpt = load_checkpoint(path)
        except DataError as e:
            fallback = _intact(folder, path)
            if not fallback:
                raise DataError(f"{e}; no other intact checkpoint in {folder}: start a new run") from None
            print(f"[resume] {path} is damaged ({e}); resuming from {fallback[0][0]} instead", file=sys.stderr)
            path, ckpt = fallback[0]
    check_same_data(ckpt, path, data)  # first: a data setting also changes derived hyper-parameters (epoch_batches)
    check_compatible(ckpt, path, module)
    own_run = path.resolve().parent.parent == out_dir.resolve()
    ended = _converged(ckpt) or _finished(ckpt, trainer_cfg)
    # A run that ended (converged or at its budget) but was stopped before it wrote metrics.json: its
    # outputs are written from the checkpoint, without training further (ConvergenceMonitor keeps the stop).
    if own_run and ended and not (out_dir / "metrics.json").exists():
        print(f"[resume] {path}: this run ended before writing its outputs; writing them from this checkpoint",
              file=sys.stderr)
        return str(path)
    # A finished checkpoint of another directory is evaluated into this one; its own run would be overwritten.
    if own_run and _converged(ckpt):
        raise ConfigError(f"{path}: this run already converged; its outputs are in {out_dir}: start a new run "
                          "without ckpt_path (or in another directory to evaluate this checkpoint again)")
    if own_run and _finished(ckpt, trainer_cfg):
        raise ConfigError(f"{path}: this run already finished (trainer.max_epochs={trainer_cfg.max_epochs}, "
                          f"trainer.max_steps={trainer_cfg.max_steps}); its outputs are in {out_dir}: raise "
                          "trainer.max_epochs to train longer, or start a new run without ckpt_path")
    return str(path)


def _converged(ckpt: dict) -> bool:
    """The checkpoint was taken after the convergence monitor stopped the fit (sparse_coding.convergence)."""
    return any("ConvergenceMonitor" in str(key) and isinstance(state, dict) and state.get("stopped_by") == "converged"
               for key, state in (ckpt.get("callbacks") or {}).items())
