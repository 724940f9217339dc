"""The activation cache: sharded memory-mappable `.npy` files per layer, checksummed, resumable.

- `store`: the folder format (manifest, shards, statistics, verification, the build lock);
  reading a cache needs only this module (numpy, no torch).
- `build`: the builders (a model's hidden states over a corpus, token embeddings, a user's array)
  and `ensure_cache(cfg)`, the cache folder of a run config, built when missing.
- `cli`: `python -m sparse_coding.cache build|import|verify` (console script `sparse-coding-cache`).

Import each name from the module that defines it; this package re-exports nothing.
"""
