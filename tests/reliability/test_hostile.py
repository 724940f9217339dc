"""Hostile and careless use (GitHub issue 13): nothing mixed, nothing lost, every failure one line.

One test per class of failure; real processes and real signals live in test_hostile_processes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_coding import corpus
from sparse_coding.cache import build, cli, store
from sparse_coding.config import resources
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError, DataError, StorageError, TrainingError
from sparse_coding.lifecycle import checkpoint, resume
from sparse_coding.lifecycle.rundir import check_writable, own_run_dir
from reliability.helpers import import_cache, one_line

settings.load_profile("reliability")

TINY = ["logger=none", "trainer.enable_progress_bar=false", "data.dim=8", "data.n=256", "data.n_val=64",
        "data.batch_size=64", "dictionary.mult=2", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2"]


# --------------------------------------------------------------------------------------------
# Caches: a build proves its source; a changed shard is found on every open


def test_a_resumed_or_repeated_import_of_another_source_is_refused_and_force_replaces(tmp_path):
    a = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "cache"

    def dies_after_three(lo, hi):  # the import of A is killed part-way (after 3 of 25 shards)
        if lo >= 48:
            raise KeyboardInterrupt
        return a[lo:hi]

    identity = {"kind": "imported", "source_sha256": store.sha256_file(tmp_path / "a.npy"), "key": None,
                "shape": [400, 8], "dtype": "float32", "rows_per_shard": 16}
    with pytest.raises(KeyboardInterrupt):
        build.write_array_cache(out, dies_after_three, 400, 8, "data", {"kind": "imported"}, shard_rows=16,
                                identity=identity)
    with pytest.raises(ConfigError, match="partial build of another source") as e:
        build.import_array(tmp_path / "b.npy", out, shard_rows=16)
    one_line(e.value)
    build.import_array(tmp_path / "a.npy", out, shard_rows=16)  # the same source resumes
    assert store.verify(out)["files"] == 25
    with pytest.raises(ConfigError, match="finished cache of another source"):
        build.import_array(tmp_path / "b.npy", out, shard_rows=16)
    with pytest.raises(ConfigError, match="finished cache of another source"):  # other settings, same file
        build.import_array(tmp_path / "a.npy", out, shard_rows=32)
    build.import_array(tmp_path / "b.npy", out, shard_rows=16, force=True)
    rows = np.concatenate([np.load(p) for p in sorted((out / "layers" / "data").glob("shard_*.npy"))])
    np.testing.assert_array_equal(rows, b)
    assert store.verify(out)["files"] == 25
    assert not list(tmp_path.glob(".cache.*-*"))  # no sibling left by --force


def test_an_output_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="existing file"):
        build.import_array(tmp_path / "a.npy", tmp_path / "file")
    with pytest.raises(ConfigError, match="not empty"):
        build.import_array(tmp_path / "a.npy", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_shard_changed_in_place_with_its_mtime_kept_is_found_on_every_open(tmp_path):
    from sparse_coding.data.cache_datamodule import CacheDataModule

    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    CacheDataModule(path)  # first open: verified
    shard = path / "layers" / "data" / "shard_00001.npy"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4:] = np.float32(1e3).tobytes()  # one value changed, size unchanged
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="shard_00001.npy: sha256 does not match"):
        CacheDataModule(path)


def test_a_manifest_with_stats_or_mean_of_the_wrong_type_or_shape_fails_verify(tmp_path):
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    good = json.loads((path / "manifest.json").read_text())
    for mutate in (lambda m: m["stats"]["data"].update(mean_sq_norm="big"),
                   lambda m: m["stats"]["data"].update(n_finite=-3),
                   lambda m: m["stats"]["data"].update(first_nonfinite=[1]),
                   lambda m: m.update(stats=[1, 2])):
        m = json.loads(json.dumps(good))
        mutate(m)
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError) as e:
            store.verify(path)
        one_line(e.value)
    (path / "manifest.json").write_text(json.dumps(good))
    mean = path / "layers" / "data" / "mean.npy"
    np.save(mean, np.zeros(5))  # wrong shape, checksum updated to match
    good["stats"]["data"]["mean_sha256"] = store.sha256_file(mean)
    (path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match="mean row is \\(5,\\)"):
        store.verify(path)


def test_inputs_get_messages_that_say_what_they_are(tmp_path):
    (tmp_path / "text.npy").write_text("just some words\n")
    np.save(tmp_path / "full.npy", np.ones((100, 8), np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    np.save(tmp_path / "wide.npy", np.zeros((1, store.MAX_D + 1), np.float16))
    for name, pattern in (("text.npy", "not a .npy file"), ("cut.npy", "truncated"),
                          ("bad.safetensors", "not a readable .safetensors"), ("wide.npy", "width d=1048577")):
        with pytest.raises(DataError, match=pattern) as e:
            build.import_array(tmp_path / name, tmp_path / f"out-{name}")
        assert "pickle" not in one_line(e.value)
        assert not (tmp_path / f"out-{name}").exists()


def test_the_cache_cli_answers_bad_flags_and_overrides_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    (tmp_path / "file").write_text("x")
    cases = [["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--shard-rows", "0"],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--shard-rows", "x"],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "file")],
             ["import", "--input", str(tmp_path / "nope.npy"), "--output", str(tmp_path / "o")],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--dtype", "int8"],
             ["build", "model=nosuch"], ["build", "model=minilm", "layer=1", "+trainer.gradient_clip_val=-1"],
             ["build", "model=minilm", "layer=[1"], ["verify", str(tmp_path / "file")], ["frobnicate"]]
    for argv in cases:
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (argv, err)


# --------------------------------------------------------------------------------------------
# Runs: resume only what matches, fall back past a damaged checkpoint, write outputs independently


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real two-epoch run (4 batches an epoch, a step checkpoint every 2 steps) and its module."""
    from sparse_coding import run as run_mod

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(TINY)
    validate(cfg)
    modules = []

    class Keep(__import__("pytorch_lightning").Callback):
        def on_fit_end(self, trainer, module):
            modules.append(module)

    run_mod.run(cfg, out, callbacks=[Keep()])
    return cfg, out, modules[0]


def test_the_epoch_end_checkpoint_holds_the_updated_lambda(trained):
    _, out, module = trained
    last = resume.load_checkpoint(out / "checkpoints" / "last.ckpt")
    # the step-4 and step-8 checkpoints fall on an epoch's last batch: they are the epoch-end ones,
    # taken after the auto-lambda update, so they hold the lambda the run went on with
    assert float(last["state_dict"]["lams"][0]) == module.lam(0)
    assert last["lam_history"] == module.lam_history and len(module.lam_history[0]) >= 2


def test_resume_refuses_changed_settings_and_finished_runs_with_one_line(trained):
    cfg, out, module = trained
    from sparse_coding.module import SparseCodingModule

    for change, pattern in (({"lr": 0.02}, "dictionary.lr=0.01"), ({"grid": [(2, 0.5)]}, "dictionary.mult"),
                            ({"grid": [(3, "auto")]}, "dictionary.mult")):
        hp = {**dict(module.hparams), **change}
        other = SparseCodingModule(**hp)
        with pytest.raises(ConfigError, match=pattern) as e:
            resume.resume_checkpoint("last", out, other, cfg.trainer)
        one_line(e.value)
    other = SparseCodingModule(**{**dict(module.hparams), "dim": 9})
    with pytest.raises(ConfigError, match="data width|shape"):
        resume.resume_checkpoint("last", out, other, cfg.trainer)
    with pytest.raises(ConfigError, match="already finished"):
        resume.resume_checkpoint("last", out, module, cfg.trainer)


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(trained, tmp_path, capsys):
    cfg, out, module = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a write cut short
    longer = cfg.trainer.copy()
    longer.max_epochs = 5
    path = resume.resume_checkpoint("last", run, module, longer)
    assert Path(path).name.startswith("epoch=1-step=8") and "damaged" in capsys.readouterr().err
    for p in (run / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"junk")
    with pytest.raises(DataError, match="no other intact checkpoint"):
        resume.resume_checkpoint("last", run, module, longer)


def test_a_failed_checkpoint_write_leaves_the_old_one_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    checkpoint.atomic_save({"a": torch.ones(3)}, target)
    before = target.read_bytes()

    def dies_midway(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(StorageError, match="no space left.*previous checkpoint is intact") as e:
        checkpoint.atomic_save({"a": torch.zeros(3)}, target)
    one_line(e.value)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_outputs_are_independent_and_never_hold_nonfinite_numbers(trained, tmp_path):
    from sparse_coding.outputs import write_outputs

    cfg, _, module = trained
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "metrics.json").mkdir()  # metrics.json cannot be written
    with pytest.raises(StorageError, match="could not write metrics.json.*written: dictionary.safetensors") as e:
        write_outputs(blocked, cfg, module, {"normalized_loss": 1.0, "label": "x", "dim": 8})
    one_line(e.value)
    assert (blocked / "dictionary.safetensors").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(TrainingError, match="fvu.*not finite"):
        write_outputs(bad, cfg, module, {"normalized_loss": 1.0, "fvu": float("inf"), "x": [float("nan")], "dim": 8})
    metrics = json.loads((bad / "metrics.json").read_text())  # strict JSON: no NaN/Infinity tokens
    assert metrics["fvu"] is None and metrics["not_finite"] == ["fvu", "x[0]"]


# --------------------------------------------------------------------------------------------
# The run directory


def test_a_run_directory_is_owned_by_one_run(tmp_path):
    with own_run_dir(tmp_path / "run"):
        with pytest.raises(StorageError, match="in use by another run") as e:
            with own_run_dir(tmp_path / "run"):
                pass
        one_line(e.value)
    with own_run_dir(tmp_path / "run"):  # released
        pass


def test_a_run_directory_that_is_a_file_unwritable_or_full_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, error, pattern in ((tmp_path / "file", ConfigError, "existing file"),
                                 (tmp_path / "file" / "sub", StorageError, "not writable")):
        with pytest.raises(error, match=pattern) as e:
            check_writable(path)
        one_line(e.value)
    with pytest.raises(StorageError, match="MiB free"):
        check_writable(tmp_path / "ok", need=1 << 60)


def test_a_fresh_run_sets_earlier_checkpoints_aside(trained, tmp_path, capsys):
    cfg, out, module = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    assert resume.resume_checkpoint(None, run, module, cfg.trainer) is None
    assert not (run / "checkpoints").exists() and len(list(run.glob("checkpoints-before-*/*.ckpt"))) == 2
    assert "moved to" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Data too small, banks, memory


def test_data_too_small_to_measure_is_refused_before_training(tmp_path):
    from sparse_coding.data.cache_datamodule import CacheDataModule

    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    with pytest.raises(DataError, match="too few to measure"):
        CacheDataModule(path)
    with pytest.raises(ConfigError, match="data.n_val=1"):
        validate(compose_config(TINY + ["data.n_val=1"]))


def test_bank_members_that_are_the_same_dictionary_are_refused():
    for lam in ("[0.1,0.1]", "[0.1,1e-1]", "[1,1.0]", "[auto,auto]"):
        with pytest.raises(ConfigError, match="twice"):
            validate(compose_config(TINY + [f"dictionary.lam={lam}"]))
    with pytest.raises(ConfigError, match="twice"):
        validate(compose_config(TINY + ["dictionary.mult=[2,2]"]))


def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating(monkeypatch):
    with pytest.raises(ConfigError, match="needs at least .* GiB of memory .*Gram matrix") as e:
        validate(compose_config(TINY + ["dictionary.mult=4000", "data.dim=256"]))  # a 1M x 1M Gram matrix
    one_line(e.value)
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 10)
    with pytest.raises(ConfigError, match="is available: lower dictionary.mult"):
        validate(compose_config(TINY))


# --------------------------------------------------------------------------------------------
# Text corpora


def test_text_corpora_fail_with_one_line_and_one_enormous_line_is_read_lazily(tmp_path):
    cases = {"empty.txt": (b"", "is empty"), "binary.txt": (b"\x00\x01\x02" * 100, "binary"),
             "latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
             "bad.jsonl": (b'{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
             "notext.jsonl": (b'{"body": "x"}\n', "line 1 has no string field 'text'")}
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=pattern) as e:
            list(corpus.text_documents([tmp_path / name]))
        one_line(e.value)
    big = tmp_path / "one_line.txt"
    with open(big, "w") as f:
        for _ in range(40):
            f.write("word " * 100_000)  # 20 MB, no newline
    tracemalloc.start()
    docs = corpus.text_documents([big])
    first = [next(docs) for _ in range(3)]  # what build_contexts needs for a few thousand tokens
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(len(d) <= 2 * corpus.PIECE_CHARS for d in first) and peak < 16 << 20


# --------------------------------------------------------------------------------------------
# Property: random hostile overrides through validation


TRAINER_VALUES = {
    "trainer.devices": ["1", "2", "0", "-1", "auto", "[0]", "[0,0]", "999", "x", "null", "1.5"],
    "trainer.accelerator": ["cpu", "gpu", "cuda", "tpu", "mps", "auto", "x"],
    "trainer.precision": ["32-true", "32", "16-mixed", "bf16-mixed", "16", "64", "x"],
    "trainer.strategy": ["auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "x"],
    "trainer.num_nodes": ["1", "0", "-1", "2", "x"],
    "trainer.limit_train_batches": ["0", "0.0", "0.5", "1", "3", "1.5", "-1", "nan", "inf", "null"],
    "trainer.check_val_every_n_epoch": ["1", "0"],  # not a setting: the cadence is convergence.eval_every
    "trainer.log_every_n_steps": ["1", "0", "-5", "x"],
    "trainer.max_epochs": ["1", "0", "-1", "-2"], "trainer.max_steps": ["-1", "0", "5", "-7"],
    "trainer.deterministic": ["true", "false", "warn"],
    "+trainer.gradient_clip_val": ["1"], "+trainer.accumulate_grad_batches": ["2"], "+dictionary.foo": ["1"],
    "+bogus": ["1"], "dictionary.mult": ["1", "2", "[2,2]", "100000", "0"],
    "dictionary.lam": ["auto", "0.1", "[0.1,0.1]", "[0.1,auto]", "-1", "nan"],
    "data.n_val": ["1", "2", "0"], "data.batch_size": ["1", "1000000000"], "solver.eval_batch_size": ["1", "1000000000"],
}


@settings(max_examples=150)
@given(st.dictionaries(st.sampled_from(sorted(TRAINER_VALUES)), st.integers(0, 10), min_size=1, max_size=4))
def test_random_hostile_overrides_pass_or_fail_with_one_line(choice):
    overrides = TINY + [f"{k}={TRAINER_VALUES[k][i % len(TRAINER_VALUES[k])]}" for k, i in choice.items()]
    try:
        cfg = compose_config(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's own type errors: Hydra prints them without a traceback
        assert type(e).__module__.startswith(("hydra", "omegaconf")), (overrides, e)
        return
    try:
        validate(cfg)
    except ConfigError as e:
        one_line(e)
