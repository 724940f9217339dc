"""A run's lifecycle: owning its directory, checkpointing, resuming, and what SIGTERM or Ctrl-C do.

- `rundir`: the run directory's lock (`own_run_dir`), `start_run` (a finished run is never replaced),
  `write_hydra_files`.
- `signals`: SIGTERM and Ctrl-C become `RunInterrupted` (one line, exit 2) after the checkpoint is saved.
- `checkpoint`: `AtomicCheckpoint`, the run's ModelCheckpoint (atomic writes, a checkpoint on SIGTERM).
- `resume`: `resume_checkpoint`, the checkpoint `ckpt_path` names, refused when it cannot continue this run.

Imports point one way: signals <- rundir <- resume; signals <- checkpoint.
"""
