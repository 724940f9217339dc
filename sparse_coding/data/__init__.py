"""The rows a run trains on and measures: synthetic sets and cached activations, as Lightning data modules.

- `synthetic`: the generators with known ground truth and the controls (torch only, no Lightning).
- `synthetic_datamodule`: `SyntheticDataModule` (a fixed sample) and `FreshSyntheticDataModule` (fresh batches),
  with an exact DDP split of every global batch.
- `cache_datamodule`: `CacheDataModule`, one cached layer split into training, held-out and in-sample rows.
- `row_stream`: `RowStream`, one rank's memory-mapped, shuffled stream of a split's rows.
- `loader`: the run's data position and the one resumable training loader both data modules use.
- `preprocess`: the massive-activation remedies (`data.drop_positions`, `data.max_norm_ratio`, `data.normalize`).

Imports point one way: loader, synthetic, preprocess <- synthetic_datamodule, row_stream <- cache_datamodule.
"""
