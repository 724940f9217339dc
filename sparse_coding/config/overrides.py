"""Hydra override strings checked before Hydra composes them (`python train.py ...`, `measure([...])`).

Hydra refuses a key its typed config lacks with several lines and a hint to add it with `+`, which the
check of the composed config (sparse_coding.config.keys) then refuses too; a value of the wrong type is
a stack of lines. Here each override is read with Hydra's own parser and checked against the run's
schema first, so every such mistake is one line (exit 2 / `ConfigError`) naming the closest valid key.
Cheap: Hydra's parser (which Hydra loads anyway) and small dataclasses, no torch or Lightning.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Optional, Sequence

from sparse_coding.config.keys import config_groups, dataclass_in, trainer_arguments, unknown_key_message
from sparse_coding.config.schema import SYNTHETIC_FIELDS, RunConfig
from sparse_coding.errors import ConfigError


def _group_options(group: str) -> list[str]:
    from sparse_coding.paths import config_dir

    stored = {"data": ["data_schema", "cache_data_schema"]}.get(group, [f"{group}_schema"])  # register_configs
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml")) + stored


@functools.lru_cache(maxsize=None)
def _default_choices() -> dict:
    """conf/train.yaml's defaults list as {group: option}."""
    import yaml

    from sparse_coding.paths import config_dir

    try:
        defaults = yaml.safe_load((config_dir() / "train.yaml").read_text()).get("defaults") or []
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}


def one_line(err: BaseException) -> str:
    """The first lines of a Hydra / OmegaConf error as one line, without their key and type listing."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith(
        ("full_key:", "object_type=", "reference_type=", "See https://hydra.cc", "Set the environment variable"))]
    return " ".join(lines[:2]) or type(err).__name__


def check_overrides(overrides: Sequence[Any]) -> list[str]:
    """Hydra override strings, checked before Hydra composes them; returns the ones to compose.

    A key no section has (`dictionary.mutl=4`, `+dictionary.mutl=4`) is one line naming the closest
    valid key (Hydra's own error is several lines and suggests the `+` form, which check_known_keys then
    refuses), and so is a value of the wrong type (`data.dim=abc`) or an option a config group
    lacks. A Trainer argument outside the schema (`trainer.gradient_clip_val=1.0`)
    and an entry under `callbacks` are passed as `++key=value`: added or changed, whichever applies.
    """
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        bad = overrides if isinstance(overrides, str) else next(o for o in overrides if not isinstance(o, str))
        raise ConfigError(f"overrides are a list of strings like ['model=minilm', 'layer=3'], not {bad!r}")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors (OverrideParseException and the lexer's)
            raise ConfigError(f"cannot read the override {text!r}: {one_line(e)} (the form is key=value)") from None
    searchpath = any(o.key_or_group == "hydra.searchpath" for o in parsed)
    data_choice = _data_choice(parsed)
    out = []
    for text, o in zip(overrides, parsed):
        key = o.key_or_group
        if not key:
            raise ConfigError(f"the override {text!r} names no setting: the form is key=value")
        if o.is_hydra_override() or o.package is not None or "/" in key:
            out.append(text)
        elif "." not in key and key in config_groups():
            _check_group_override(text, o, searchpath)
            out.append(text)
        else:
            out.append(_check_key_override(text, o, data_choice, OverrideType))
    return out


def _choices(o: Any) -> list:
    """The values of an override: one, or each of a choice sweep (`a=1,2`); none for a range sweep."""
    if not o.is_sweep_override():
        return [o.value()]
    return list(getattr(o.value(), "list", None) or [])


def _data_choice(parsed: list) -> Optional[str]:
    """The data config the overrides end with: `data=...`, a model's (cache), or the default (None: unknown)."""
    choice = _default_choices().get("data")
    for o in parsed:
        values = _choices(o) if o.key_or_group in ("data", "model", "experiment") else []
        if o.key_or_group == "data" and len(values) == 1 and isinstance(values[0], str):
            choice = values[0]
        elif o.key_or_group == "data" or o.key_or_group == "experiment":
            choice = None  # a sweep over data sets, or an experiment that may set data: not known here
        elif o.key_or_group == "model" and any(v is not None for v in values):
            choice = "cache" if all(v is not None for v in values) else None  # every model config selects data=cache
    return choice


def _check_group_override(text: str, o: Any, searchpath: bool) -> None:
    from hydra.core.override_parser.types import OverrideType

    group = o.key_or_group
    if o.type == OverrideType.CHANGE and group not in _default_choices():
        raise ConfigError(f"{text}: the {group} group is not in conf/train.yaml's defaults, so add it: +{text}")
    if o.type == OverrideType.DEL or searchpath:
        return
    options = _group_options(group)
    for value in _choices(o):
        if value is None or not isinstance(value, str) or value in options:
            continue
        match = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
        hint = f"did you mean {group}={match[0]}?" if match else \
            f"choose one of {', '.join(v for v in options if not v.endswith('_schema'))}"
        raise ConfigError(f"{group}={value}: no such {group} config in conf/{group}/; {hint}")


def _check_key_override(text: str, o: Any, data_choice: Optional[str], OverrideType: Any) -> str:
    key = o.key_or_group
    path = key.split(".")
    if path[0] == "callbacks":  # any entry: check_callbacks checks each has a _target_
        return f"++{text}" if o.type == OverrideType.CHANGE else text
    schema = RunConfig
    hints = typing.get_type_hints(schema)
    for depth, part in enumerate(path[:-1]):
        names = {f.name for f in dataclasses.fields(schema)}
        if part not in names:
            raise ConfigError(unknown_key_message(key))
        sub = dataclass_in(hints.get(part))
        if sub is None:
            raise ConfigError(f"{'.'.join(path[:depth + 1])} is a value, not a section: {text} sets nothing")
        schema, hints = sub, typing.get_type_hints(sub)
    leaf, section = path[-1], ".".join(path[:-1])
    names = {f.name for f in dataclasses.fields(schema)}
    if leaf not in names:
        if section == "trainer" and leaf in trainer_arguments():
            return f"++{text}" if o.type == OverrideType.CHANGE else text  # a Trainer argument no config file sets
        raise ConfigError(unknown_key_message(key))
    if section == "data" and leaf in SYNTHETIC_FIELDS and data_choice == "cache" and o.type != OverrideType.DEL:
        raise ConfigError(f"{key} does not apply to data=cache (real activations, a model's or a cache's): remove it")
    if o.type == OverrideType.CHANGE:
        for value in _choices(o):
            _check_value(schema, key, leaf, value)
    return text


def _check_value(schema: type, key: str, leaf: str, value: Any) -> None:
    """The value converts to the field's type, as OmegaConf will convert it when Hydra composes."""
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: resolved later
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.update(OmegaConf.structured(schema), leaf, value, merge=True)
    except OmegaConfBaseException as e:
        shown = "null" if value is None else value
        raise ConfigError(f"{key}={shown}: {one_line(e)}") from None


class _HydraAnswers(Exception):
    """A command line Hydra's own parser refuses or answers itself (--help, a bad flag)."""


def check_command_line(argv: list[str]) -> list[str]:
    """`train.py`'s arguments with the overrides checked (check_overrides); Hydra's flags are kept as given."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:
        return argv
    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise _HydraAnswers(message)

    parser.error = refuse  # Hydra parses the same line again and prints its own usage message
    try:
        args = parser.parse_args(argv)
    except _HydraAnswers:
        return argv
    if args.config_name not in (None, "train") or args.help or args.hydra_help or args.shell_completion:
        return argv
    checked = iter(check_overrides(args.overrides))
    wanted = list(args.overrides)
    out = []
    for arg in argv:
        if wanted and arg == wanted[0]:
            wanted.pop(0)
            out.append(next(checked))
        else:
            out.append(arg)
    return out
