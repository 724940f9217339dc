"""Checkpoints (sparse_coding.lifecycle.checkpoint): written atomically (a failed write leaves the previous one and no
temporary file), and the epoch-end one holds the auto-λ the run went on with."""

from __future__ import annotations

import pytest
import torch

from sparse_coding.errors import StorageError
from sparse_coding.lifecycle import checkpoint, resume
from tests.helpers import one_line


def test_the_epoch_end_checkpoint_holds_the_updated_lambda(finished_run):
    _, out, module = finished_run
    last = resume.load_checkpoint(out / "checkpoints" / "last.ckpt")
    # the step-4 and step-8 checkpoints fall on an epoch's last batch: they are the epoch-end ones,
    # taken after the auto-lambda update, so they hold the lambda the run went on with
    assert float(last["state_dict"]["lams"][0]) == module.lam(0)
    assert last["lam_history"] == module.lam_history and len(module.lam_history[0]) >= 2


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
