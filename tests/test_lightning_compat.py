"""Lightning internals (sparse_coding.lightning_compat): every one the code relies on exists in the installed
Lightning, and none is used outside the compat module."""

from __future__ import annotations

import re

import pytorch_lightning as pl

from sparse_coding import lightning_compat as compat
from tests.helpers import ROOT


def test_the_lightning_internals_the_code_relies_on_exist():
    assert compat.SUPPORTED == ">=2.6,<3"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert compat.missing_members(trainer) == []
    assert compat.checkpoint_epochs_done({"loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}}}) == 3
    assert compat.checkpoint_epochs_done({}) == 0


def test_no_lightning_internal_is_used_outside_the_compat_module():
    """The Trainer internals go through sparse_coding.lightning_compat (subclass overrides are listed there)."""
    pattern = re.compile(r"_logger_connector|_checkpoint_connector|\.batch_progress|\.total_batch_idx|_RICH_AVAILABLE"
                         r"|from pytorch_lightning[\w.]* import _|epoch_progress")
    offenders = []
    for path in sorted((ROOT / "sparse_coding").rglob("*.py")):
        if path.name == "lightning_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "lightning_compat import" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
