"""The whole suite's environment and its shared fixtures: a tiny random GPT-2 and its cache, one short finished run,
an empty Hugging Face home, a FIFO."""

import os

import pytest
import torch

# Tests never touch a network or wait on a login prompt.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One intra-op thread per test process: the suite's problems are small, and on a shared 2-core
# machine OpenMP threads spin against each other (measured: a 512 x 512 solve 17x slower under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """The folder of a tiny random GPT-2 (2 layers, d=32, seeded; tests.tinymodels), made once. Tests read it and
    may copy or link its files; none writes into it."""
    from tests.tinymodels import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2_cache(tiny_gpt2, tmp_path_factory):
    """(model folder, cache folder): the tiny GPT-2's layer=all cache over 16-token contexts of the KJV text,
    no special tokens (row i is at context position i % 16), shards of 256 rows."""
    from sparse_coding.cache import build
    from tests.tinymodels import run_cfg

    cfg = run_cfg(["model=gpt2", f"model.path={tiny_gpt2}", "layer=all", "corpus=kjv", "corpus.context_len=16",
                   "corpus.max_tokens=1600", "corpus.batch_size=4", f"cache_dir={tmp_path_factory.mktemp('cache')}"])
    return tiny_gpt2, build.ensure_cache(cfg, shard_rows=256)


TINY_RUN = ["data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64", "dictionary.mult=2",
            "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """(cfg, run folder, module): one real two-epoch run (4 batches an epoch, a step checkpoint every 2 steps) and
    its trained module. Tests copy the folder before they change anything in it."""
    import pytorch_lightning as pl

    from tests.helpers import compose

    out = tmp_path_factory.mktemp("finished_run")
    modules = []

    class Keep(pl.Callback):
        def on_fit_end(self, trainer, module):
            modules.append(module)

    from sparse_coding.run import run

    cfg = compose(TINY_RUN)
    run(cfg, out, callbacks=[Keep()])
    return cfg, out, modules[0]


@pytest.fixture
def fifo(tmp_path):
    """A named pipe: opening it to read blocks until a writer comes (tests.helpers.unblock_after is the guard)."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    """An empty Hugging Face home: no cached models."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


@pytest.fixture(scope="session")
def resume_cache(tmp_path_factory):
    """The resume tests' cache: 2,560 rows of width 16 imported in shards of 1,000 (2,304 training rows: 9 batches
    of 256 an epoch, so a cache's epochs fall elsewhere than the synthetic runs' 8), its source array beside it
    (acts.npy). Tests that change a cache copy it first."""
    import numpy as np

    from sparse_coding.cache import build

    folder = tmp_path_factory.mktemp("resume_cache")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2560, 16)) * rng.random(16)).astype(np.float32)
    np.save(folder / "acts.npy", x)
    return build.import_array(folder / "acts.npy", folder / "cache", shard_rows=1000)
