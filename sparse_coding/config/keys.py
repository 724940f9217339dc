"""The names a run config may hold: the schema's keys, every argument of the installed Trainer under
`trainer.*`, and for a name it lacks one line naming the closest valid key (`closest_key`).

Used before Hydra composes (sparse_coding.config.overrides) and on the composed config
(sparse_coding.config.checks). Cheap: the installed Trainer's signature is read from its source with
`ast`, only when a name beyond the schema is looked up; no torch, no Lightning.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import typing
from pathlib import Path
from typing import Any, Optional

from sparse_coding.config.schema import RunConfig
from sparse_coding.errors import ConfigError

# Trainer arguments the run sets itself, and where the setting lives instead
RUN_OWNED = {
    "logger": "choose it with logger=wandb|csv|none",
    "callbacks": "add a callback under callbacks.NAME (conf/callbacks/)",
    "default_root_dir": "the run directory is out_dir (or hydra.run.dir)",
    "val_check_interval": "the held-out evaluation cadence is convergence.eval_every (training samples)",
    "check_val_every_n_epoch": "the held-out evaluation cadence is convergence.eval_every (training samples)",
    "max_time": "the time budget is convergence.max_minutes",
    "num_sanity_val_steps": "every held-out evaluation is a measurement, so the run does no sanity check",
    "use_distributed_sampler": "the data modules split every global batch across ranks themselves",
    "accumulate_grad_batches": "the module steps its optimizer itself (manual optimization): raise data.batch_size",
}
RUN_TRAINER_KEYS = ("checkpoint_every_n_steps",)  # trainer.* settings of the run that are not Trainer arguments


@functools.lru_cache(maxsize=None)
def trainer_arguments() -> frozenset:
    """The keyword arguments of the installed `pytorch_lightning.Trainer`.

    Read from its source with `ast` (~15 ms; importing Lightning costs seconds), falling back to the
    imported signature when the source cannot be read.
    """
    try:
        package = importlib.util.find_spec("pytorch_lightning")
        source = Path(list(package.submodule_search_locations)[0]) / "trainer" / "trainer.py"
        tree = ast.parse(source.read_text())
        init = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Trainer"
                    for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        return frozenset(a.arg for a in init.args.args[1:] + init.args.kwonlyargs)
    except (AttributeError, OSError, StopIteration, SyntaxError, TypeError, ValueError):
        import inspect

        import pytorch_lightning

        return frozenset(p for p in inspect.signature(pytorch_lightning.Trainer.__init__).parameters if p != "self")


def config_groups() -> list[str]:
    """The config groups of conf/ (data, model, trainer, callbacks, experiment, …)."""
    from sparse_coding.paths import config_dir

    root = config_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def dataclass_in(hint: Any) -> Optional[type]:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):  # Optional[X]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _sections(schema: type, prefix: str = "") -> dict[str, type]:
    """Every section of the run config ('' the top, 'data', …) and its dataclass."""
    out = {prefix.rstrip("."): schema}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = dataclass_in(hints.get(f.name))
        if sub is not None:
            out.update(_sections(sub, f"{prefix}{f.name}."))
    return out


def _section_keys(section: str) -> Optional[list[str]]:
    """The keys a section has (None: not a section); under `trainer` also every Trainer argument."""
    schema = _sections(RunConfig).get(section)
    if schema is None:
        return None
    keys = [f.name for f in dataclasses.fields(schema)]
    if section == "trainer":
        keys += sorted(trainer_arguments() - set(keys))
    return keys


def closest_key(key: str) -> Optional[str]:
    """The valid key a misspelled one most likely meant: its section's name corrected (`dictonary.mult`), the
    same name in another section (`data.lam` -> `dictionary.lam`), a close name in its section
    (`dictionary.mutl` -> `dictionary.mult`), else the closest dotted key of the whole config."""
    sections = _sections(RunConfig)
    section, _, leaf = key.rpartition(".")
    if section not in sections:
        fixed = difflib.get_close_matches(section, [s for s in sections if s], n=1, cutoff=0.6)
        if not fixed:
            return None
        if leaf in (_section_keys(fixed[0]) or []):
            return f"{fixed[0]}.{leaf}"
        section = fixed[0]
    everywhere = [f"{s}.{k}" if s else k for s in sections for k in _section_keys(s) or []]
    same = [k for k in everywhere if k.rpartition(".")[2] == leaf and k != key]
    if same:
        return same[0]
    within = (_section_keys(section) or []) + (config_groups() if section == "" else [])
    match = difflib.get_close_matches(leaf, within, n=1, cutoff=0.6)
    if match:
        return f"{section}.{match[0]}" if section else match[0]
    match = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
    return match[0] if match else None


def unknown_key_message(key: str) -> str:
    """One line for a setting the run config does not have, naming the closest valid one."""
    guess = closest_key(key)
    if guess:
        return f"unknown setting {key}: did you mean {guess}?"
    section = key.rpartition(".")[0]
    known = _section_keys(section)
    if known is None:
        return f"unknown setting {key}: the run config has no such key (`python train.py --cfg job` lists them)"
    if section == "trainer":
        listed = f"{', '.join(f.name for f in dataclasses.fields(_sections(RunConfig)['trainer']))} and every " \
                 "argument of pytorch_lightning.Trainer"
    else:
        listed = ", ".join(known)
    return f"unknown setting {key}: {section or 'the run config'} has no such key (it has: {listed})"


def check_known_keys(cfg: Any, schema: type = RunConfig, prefix: str = "") -> None:
    """Every key of a composed config is a field of its dataclass schema, recursively (under `trainer`
    also any argument of the installed Trainer; checks.check_trainer checks their use).

    Hydra's `+key=value` adds keys even to a typed (struct) config; without this check such a setting
    would be silently ignored (`+dictionary.mutl=4`).
    """
    if dataclasses.is_dataclass(cfg) or not hasattr(cfg, "keys"):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in fields and not (prefix == "trainer." and key in trainer_arguments()):
            raise ConfigError(unknown_key_message(f"{prefix}{key}"))
    hints = typing.get_type_hints(schema)
    for name in fields:
        sub = dataclass_in(hints.get(name))
        value = cfg.get(name) if hasattr(cfg, "get") else None
        if sub is not None and value is not None:
            check_known_keys(value, sub, f"{prefix}{name}.")
