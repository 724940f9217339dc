"""The synthetic data modules (sparse_coding.data.synthetic_datamodule): fresh batches new every batch and epoch and
split exactly across ranks, init rows, and the in-sample rows of a fixed sample (docs/method.md §5.3, §7)."""

import torch

from sparse_coding.data.synthetic_datamodule import FreshSyntheticDataModule, SyntheticDataModule


def test_fresh_batches_are_new_each_batch_and_epoch_and_split_exactly_across_ranks():
    dm = FreshSyntheticDataModule("sparse_linear", 8, n=100, n_val=40, seed=1, active=3, batch_size=32)
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(0)
    epoch0 = [dm.train_dataloader().dataset[k] for k in sampler]
    sampler.set_epoch(1)
    epoch1 = [dm.train_dataloader().dataset[k] for k in sampler]
    assert [len(b) for b in epoch0] == [32, 32, 32, 4]  # an epoch is data.n rows
    assert not torch.equal(epoch0[0], epoch0[1]) and not torch.equal(epoch0[0], epoch1[0])
    # two ranks: contiguous shares of the same global batch
    from sparse_coding.data.synthetic_datamodule import FreshBatchSampler, FreshBatches

    data = FreshBatches(dm.source, dm.seed, 1.0)
    shares = [[data[k] for k in FreshBatchSampler(100, 32, shuffle=False, seed=1, rank=r, world_size=2)]
              for r in (0, 1)]
    for whole, a, b in zip(epoch0, *shares):
        assert torch.equal(torch.cat([a, b]), whole)
    # in-sample rows are the first rows trained on; the held-out set is separate
    assert torch.equal(dm.in_sample_x, torch.cat(epoch0)[:40])
    assert not torch.equal(dm.val_x, dm.in_sample_x)


def test_init_rows_do_not_depend_on_how_many_are_asked_for():
    dm = FreshSyntheticDataModule("gaussian", 8, n=64, n_val=16, seed=0)
    assert torch.equal(dm.init_rows(5000, seed=2)[:100], dm.init_rows(100, seed=2))


def test_fixed_sample_in_sample_rows_are_training_rows_spread_over_the_set():
    dm = SyntheticDataModule("sparse_linear", 8, n=1000, n_val=200, seed=0, active=3)
    train = {tuple(r) for r in dm.train_x.tolist()}
    assert len(dm.in_sample_x) == 200 and all(tuple(r) in train for r in dm.in_sample_x.tolist())
    held = {tuple(r) for r in dm.val_x.tolist()}
    assert not any(tuple(r) in held for r in dm.in_sample_x.tolist())
