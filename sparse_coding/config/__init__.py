"""The run configuration: its schema, the checks, and the plan the run is built from.

- `schema`: the dataclasses Hydra composes conf/ into; the only place a default is written.
- `keys`: the names a config may hold (and the Trainer's arguments); the closest valid key for a typo.
- `overrides`: command-line overrides checked before Hydra composes them.
- `preflight`: what Hydra would stop on with a traceback (interpolations, the run directory), checked first.
- `plan`: `RunPlan`, a composed config parsed once: the dictionary bank, the data, trainer.* and callbacks.*.
- `checks`: `validate(cfg)`: every value checked, the plan built and returned.
- `resources`: GPUs, CPU cores, memory; the memory a plan needs.
- `trainer`: the Lightning Trainer, its callbacks and the ddp_spawn launcher, built from a plan (imports torch).

Every module but `trainer` is cheap to import: no torch, Lightning or transformers. Imports point one
way: schema <- keys <- overrides <- preflight; schema <- plan <- resources <- checks; trainer reads
keys, overrides and plan.
"""
