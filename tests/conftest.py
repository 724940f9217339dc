import os
import sys
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT


def run_train(args, cwd=ROOT, timeout=600, env=None):
    """Run `python train.py ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        full_env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_gpt2_cache(tmp_path_factory):
    """(model folder, cache folder): a tiny random GPT-2's layer=all cache over 16-token contexts of the KJV text,
    no special tokens (row i is at context position i % 16), shards of 256 rows."""
    from sparse_coding.cache import build
    from tinymodels import make_tiny_gpt2, run_cfg

    tiny = make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))
    cfg = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=all", "corpus=kjv", "corpus.context_len=16",
                   "corpus.max_tokens=1600", "corpus.batch_size=4", f"cache_dir={tmp_path_factory.mktemp('cache')}"])
    return tiny, build.ensure_cache(cfg, shard_rows=256)
