"""Issue 6, safety: no pickle loading of untrusted files; caches and dictionaries are
safetensors/npy/JSON; a crafted manifest cannot make us read or write outside the cache folder."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, error_lines, import_cache
from tests.reliability.helpers import run_py
from sparse_coding.cache import build, store
from sparse_coding.config.compose import compose_config
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.errors import DataError


def python_sources():
    files = [ROOT / "train.py", *sorted((ROOT / "sparse_coding").rglob("*.py"))]
    if (ROOT / "benchmarks").is_dir():
        files += sorted((ROOT / "benchmarks").rglob("*.py"))
    return files


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def test_no_pickle_loading_anywhere_in_the_package():
    problems = []
    for f in python_sources():
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            where = f"{f.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{where}: imports a pickle library")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            attr = node.func.attr
            if owner == "torch" and attr == "load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and attr == "load":
                ap = _kw(node, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True or (ap is not None and not isinstance(ap, ast.Constant)):
                    problems.append(f"{where}: np.load with allow_pickle")
            if owner == "yaml" and attr in ("load", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{attr} (use yaml.safe_load)")
    assert not problems, problems


def test_a_pickle_payload_is_never_executed_on_import(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "acts.pt"
    bad.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(DataError, match="weights_only=True"):
        build.load_user_array(bad)
    bad_npy = tmp_path / "acts.npy"
    np.save(bad_npy, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled data"):
        build.load_user_array(bad_npy)
    assert not marker.exists()


def test_caches_and_dictionaries_are_npy_json_safetensors(tmp_path):
    from safetensors import safe_open

    from sparse_coding.config.checks import validate
    from sparse_coding.run import run

    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    for p in path.rglob("*"):
        if p.is_file():
            assert p.suffix in (".npy", ".json", ".sha256"), p
            if p.suffix == ".npy":
                np.load(p, allow_pickle=False)
            if p.suffix == ".json":
                json.loads(p.read_text())
    cfg = compose_config(["logger=none", "trainer.enable_progress_bar=false", "data=cache", f"data.path={path}",
                                "trainer.max_epochs=1", "dictionary.mult=2", "data.batch_size=64"])
    validate(cfg)
    out = tmp_path / "run"
    run(cfg, out)
    with safe_open(str(out / "dictionary.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["mult2_lamauto"]
    json.loads((out / "dictionary.json").read_text())
    json.loads((out / "metrics.json").read_text())
    # resuming reads Lightning's checkpoint: it loads without unpickling arbitrary objects
    torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Crafted manifests


@pytest.fixture
def good_cache(tmp_path):
    return import_cache(tmp_path / "good", np.random.default_rng(2).standard_normal((200, 8)).astype(np.float32))


def _snapshot(root: Path, skip: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if skip not in p.parents and p != skip}


def craft(name, change):
    def apply(m, outside):
        m = json.loads(json.dumps(m))
        change(m, outside)
        return m
    return pytest.param(apply, id=name)


CRAFTED = [
    craft("dotdot-shard", lambda m, o: m["shards"]["data"][0].update(file="../../outside.npy")),
    craft("absolute-shard", lambda m, o: m["shards"]["data"][0].update(file=str(o / "outside.npy"))),
    craft("dotdot-layer", lambda m, o: (m["shards"].update({"..": m["shards"]["data"]}), m.update(layers=[".."]))),
    craft("absolute-mean", lambda m, o: m["stats"]["data"].update(mean_file=str(o / "outside.npy"))),
    craft("dotdot-mean", lambda m, o: m["stats"]["data"].update(mean_file="layers/data/../../../outside.npy")),
    craft("dotdot-tokens", lambda m, o: m.update(tokens={"file": "../outside.npy", "sha256": "0" * 64})),
    craft("huge-rows", lambda m, o: m.update(n_rows=10**18)),
    craft("huge-d", lambda m, o: m.update(d=10**12)),
    craft("negative-rows", lambda m, o: m["shards"]["data"][0].update(rows=-5)),
    craft("zero-rows-per-shard", lambda m, o: m.update(rows_per_shard=0)),
    craft("string-size", lambda m, o: m.update(n_rows="200")),
    craft("layer-not-listed", lambda m, o: m.update(layers=["data", "7"])),
]


@pytest.mark.parametrize("apply", CRAFTED)
def test_a_crafted_manifest_cannot_reach_outside_the_cache(good_cache, tmp_path, apply):
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    np.save(outside / "outside.npy", np.zeros((64, 8), np.float32))  # would pass a shape check if read
    crafted = tmp_path / "deep" / "er" / "crafted"
    shutil.copytree(good_cache, crafted)
    np.save(tmp_path / "deep" / "outside.npy", np.zeros((64, 8), np.float32))
    m = json.loads((crafted / "manifest.json").read_text())
    (crafted / "manifest.json").write_text(json.dumps(apply(m, outside)))
    before = _snapshot(tmp_path, crafted)
    for attempt in (lambda: store.read_manifest(crafted), lambda: store.verify(crafted),
                    lambda: CacheDataModule(crafted), lambda: store.ensure_verified(crafted)):
        with pytest.raises(DataError) as info:
            attempt()
        assert "\n" not in str(info.value)
    assert _snapshot(tmp_path, crafted) == before  # nothing written outside the cache folder
    assert not (crafted / "verified.json").exists()


def test_a_symlinked_shard_pointing_outside_is_refused(good_cache, tmp_path):
    outside = tmp_path / "outside.npy"
    real = np.load(good_cache / "layers" / "data" / "shard_00000.npy")
    np.save(outside, real)  # same bytes: checksum and shape would pass
    crafted = tmp_path / "crafted"
    shutil.copytree(good_cache, crafted)
    shard = crafted / "layers" / "data" / "shard_00000.npy"
    shard.unlink()
    os.symlink(outside, shard)
    with pytest.raises(DataError, match="outside the cache folder"):
        store.verify(crafted)
    with pytest.raises(DataError, match="outside the cache folder"):
        CacheDataModule(crafted)


def test_a_crafted_manifest_stops_train_py_with_one_line(good_cache, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(good_cache, crafted)
    m = json.loads((crafted / "manifest.json").read_text())
    m["shards"]["data"][0]["file"] = "../../../etc/passwd"
    (crafted / "manifest.json").write_text(json.dumps(m))
    proc = run_py(["train.py", "data=cache", f"data.path={crafted}", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"])
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "damaged or crafted" in lines[0], proc.stderr
