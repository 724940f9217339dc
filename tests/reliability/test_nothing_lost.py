"""Nothing lost, nothing mixed (GitHub issue 22) and the cache lock wait (issue 21).

- `cache import/build --force` replaces only a cache, never a run directory or a user's files.
- A fresh run never replaces a finished run (plain reruns, multirun jobs that share a folder);
  `overwrite=true` keeps the earlier run's files in replaced-<time>/.
- A refused run (bad value, directory in use, finished run) leaves the directory's `.hydra/` as it was.
- A moved or copied run directory resumes into its own checkpoints/last.ckpt; `ckpt_path=last`
  takes the checkpoint with the most progress.
- The cache lock is waited for with non-blocking polls (a Ctrl-C can never be lost), says what it
  waits for, and can be bounded.
- A checkpoint or a corpus file that is a FIFO, a directory or a device is refused with one line
  that says what it is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from reliability.helpers import error_lines, file_digests, import_cache, one_line, run_py
from sparse_coding import corpus
from sparse_coding.cache import build, cli, store
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError, DataError, StorageError
from sparse_coding.lifecycle import checkpoint, resume


def digests(d: Path) -> dict:
    """sha256 of every file under d, hidden ones included (relative names), but the run lock's pid file."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".run.lock"}


def fake_run_dir(path: Path) -> Path:
    """A finished run's folder as train.py leaves it (contents are placeholders)."""
    (path / "checkpoints").mkdir(parents=True)
    (path / ".hydra").mkdir()
    for name, text in (("metrics.json", "{}"), ("dictionary.safetensors", "phi"), ("dictionary.json", "{}"),
                       ("checkpoints/last.ckpt", "state"), (".hydra/config.yaml", "seed: 0\n"), ("train.log", "")):
        (path / name).write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# 1. --force replaces only a cache


def test_cache_force_refuses_a_run_directory_and_touches_nothing(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((40, 4), np.float32))
    run = fake_run_dir(tmp_path / "run")
    before, siblings = digests(run), sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["import", "--input", str(tmp_path / "a.npy"), "--output", str(run), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a cache folder (a training run's folder)" in err[0], err
    assert digests(run) == before and sorted(p.name for p in tmp_path.iterdir()) == siblings  # not even a lock file
    # the same guard under the lock, where `cache build --force` swaps its new cache in
    with pytest.raises(ConfigError, match="not a cache folder") as e:
        with store.replacing(run):
            pytest.fail("replacing() yielded for a run directory")
    one_line(e.value)
    assert digests(run) == before


def test_cache_force_replaces_a_cache_a_partial_build_or_an_empty_folder_only(tmp_path):
    a = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a + 1)
    done = import_cache(tmp_path / "done", a, shard_rows=16)
    store.verify(done)  # verified.json is part of a cache too
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        def dies(lo, hi):
            if lo >= 16:
                raise KeyboardInterrupt
            return a[lo:hi]
        build.write_array_cache(partial, dies, 40, 4, "data", {"kind": "imported"}, shard_rows=16)
    (tmp_path / "empty").mkdir()
    for out in (done, partial, tmp_path / "empty", tmp_path / "new"):
        build.import_array(tmp_path / "b.npy", out, shard_rows=16, force=True)
        assert store.verify(out)["files"] == 3, out
    mixed = import_cache(tmp_path / "mixed", a, shard_rows=16)
    (mixed / "notes.txt").write_text("mine")  # a user's file inside a cache: --force would delete it
    (mixed / "layers" / "data" / "keep.npy").write_bytes(b"x")
    before = digests(mixed)
    with pytest.raises(ConfigError, match=r"not a cache folder: it holds layers/data/keep.npy, notes.txt;"):
        build.import_array(tmp_path / "b.npy", mixed, shard_rows=16, force=True)
    assert digests(mixed) == before


# --------------------------------------------------------------------------------------------
# 2, 3. A finished run is never replaced; a refused run leaves .hydra/ as it was

TRAIN = ["train.py", "logger=none", "trainer.enable_progress_bar=false", "data.dim=8", "data.n=256", "data.n_val=64",
         "data.batch_size=64", "dictionary.mult=2", "trainer.max_epochs=2", "convergence.stop=false"]


def test_a_finished_run_is_never_replaced_and_refused_runs_leave_its_record(tmp_path):
    sweep = tmp_path / "sweep"
    # two multirun jobs that share one folder: the first trains, the second is refused
    multi = run_py([TRAIN[0], "-m", *TRAIN[1:], "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=same"])
    run = sweep / "same"
    assert multi.returncode == 2, multi.stderr[-2000:]
    last = error_lines(multi)[-1]
    assert "holds a finished run" in last and "ckpt_path=last" in last and "overwrite=true" in last, last
    assert "Traceback" not in multi.stderr
    assert (run / "metrics.json").is_file() and "seed: 0" in (run / ".hydra" / "config.yaml").read_text()
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    finished = {k: v for k, v in digests(run).items() if k != "train.log"}  # Hydra appends to its log

    def unchanged():
        now = digests(run)
        assert {k: now.get(k) for k in finished} == finished
        assert not [k for k in now if k not in finished and k != "train.log"], now

    again = run_py([*TRAIN, f"hydra.run.dir={run}", "seed=2"])  # a fresh run in it: refused
    assert again.returncode == 2 and len(error_lines(again)) == 1 and "holds a finished run" in again.stderr, again.stderr
    unchanged()
    bad = run_py([*TRAIN, f"hydra.run.dir={run}", "dictionary.lr=-1"])  # a bad value: refused before anything
    assert bad.returncode == 2 and "dictionary.lr" in error_lines(bad)[-1], bad.stderr
    unchanged()
    with open(run / ".run.lock", "a+") as held:  # another run holds the directory
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = run_py([*TRAIN, f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_epochs=3"])
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert busy.returncode == 2 and "in use by another run" in error_lines(busy)[-1], busy.stderr
    unchanged()
    replaced = run_py([*TRAIN, f"hydra.run.dir={run}", "seed=2", "overwrite=true"])
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    [aside] = run.glob("replaced-*")
    kept = digests(aside)
    assert {k: kept.get(k) for k in finished} == finished  # the earlier run, whole: results, plots, checkpoints, .hydra
    assert (run / "metrics.json").is_file() and "seed: 2" in (run / ".hydra" / "config.yaml").read_text()
    assert "overwrite=true" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_direct_run_into_a_finished_run_is_refused(tmp_path):
    """run() without train.py (experiment runners, tests) has the same guard before training."""
    from sparse_coding.lifecycle import rundir

    run = fake_run_dir(tmp_path / "run")
    before = digests(run)
    for ckpt in (None, str(tmp_path / "other" / "checkpoints" / "last.ckpt")):
        with pytest.raises(ConfigError, match="holds a finished run") as e:
            resume.resume_checkpoint(ckpt, run, None, None)
        one_line(e.value)
    with pytest.raises(ConfigError, match="holds a finished run"):
        with rundir.start_run(run, None):
            pytest.fail("start_run yielded for a finished run")
    assert digests(run) == before
    with rundir.start_run(run, "last"):  # resuming or extending it is allowed
        with rundir.own_run_dir(run):  # run()'s own lock inside start_run reuses it
            pass
    with rundir.start_run(run, None, overwrite=True):
        assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()
    [aside] = run.glob("replaced-*")
    assert digests(aside) == {k: v for k, v in before.items() if k not in ("train.log",)}


# --------------------------------------------------------------------------------------------
# 4. A moved or copied run directory resumes into its own last.ckpt

TINY = ["logger=none", "trainer.enable_progress_bar=false", "data.dim=8", "data.n=256", "data.n_val=64",
        "data.batch_size=64", "dictionary.mult=2", "trainer.checkpoint_every_n_steps=2", "convergence.stop=false"]


def _train(out: Path, epochs: int, *extra: str) -> None:
    from sparse_coding.run import run

    cfg = compose_config([*TINY, f"trainer.max_epochs={epochs}", *extra])
    validate(cfg)
    run(cfg, out)


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


# --------------------------------------------------------------------------------------------
# 5. The cache lock: non-blocking polls, a message that says what it waits for, a bound


def test_the_cache_lock_wait_never_blocks_in_flock_and_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    calls = []
    real = fcntl.flock

    def recording(fd, op):
        calls.append(op)
        if op & fcntl.LOCK_EX and not op & fcntl.LOCK_NB:
            raise AssertionError("a blocking flock(2): a Ctrl-C that lands just before it is lost")
        return real(fd, op)

    out = tmp_path / "c"
    with store.build_lock(out):  # this open file description holds the lock, with our pid in the lock file
        monkeypatch.setattr(store.fcntl, "flock", recording)
        with pytest.raises(StorageError, match="gave up waiting") as e:
            with open(tmp_path / ".c.lock", "a+b") as f:
                store.wait_for_lock(f, lambda holder: f"[cache] waiting for it{holder}", timeout=0.3)
        one_line(e.value)
        monkeypatch.undo()
    # a blocking flock(2) entered just after a Ctrl-C was handled waits forever: only non-blocking attempts
    assert len(calls) >= 2 and all(op & fcntl.LOCK_NB for op in calls), calls
    assert capsys.readouterr().err.strip() == f"[cache] waiting for it (pid {os.getpid()})"


def test_the_cache_lock_wait_ends_when_the_holder_lets_go(tmp_path, capsys):
    out = tmp_path / "c"
    released = threading.Event()
    got = []

    def second():
        with store.build_lock(out):
            got.append(released.is_set())

    with store.build_lock(out):
        t = threading.Thread(target=second)
        t.start()
        for _ in range(1200):  # at most a minute for the thread to start waiting
            if "waiting for it to finish" in capsys.readouterr().err:
                break
            t.join(timeout=0.05)
        else:
            pytest.fail("the second builder never said it waits")
        released.set()
    t.join(timeout=60)
    assert got == [True]


# --------------------------------------------------------------------------------------------
# 11, 12. FIFOs, directories and devices are named for what they are


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _unblock_after(path: Path, seconds: float) -> threading.Timer:
    """If the code under test opens the FIFO to read (the bug), open its other end after a while so the test
    fails instead of hanging."""
    def open_writer():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    timer = threading.Timer(seconds, open_writer)
    timer.start()
    return timer


def test_a_fifo_checkpoint_is_refused_not_waited_on(tmp_path, fifo):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / "last.ckpt"
    os.rename(fifo, last)
    timer = _unblock_after(last, 20)
    try:
        for ckpt, error in (("last", DataError), (str(last), ConfigError)):  # found in the run, or given
            with pytest.raises(error, match="FIFO") as e:
                resume.resume_checkpoint(ckpt, tmp_path / "run", None, None)
            one_line(e.value)
    finally:
        timer.cancel()


def test_corpus_files_that_are_not_regular_files_are_named_for_what_they_are(tmp_path, fifo):
    (tmp_path / "folder.txt").mkdir()
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    timer = _unblock_after(fifo, 20)
    try:
        for path, what in ((tmp_path / "folder.txt", "is a directory"), (fifo, "is a FIFO"),
                           (Path("/dev/zero"), "is a character device"),
                           (tmp_path / "dangling.txt", "broken symbolic link"), (tmp_path / "nope.txt", "does not exist")):
            cfg = compose_config(["corpus=text", f"corpus.files=[{path}]"])
            with pytest.raises(DataError, match=what) as e:
                corpus.validate_corpus(cfg.corpus)
            one_line(e.value)
            with pytest.raises(DataError, match=what):
                corpus.source_files(cfg.corpus)
            with pytest.raises(DataError, match=what):
                next(corpus.text_documents([path]))
    finally:
        timer.cancel()
