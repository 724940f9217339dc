"""Nothing lost, nothing mixed (GitHub issue 22): a fresh run never replaces a finished run (plain reruns,
multirun jobs that share a folder); `overwrite=true` keeps the earlier run's files in replaced-<time>/; a refused
run (bad value, directory in use, finished run) leaves the directory's `.hydra/` as it was, through real `train.py`
processes.

The unit tests of the same guarantees are beside their modules: `--force` replaces only a cache
(tests/cache/test_build.py, test_cli.py), a direct run into a finished run (tests/lifecycle/test_rundir.py), copied
run folders, the checkpoint with the most progress and FIFO checkpoints (tests/lifecycle/test_resume.py), the cache
lock wait (tests/cache/test_store.py), corpus files that are not regular files (tests/test_corpus.py).
"""

from __future__ import annotations

import fcntl

from tests.helpers import digests, error_lines
from tests.reliability.helpers import run_py

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
