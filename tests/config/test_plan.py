"""The run plan (sparse_coding.config.plan): a composed config is parsed once, by `validate`, into a frozen plan
that the data module and the module take without parsing again."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sparse_coding import models
from sparse_coding.cache import build
from sparse_coding.config import plan as plan_mod
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.run import build_datamodule, build_module


def _count(monkeypatch, module, name, counts):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.fixture
def counts(monkeypatch):
    found: dict = {}
    for name in ("parse_lam", "parse_mult"):
        _count(monkeypatch, plan_mod, name, found)
    _count(monkeypatch, models, "read_model_shape", found)
    return found


def test_each_value_is_parsed_once_synthetic(counts):
    """validate (which builds the plan), the data module and the module: each lambda and mult parsed once."""
    cfg = compose_config(["data.dim=8", "data.n=64", "data.n_val=16", "data.batch_size=16", "data.active=2",
                          "dictionary.mult=[1,2]", "dictionary.lam=[0.1,auto,0.3]", "logger=none"])
    plan = validate(cfg)
    module = build_module(cfg, plan, build_datamodule(cfg, plan))
    assert counts == {"parse_mult": 2, "parse_lam": 3}
    assert module.grid == [(1, 0.1), (1, "auto"), (1, 0.3), (2, 0.1), (2, "auto"), (2, 0.3)]
    assert module.labels == [m.label for m in plan.grid] and module.labels[1] == "mult1_lamauto"


def test_each_value_is_parsed_once_with_a_model(counts, tmp_path):
    """A model's shape (config.json) is read once too: model=minilm with a given cache of its width."""
    rows = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    path = build.import_array(tmp_path / "rows.npy", tmp_path / "cache", shard_rows=128)
    cfg = compose_config(["model=minilm", "activation=token_embeddings", f"data.path={path}", "data.batch_size=32",
                          "dictionary.mult=1", "dictionary.lam=0.5", "logger=none"])
    plan = validate(cfg)
    datamodule = build_datamodule(cfg, plan)
    build_module(cfg, plan, datamodule)
    assert counts == {"parse_mult": 1, "parse_lam": 1, "read_model_shape": 1}
    assert plan.data.source == "cache" and plan.data.width == datamodule.dim == 384 and plan.data.model.num_layers == 6


def test_the_model_shape_is_read_once_by_a_run_on_the_models_cache(counts, tiny_gpt2, tmp_path):
    """A model run on its own cache (the tiny GPT-2, hidden state 1), as every run of a sweep after the first:
    validate reads the shape, `ensure_cache` and the data module take it from the plan. (The first run, which
    builds the cache, reads it once more: loading the weights.)"""
    cfg = compose_config(["model=gpt2", f"model.path={tiny_gpt2}", "layer=1", "corpus=kjv", "corpus.context_len=16",
                          "corpus.max_tokens=300", "corpus.batch_size=4", f"cache_dir={tmp_path}", "data.batch_size=32",
                          "dictionary.mult=1", "dictionary.lam=0.5", "logger=none"])
    build_datamodule(cfg, validate(cfg))  # the first run: builds the cache
    counts.clear()
    plan = validate(cfg)
    datamodule = build_datamodule(cfg, plan)
    build_module(cfg, plan, datamodule)
    assert counts == {"parse_mult": 1, "parse_lam": 1, "read_model_shape": 1}
    assert datamodule.dim == plan.data.width == 32


def test_the_plan_is_frozen():
    plan = validate(compose_config(["logger=none"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.grid = ()
