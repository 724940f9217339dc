"""Property tests (issue 22): random overrides, random run-directory states and random file damage through the
validation paths never give a traceback (only a SparseCodingError, one line), never change a file silently and never
lose one.

- override lists drawn from hostile values go through `train.py`'s checks in process: the pre-Hydra check of the
  command line (sparse_coding.config.preflight) and compose + validate (sparse_coding.api.compose);
- a finished or interrupted run directory, damaged at random (files deleted, truncated, overwritten, replaced by a
  folder), goes through what `train.py` does before training: start_run, resume_checkpoint (fresh, ckpt_path=last,
  ckpt_path=FILE, overwrite=true); every file's content is still in the directory afterwards (set aside at most),
  and a checkpoint it resumes from is intact;
- a cache damaged at random goes through `python -m sparse_coding.cache verify`: a changed shard or mean is found;
- a saved dictionary damaged at random goes through SparseDictionary.load: refused, or loaded unchanged.

Derandomized, bounded example counts (tests/reliability/conftest.py): well under a minute together.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_coding.cache import cli, store
from sparse_coding.errors import DataError, SparseCodingError
from sparse_coding.lifecycle import resume, rundir
from tests.helpers import digests, import_cache, one_line

settings.load_profile("reliability")

TINY = ["logger=none", "trainer.enable_progress_bar=false", "data=sparse_linear", "data.dim=8", "data.n=256",
        "data.n_val=64", "data.batch_size=64", "dictionary.mult=2", "trainer.checkpoint_every_n_steps=3"]


# --------------------------------------------------------------------------------------------
# Random overrides


VALUES = {
    "data.dim": ["8", "0", "-1", "x", "1e9", "${oc.env:HOME}", "${oc.env:SPARSE_CODING_UNSET_X}", "${data.n}", "null"],
    "data.n": ["256", "${data.n}", "${data.dim}", "0", "[1,2]"],
    "data.noise": ["0.1", "1e20", "-1", "nan", "inf", "${oc.env:HOME}"],
    "data.scale": ["1", "0", "1e7", "abc"],
    "convergence.max_minutes": ["1", "1e300", "-1", "nan", "0"],
    "convergence.max_samples": ["1000", "0", "-5", "1e30"],
    "trainer.limit_train_batches": ["0.1", "0.5", "0", "2", "-1"],
    "trainer.num_nodes": ["1", "2", "0"], "trainer.strategy": ["auto", "ddp", "bogus"],
    "logger": ["none", "wandb", "csv", "bogus"], "logger.project": ["ok", "a/b/c", "''", "x" * 200, "p:q"],
    "logger.tags": ["[a]", "[a,'']", f"[{'t' * 70}]", "[]", "x"],
    "hydra.run.dir": ["/proc/self", "/dev/null", "/dev/null/x", "RUN"],
    "ckpt_path": ["last", "/nonexistent.ckpt", "/dev/null"],
    "dictionary.lam": ["auto", "-1", "[0.1,auto]", "${oc.env:HOME}"], "seed": ["0", "-1", "x"],
}


@settings(max_examples=60)
@given(st.dictionaries(st.sampled_from(sorted(VALUES)), st.integers(0, 20), min_size=1, max_size=4))
def test_random_overrides_are_accepted_or_refused_with_one_line(tmp_path, choice):
    from sparse_coding.api import compose
    from sparse_coding.config.preflight import check_command_line

    overrides = [*TINY[:3], *[f"{k}={VALUES[k][i % len(VALUES[k])]}".replace("RUN", str(tmp_path / "run"))
                              for k, i in choice.items()]]
    for check in (check_command_line, compose):
        try:
            check(overrides)
        except SparseCodingError as e:
            one_line(e)
    assert not (tmp_path / "run").exists()  # checking creates nothing


# --------------------------------------------------------------------------------------------
# Random run-directory states



@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished run (12 steps, checkpoints at steps 3, 6, ... and epoch ends), the config and a built module."""
    from sparse_coding.api import compose, compose_and_plan
    from sparse_coding.run import build_datamodule, build_module, run

    out = tmp_path_factory.mktemp("template") / "run"
    cfg = compose([*TINY, "trainer.max_steps=12"])
    run(cfg, out)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("seed: 0\n")
    longer, plan = compose_and_plan([*TINY, "trainer.max_steps=24"])
    dm = build_datamodule(longer, plan)
    return out, longer, dm, build_module(longer, plan, dm)


DAMAGE = ("delete", "truncate", "garbage", "flip", "folder", "keep")
ACTIONS = ("fresh", "last", "file", "overwrite")


@settings(max_examples=40)
@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(DAMAGE), st.integers(0, 10 ** 6)), min_size=0, max_size=3),
       st.sampled_from(ACTIONS), st.booleans())
def test_a_damaged_run_directory_is_resumed_refused_or_set_aside_never_lost(template, damage, action, unfinished):
    out0, cfg, dm, module = template
    run = Path(tempfile.mkdtemp(dir=out0.parent)) / "run"
    try:
        shutil.copytree(out0, run)
        if unfinished:
            (run / "metrics.json").unlink()
        files = sorted(p for p in run.rglob("*") if p.is_file())
        for index, kind, seed in damage:
            target = files[index % len(files)]
            if not target.is_file():
                continue
            data = target.read_bytes()
            if kind == "delete":
                target.unlink()
            elif kind == "truncate":
                target.write_bytes(data[: seed % max(1, len(data))])
            elif kind == "garbage":
                target.write_bytes(np.random.default_rng(seed).bytes(1 + seed % 4096))
            elif kind == "flip" and data:
                pos = seed % len(data)
                target.write_bytes(data[:pos] + bytes([data[pos] ^ (1 + seed % 255)]) + data[pos + 1:])
            elif kind == "folder":
                target.unlink()
                target.mkdir()
        before = digests(run)
        ckpt = {"fresh": None, "last": "last", "overwrite": None,
                "file": str(run / "checkpoints" / "last.ckpt")}[action]
        chosen = None
        try:
            with rundir.start_run(run, ckpt, overwrite=action == "overwrite"):
                chosen = resume.resume_checkpoint(ckpt, run, module, cfg.trainer, dm)
        except SparseCodingError as e:
            one_line(e)
        after = digests(run)
        # nothing lost or changed: every file's content is still here, under its name or set aside
        still = set(after.values())
        lost = {name: h for name, h in before.items() if h not in still}
        assert not lost, (damage, action, lost)
        changed = {name for name in before if name in after and after[name] != before[name]}
        assert not changed, (damage, action, changed)
        if chosen is not None:  # what it resumes from is an intact checkpoint of this run
            resume.load_checkpoint(Path(chosen))
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Random damage to a cache and to a saved dictionary


@pytest.fixture(scope="module")
def intact_cache(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    return import_cache(tmp_path_factory.mktemp("cache") / "c", x, shard_rows=100)


@settings(max_examples=60)
@given(st.integers(0, 50), st.sampled_from(("truncate", "garbage", "flip", "delete", "append")), st.integers(0, 10 ** 6))
def test_a_damaged_cache_is_refused_by_verify_with_one_line(intact_cache, capsys, index, kind, seed):
    path = Path(tempfile.mkdtemp(dir=intact_cache.parent)) / "c"
    try:
        shutil.copytree(intact_cache, path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "verified.json")
        target = files[index % len(files)]
        data = target.read_bytes()
        new = {"truncate": data[: seed % max(1, len(data))], "garbage": np.random.default_rng(seed).bytes(1 + seed % 999),
               "flip": data[:seed % len(data)] + bytes([data[seed % len(data)] ^ (1 + seed % 255)]) + data[seed % len(data) + 1:],
               "append": data + b"\0" * (1 + seed % 9), "delete": None}[kind]
        if new is None:
            target.unlink()
        else:
            target.write_bytes(new)
        capsys.readouterr()
        code = cli.main(["verify", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        if code != 0:
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        data_file = target.suffix == ".npy" or target.name.endswith(".npy.sha256")
        if target.suffix == ".npy" and new != data:
            assert code == 2, (target.name, kind)  # a changed shard or mean is always found
        if code == 0 and not data_file:  # the manifest still reads the same: the data are untouched
            assert store.read_manifest(path)["shards"] == store.read_manifest(intact_cache)["shards"]
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def saved_dictionary(tmp_path_factory):
    from sparse_coding import SparseDictionary

    phi = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    d = SparseDictionary(phi / phi.norm(dim=0, keepdim=True), 0.25, label="mult2_lam0.25")
    return d.save_pretrained(tmp_path_factory.mktemp("dict") / "saved"), d


@settings(max_examples=60)
@given(st.sampled_from(("dictionary.safetensors", "dictionary.json")),
       st.sampled_from(("truncate", "garbage", "flip", "delete")), st.integers(0, 10 ** 6))
def test_a_damaged_dictionary_is_refused_or_loads_unchanged(saved_dictionary, name, kind, seed):
    from sparse_coding import SparseDictionary

    folder, want = saved_dictionary
    copy = Path(tempfile.mkdtemp(dir=folder.parent)) / "saved"
    try:
        shutil.copytree(folder, copy)
        target = copy / name
        data = target.read_bytes()
        if kind == "delete":
            target.unlink()
        elif kind == "truncate":
            target.write_bytes(data[: seed % len(data)])
        elif kind == "garbage":
            target.write_bytes(np.random.default_rng(seed).bytes(1 + seed % 999))
        else:
            pos = seed % len(data)
            target.write_bytes(data[:pos] + bytes([data[pos] ^ (1 + seed % 255)]) + data[pos + 1:])
        try:
            got = SparseDictionary.load(copy)
        except DataError as e:
            one_line(e)
            return
        assert torch.equal(got.phi, want.phi) and got.lam == want.lam and got.label == want.label, (name, kind, seed)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
