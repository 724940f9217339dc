"""Checkpoint and resume: a run killed mid-epoch and resumed with ckpt_path=last ends where an
uninterrupted run ends (same Phi, same metrics), because the loaders resume at the right batch."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import ROOT
from sparse_coding import cache
from sparse_coding.config import register_configs
from sparse_coding.run import run

register_configs()

QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# 2048 rows / 256 = 8 batches per epoch, 3 epochs, last.ckpt every 3 steps (mid-epoch)
TINY = ["data.dim=16", "data.n=2048", "data.n_val=1024", "data.batch_size=256", "trainer.max_epochs=3",
        "dictionary.mult=4", "trainer.checkpoint_every_n_steps=3"]
KILL_AT = 14  # global step 14: epoch 1, batch 6; the last checkpoint is from step 12 (epoch 1, 4 batches done)


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    """Stands in for a crash (or SIGKILL): stops the run after `step` optimizer steps, no clean shutdown."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=QUIET + overrides)


def outputs(path):
    metrics = json.loads((path / "metrics.json").read_text())
    return metrics, load_file(str(path / "dictionary.safetensors"))


def check_kill_and_resume(tmp_path, overrides, position):
    run(compose_cfg(overrides), tmp_path / "straight")
    with pytest.raises(Killed):
        run(compose_cfg(overrides), tmp_path / "killed", callbacks=[KillAt(KILL_AT)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 12
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]  # mid-epoch
    assert not (tmp_path / "killed" / "metrics.json").exists()

    run(compose_cfg(overrides + ["ckpt_path=last"]), tmp_path / "killed")
    want, want_phi = outputs(tmp_path / "straight")
    got, got_phi = outputs(tmp_path / "killed")
    for label in want_phi:
        assert torch.allclose(got_phi[label], want_phi[label], atol=1e-6, rtol=0), label
    for key in ("normalized_loss", "avg_coef_norm", "l0", "loss", "fvu", "lam", "dead_fraction"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["lam_history"] == pytest.approx(want["lam_history"], rel=1e-9)
    return want, got


def test_synthetic_run_killed_mid_epoch_resumes_exactly(tmp_path):
    check_kill_and_resume(tmp_path, TINY + ["data=sparse_linear", "data.active=4"], {"epoch": 1, "batches_done": 4})


def test_cache_run_killed_mid_epoch_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2560, 16)) * rng.random(16)).astype(np.float32)  # 2304 train rows: 9 batches/epoch
    np.save(tmp_path / "acts.npy", x)
    path = cache.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=1000)
    synthetic_only = ("data.dim=", "data.n=", "data.n_val=")  # a cache's data config has no such fields
    tiny = [a for a in TINY if not a.startswith(synthetic_only)]
    check_kill_and_resume(tmp_path, tiny + ["data=cache", f"data.path={path}", "data.shuffle_buffer=500"],
                          {"epoch": 1, "batches_done": 3})


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_loader_skips_exactly_the_batches_already_trained(tmp_path, workers):
    from sparse_coding.streaming import CacheDataModule

    x = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    path = cache.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=700)
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


def test_cache_init_rows_are_seeded_centred_training_rows(tmp_path):
    from sparse_coding.streaming import CacheDataModule

    x = (np.random.default_rng(2).standard_normal((2000, 8)) + 5).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    path = cache.import_array(tmp_path / "acts.npy", tmp_path / "cache", shard_rows=600)
    dm = CacheDataModule(path, batch_size=100, seed=0)
    rows = dm.init_rows(50, seed=7)
    assert rows.shape == (50, 8) and rows.dtype == torch.float32
    assert torch.equal(rows, dm.init_rows(50, seed=7))
    assert torch.equal(rows[:20], dm.init_rows(20, seed=7))  # a prefix: independent of k
    assert not torch.equal(rows, dm.init_rows(50, seed=8))
    val = torch.cat([b for b, _ in dm.val_dataloader()])
    centred = torch.from_numpy(x - dm.mean)
    matches = [(centred == r).all(dim=1).nonzero().flatten() for r in rows]
    assert all(len(m) == 1 for m in matches)  # every row is one row of the cache, centred
    val_hits = sum(bool((val == r).all(dim=1).any()) for r in rows)
    assert val_hits == 0  # and never a validation row
    assert len({int(m) for m in matches}) == 50  # no repeats while k <= training rows
