"""The run directory (sparse_coding.lifecycle.rundir): owned by one run at a time, refused when it is a file,
unwritable or full, and a finished run in it is never replaced (overwrite=true sets it aside whole)."""

from __future__ import annotations

import pytest

from sparse_coding.errors import ConfigError, StorageError
from sparse_coding.lifecycle import resume, rundir
from sparse_coding.lifecycle.rundir import check_writable, own_run_dir
from tests.helpers import digests, fake_run_dir, one_line


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


def test_a_direct_run_into_a_finished_run_is_refused(tmp_path):
    """run() without train.py (experiment runners, tests) has the same guard before training."""
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
