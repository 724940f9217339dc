"""Helpers for the real-model tests: a tiny random GPT-2 saved to disk, run configs, tiny caches.

The tiny GPT-2's numbers are those of random weights: they test code paths, never a real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = (
    "The cat sat on the mat. In the beginning God created the heaven and the earth. "
    "Anarchism is a political philosophy that advocates self-governed societies. "
    "Numbers like 1539 and words like hierarchy, revolution and philosophy appear in articles."
)


def make_tiny_gpt2(out: Path, n_layer: int = 2, n_embd: int = 32) -> Path:
    """A randomly initialised GPT-2 (seeded) with a small byte-level BPE tokenizer, saved to `out`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 20, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=128, vocab_size=len(tok))
    model = GPT2Model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_cfg(overrides: list[str]):
    """The project's composed run config with overrides (Hydra compose API)."""
    from sparse_coding.config.compose import compose_config

    return compose_config(overrides)


def gpt2_cfg(tiny, cache_dir, *extra):
    """A tiny GPT-2's layer=all cache config over 16-token contexts of the KJV text (300 tokens)."""
    return run_cfg(["model=gpt2", f"model.path={tiny}", "layer=all", "corpus=kjv", "corpus.context_len=16",
                    "corpus.max_tokens=300", "corpus.batch_size=4", f"cache_dir={cache_dir}", *extra])


def forward_hidden(model, input_ids: np.ndarray):
    """Direct forward pass: every hidden state as numpy (n_ctx, L, d) arrays."""
    import torch

    with torch.inference_mode():
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states]
