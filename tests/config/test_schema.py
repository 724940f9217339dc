"""The schema (sparse_coding.config.schema) is the one source of defaults: conf/ files select a schema and set only
what their option changes, the composed configs are those of before, and a model run holds no synthetic field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from omegaconf import OmegaConf

from sparse_coding.config import schema
from sparse_coding.config.compose import compose_config
from tests.helpers import ROOT
from tests.tinymodels import run_cfg

SNAPSHOT = ROOT / "tests" / "fixtures" / "composed_config.json"  # composed before the schema became the one source


def test_composed_configs_are_the_snapshot():
    """Every default and group option composes to the values it had when defaults lived in three places
    (the JSON text compared, so an int that became a float shows)."""
    for case, expected in json.loads(SNAPSHOT.read_text()).items():
        got = OmegaConf.to_container(compose_config(case.split()), resolve=True)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True), case or "(defaults)"


SCHEMAS = {"data": schema.DataConfig, "dictionary": schema.DictionaryConfig, "solver": schema.SolverConfig,
           "convergence": schema.ConvergenceConfig, "trainer": schema.TrainerConfig, "logger": schema.LoggerConfig,
           "model": schema.ModelConfig, "corpus": schema.CorpusConfig}


IDENTITY = ("name",)  # what an option is (data=gaussian sets name: gaussian), not a default it repeats


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_yaml_files_select_a_schema_and_set_only_what_they_change(group):
    defaults = {f.name: f.default for f in dataclasses.fields(SCHEMAS[group]) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(SCHEMAS[group])
                     if f.default_factory is not dataclasses.MISSING})
    files = sorted((ROOT / "conf" / group).glob("*.yaml"))
    assert files, f"conf/{group}/ has no option"
    for file in files:
        body = yaml.safe_load(file.read_text()) or {}
        chain = [d if isinstance(d, str) else next(iter(d)) for d in body.pop("defaults", [])]
        assert f"{group}_schema" in chain or "cache_data_schema" in chain or "default" in chain, \
            f"{file.relative_to(ROOT)} does not extend its schema"
        repeated = sorted(k for k, v in body.items() if k not in IDENTITY and k in defaults and defaults[k] == v)
        assert not repeated, f"{file.relative_to(ROOT)} repeats the schema's defaults of {repeated}"


def test_every_schema_has_a_group_in_the_default_list():
    chosen = {k for d in yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"] if isinstance(d, dict)
              for k in d}
    assert set(SCHEMAS) <= chosen | {"model"}  # model: null (a synthetic run) is a choice too
    assert "model" in chosen


def test_a_model_run_carries_no_synthetic_data_fields():
    cfg = run_cfg(["model=minilm", "layer=3"])
    assert cfg.data.name == "cache" and not {"dim", "n", "n_val", "active", "noise", "scale"} & set(cfg.data)
    assert {"batch_size", "val_fraction", "center", "shuffle_buffer"} <= set(cfg.data)
    synthetic = run_cfg(["data=sparse_linear"])
    assert synthetic.data.dim == 256 and synthetic.data.active == 10
    with pytest.raises(Exception, match="data.dim"):
        run_cfg(["model=minilm", "layer=3", "data.dim=64"])  # a field that does not apply is refused
