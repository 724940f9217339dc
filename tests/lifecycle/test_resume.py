"""What a resume starts from (sparse_coding.lifecycle.resume): `ckpt_path=last` refuses other settings, other data,
another cache or a finished run in one line; falls back past a damaged checkpoint to the newest intact one; takes
the checkpoint with the most progress; a copied run folder resumes into its own checkpoints; a fresh run sets
earlier checkpoints aside; a FIFO is refused, not waited on. (That a resumed run ends bit-identical to an
uninterrupted one: tests/integration/test_resume.py.)"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparse_coding.api import compose_and_plan
from sparse_coding.cache import build
from sparse_coding.errors import ConfigError, DataError
from sparse_coding.lifecycle import checkpoint, resume
from sparse_coding.lifecycle.resume import resume_checkpoint
from sparse_coding.module import SparseCodingModule
from sparse_coding.run import build_datamodule, build_module
from tests.helpers import QUIET, digests, one_line, train, unblock_after

# fresh synthetic data trained to a sample budget (never converging), or a cache: as tests/integration/test_resume.py
TO_BUDGET = ["convergence.tol=1e-12", "convergence.eval_every=1024", "convergence.max_samples=6144"]
COMMON = ["data.batch_size=256", "seed=3"]
FRESH = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=64", "dictionary.mult=4",
         "data.fresh=true", *TO_BUDGET, *COMMON]


def on_cache(path: Path) -> list:
    return ["data=cache", "data.shuffle_buffer=500", *TO_BUDGET, *COMMON, f"data.path={path}"]


def resume_check(out: Path, overrides_: list):
    """What `ckpt_path=last` decides for this config, without training: resume_checkpoint as run() calls it."""
    cfg, plan = compose_and_plan([*QUIET, *overrides_, "ckpt_path=last"])
    dm = build_datamodule(cfg, plan)
    return resume_checkpoint(cfg.ckpt_path, out, build_module(cfg, plan, dm), cfg.trainer, dm)


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, resume_cache):
    """Runs stopped after 4 steps (resumable): fresh synthetic data, and a cache (in a folder of its own)."""
    base = tmp_path_factory.mktemp("stopped")
    own_cache = base / "cache"
    shutil.copytree(resume_cache, own_cache)
    runs = {"fresh": (base / "fresh", FRESH), "cache": (base / "cache-run", on_cache(own_cache))}
    for out, ovr in runs.values():
        train(out, [*ovr, "trainer.max_steps=4"])
    return runs


@pytest.mark.parametrize("change, differs", [
    (["data.active=20", "data.seed=5"], "data.active: 4.0 there, 20.0 here; data.seed: 0 there, 5 here"),
    (["data.fresh=false"], "data.fresh: True there, False here"),
    (["data.n=4096"], "data.n: 2048 there, 4096 here"),
    (["data.n_val=128"], "data.n_val: 64 there, 128 here"),
    (["data.noise=0.2"], "data.noise: 0.1 there, 0.2 here"),
    (["data.scale=2"], "data.scale: 1.0 there, 2.0 here"),
    (["data=gaussian"], "data.name: 'sparse_linear' there, 'gaussian' here"),
])
def test_a_resume_on_other_synthetic_data_is_refused_with_one_line(stopped_runs, change, differs):
    out, ovr = stopped_runs["fresh"]
    with pytest.raises(ConfigError) as e:
        resume_check(out, [*ovr, *change, "trainer.max_steps=20"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out / 'checkpoints' / 'last.ckpt'} was trained on other data ("), msg
    assert differs in msg and msg.endswith("resume with the same data, or start a new run (another hydra.run.dir)"), msg


def test_a_resume_on_the_same_synthetic_data_is_accepted(stopped_runs):
    out, ovr = stopped_runs["fresh"]
    assert resume_check(out, [*ovr, "trainer.max_steps=20"]) == str(out / "checkpoints" / "last.ckpt")


def test_a_resume_on_another_cache_or_a_cache_swapped_under_its_path_is_refused(stopped_runs, resume_cache, tmp_path):
    out, ovr = stopped_runs["cache"]
    own = Path(next(a for a in ovr if a.startswith("data.path="))[len("data.path="):])
    other = build.import_array(resume_cache.parent / "acts.npy", tmp_path / "other", shard_rows=900)  # same rows
    moved = tmp_path / "moved"
    shutil.copytree(own, moved)
    assert resume_check(out, [*ovr, f"data.path={moved}", "trainer.max_steps=20"])  # the same cache elsewhere: fine
    for change, differs in (([f"data.path={other}"], f"at {own} there, "),
                            (["data.center=false"], "data.center: True there, False here"),
                            (["data.val_fraction=0.2"], "data.val_fraction: 0.1 there, 0.2 here"),
                            (["data.normalize=token"], "data.normalize: 'none' there, 'token' here")):
        with pytest.raises(ConfigError, match="was trained on other data") as e:
            resume_check(out, [*ovr, *change, "trainer.max_steps=20"])
        assert differs in str(e.value) and "\n" not in str(e.value), str(e.value)
    # another array imported with --force under the same path
    x = np.random.default_rng(5).standard_normal((2560, 16)).astype(np.float32)
    np.save(tmp_path / "b.npy", x)
    build.import_array(tmp_path / "b.npy", own, shard_rows=1000, force=True)
    with pytest.raises(ConfigError, match=r"was trained on other data \(cache build: \w+ at .* there, \w+ at .* here; "
                                          r"cache content: "):
        resume_check(out, [*ovr, "trainer.max_steps=20"])


def test_resume_refuses_changed_settings_and_finished_runs_with_one_line(finished_run):
    cfg, out, module = finished_run
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


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(finished_run, tmp_path, capsys):
    cfg, out, module = finished_run
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


def test_a_fresh_run_sets_earlier_checkpoints_aside(finished_run, tmp_path, capsys):
    cfg, out, module = finished_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    assert resume.resume_checkpoint(None, run, module, cfg.trainer) is None
    assert not (run / "checkpoints").exists() and len(list(run.glob("checkpoints-before-*/*.ckpt"))) == 2
    assert "moved to" in capsys.readouterr().err


TINY = ["data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64", "dictionary.mult=2",
        "trainer.checkpoint_every_n_steps=2", "convergence.stop=false"]


def _train(out: Path, epochs: int, *extra: str) -> None:
    train(out, [*TINY, f"trainer.max_epochs={epochs}", *extra])


def _step(path: Path) -> int:
    return int(resume.load_checkpoint(path)["global_step"])


def test_a_copied_run_directory_resumes_into_its_own_last_checkpoint(tmp_path):
    first = tmp_path / "first"
    _train(first, 2)  # 4 batches an epoch: global step 8
    before = digests(first)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    _train(copy, 4, "ckpt_path=last")
    ckpts = copy / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*.ckpt")) == ["last.ckpt"] and _step(ckpts / "last.ckpt") == 16
    assert [p.name for p in ckpts.glob("epoch=*.ckpt")] == ["epoch=3-step=16.ckpt"]  # the copied top-k file replaced
    assert digests(first) == before  # the original is not touched
    shutil.move(str(copy), str(tmp_path / "moved"))
    _train(tmp_path / "moved", 6, "ckpt_path=last")  # resumes at step 16, not 8
    assert _step(tmp_path / "moved" / "checkpoints" / "last.ckpt") == 24
    assert json.loads((tmp_path / "moved" / "metrics.json").read_text())["epochs_completed"] == 6


def test_ckpt_path_last_takes_the_checkpoint_with_the_most_progress(tmp_path, capsys):
    """A folder left by the old behaviour: last.ckpt (older) beside last-v1.ckpt (newer)."""
    state = {"state_dict": {}, "hyper_parameters": {}, "loops": {}, "optimizer_states": [{"state": {}, "param_groups": []}]}
    folder = tmp_path / "checkpoints"
    checkpoint.atomic_save({**state, "global_step": 8}, folder / "last.ckpt")
    checkpoint.atomic_save({**state, "global_step": 16}, folder / "last-v1.ckpt")
    checkpoint.atomic_save({**state, "global_step": 12}, folder / "epoch=2-step=12.ckpt")

    class Module:
        hparams: dict = {}

        @staticmethod
        def state_dict():
            return {}

    class Budget:
        max_epochs, max_steps = -1, 100

    path = resume.resume_checkpoint("last", tmp_path, Module(), Budget())
    assert Path(path).name == "last-v1.ckpt" and "holds less progress" in capsys.readouterr().err


def test_a_fifo_checkpoint_is_refused_not_waited_on(tmp_path, fifo):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / "last.ckpt"
    os.rename(fifo, last)
    timer = unblock_after(last, 20)
    try:
        for ckpt, error in (("last", DataError), (str(last), ConfigError)):  # found in the run, or given
            with pytest.raises(error, match="FIFO") as e:
                resume.resume_checkpoint(ckpt, tmp_path / "run", None, None)
            one_line(e.value)
    finally:
        timer.cancel()
