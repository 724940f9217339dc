"""The one resumable loader (sparse_coding.data.loader), through the cache data module: a loader restored at a
position skips exactly the batches already trained, and Lightning's fit sets each pass's epoch."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from sparse_coding.data.cache_datamodule import CacheDataModule
from tests.helpers import import_cache
from tests.helpers import row_ids as ids


def test_lightning_fit_reads_the_trainer_epoch(indexed_cache):
    _, path = indexed_cache

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.epochs: dict[int, list] = {}

        def training_step(self, batch, i):
            self.epochs.setdefault(self.current_epoch, []).append(batch[:, 0].round().long())
            return (self.w * batch.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = CacheDataModule(path, batch_size=500, shuffle_buffer=1000)
    rec = Recorder()
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False).fit(rec, datamodule=dm)
    e0, e1 = (torch.cat(rec.epochs[e]).numpy() for e in (0, 1))
    assert sorted(e0) == sorted(e1) and len(e0) == 4500 and not np.array_equal(e0, e1)
    ref = CacheDataModule(path, batch_size=500, shuffle_buffer=1000)
    ref.set_epoch(1)
    np.testing.assert_array_equal(e1, ids(ref.train_dataloader()))


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_loader_skips_exactly_the_batches_already_trained(tmp_path, workers):
    x = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    path = import_cache(tmp_path / "cache", x, shard_rows=700)
    dm = CacheDataModule(path, batch_size=100, shuffle_buffer=300, seed=3, num_workers=workers)
    dm.set_epoch(2)
    full = [b.clone() for b in dm.train_dataloader()]
    for done in (0, 5, len(full) - 1):
        loader = dm.train_dataloader()
        loader.load_state_dict({"epoch": 2, "batches_done": done})
        rest = list(loader)
        assert len(rest) == len(full) - done
        assert all(torch.equal(a, b) for a, b in zip(rest, full[done:]))
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches_done": 5})  # another epoch's position: ignored
    assert len(list(loader)) == len(full)
