"""Hostile and careless use (GitHub issue 13): random combinations of hostile settings through compose and
validate get exactly the verdict the rules give, and a refusal is one line.

The unit tests of each class of failure are beside their modules (tests/cache, tests/lifecycle, tests/config,
tests/test_outputs.py, tests/test_corpus.py); real processes and real signals live in test_hostile_processes.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_coding.config import resources
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError
from tests.helpers import QUIET, one_line

settings.load_profile("reliability")

TINY = [*QUIET, "data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64", "dictionary.mult=2",
        "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2"]

TRAINER_VALUES = {
    "trainer.devices": ["1", "2", "0", "-1", "auto", "[0]", "[0,0]", "999", "x", "null", "1.5"],
    "trainer.accelerator": ["cpu", "gpu", "cuda", "tpu", "mps", "auto", "x"],
    "trainer.precision": ["32-true", "32", "16-mixed", "bf16-mixed", "16", "64", "x"],
    "trainer.strategy": ["auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "x"],
    "trainer.num_nodes": ["1", "0", "-1", "2", "x"],
    "trainer.limit_train_batches": ["0", "0.0", "0.5", "1", "3", "1.5", "-1", "nan", "inf", "null"],
    "trainer.check_val_every_n_epoch": ["1", "0"],  # not a setting: the cadence is convergence.eval_every
    "trainer.log_every_n_steps": ["1", "0", "-5", "x"],
    "trainer.max_epochs": ["1", "0", "-1", "-2"], "trainer.max_steps": ["-1", "0", "5", "-7"],
    "trainer.deterministic": ["true", "false", "warn"],
    "+trainer.gradient_clip_val": ["1"], "+trainer.accumulate_grad_batches": ["2"], "+dictionary.foo": ["1"],
    "+bogus": ["1"], "dictionary.mult": ["1", "2", "[2,2]", "100000", "0"],
    "dictionary.lam": ["auto", "0.1", "[0.1,0.1]", "[0.1,auto]", "-1", "nan"],
    "data.n_val": ["1", "2", "0"], "data.batch_size": ["1", "1000000000"], "solver.eval_batch_size": ["1", "1000000000"],
}

# The machine the verdicts below are for, whatever machine runs the test: 2 CPU cores, no GPU, no MPS or TPU, no
# multi-node launcher, 16 GiB of memory available.
CORES, MEMORY = 2, 16 << 30

# The rules of docs/reliability.md ("Every trainer.* setting is checked without torch", memory, banks, held-out
# samples), stated independently of sparse_coding.config: each of these values is refused whatever else is set.
REFUSED = {
    "trainer.devices": {"0", "-1", "[0]", "[0,0]", "x", "null", "1.5"},  # a count >= 1, auto, or GPU indices
    "trainer.accelerator": {"gpu", "cuda", "mps", "tpu", "x"},  # each only where the machine has it
    "trainer.precision": {"16-mixed", "bf16-mixed", "16", "64", "x"},  # 32-bit only
    "trainer.strategy": {"fsdp", "deepspeed", "x"},  # every rank holds the whole Phi
    "trainer.num_nodes": {"0", "-1", "2", "x"},  # >= 1, and more than 1 only under a launcher
    "trainer.limit_train_batches": {"0", "0.0", "1.5", "-1", "nan", "inf"},  # > 0: a fraction or whole batches
    "trainer.check_val_every_n_epoch": {"1", "0"},
    "trainer.log_every_n_steps": {"0", "-5", "x"},
    "trainer.max_epochs": {"-2", "0"}, "trainer.max_steps": {"-7", "0"},  # >= 1, or -1: no limit
    "trainer.deterministic": {"warn"},  # a boolean
    "+trainer.accumulate_grad_batches": {"2"},  # set by the run (manual optimization)
    "+dictionary.foo": {"1"}, "+bogus": {"1"},  # no such setting
    "dictionary.mult": {"[2,2]", "100000", "0"},  # the same dictionary twice; a 800k x 800k Gram matrix; < 1
    "dictionary.lam": {"[0.1,0.1]", "-1", "nan"},  # twice; not a finite number > 0
    "data.n_val": {"1", "0"},  # fvu needs two held-out samples
    "data.batch_size": {"1000000000"}, "solver.eval_batch_size": {"1000000000"},  # far beyond 16 GiB
}


def expected_accepted(chosen: dict) -> bool:
    """The verdict of the rules for the chosen settings (over TINY) on the machine above."""
    if any(value in REFUSED.get(key, ()) for key, value in chosen.items()):
        return False
    devices = chosen.get("trainer.devices", "1")  # left: 1, auto (one process on CPU), 2 or 999
    processes = 1 if devices in ("1", "auto") else int(devices)
    if processes > CORES and chosen.get("trainer.accelerator", "auto") not in ("mps", "tpu"):
        return False  # more processes than cores (Lightning itself counts mps and tpu devices)
    return processes == 1 or chosen.get("trainer.strategy", "auto") in ("ddp", "ddp_spawn")  # several need DDP


@settings(max_examples=150)
@given(st.dictionaries(st.sampled_from(sorted(TRAINER_VALUES)), st.integers(0, 10), min_size=1, max_size=4))
def test_random_hostile_overrides_get_the_rules_verdict_in_one_line(monkeypatch, choice):
    for name, value in (("visible_gpus", 0), ("cpu_count", CORES), ("available_memory", MEMORY),
                        ("multi_node_launcher", False), ("has_accelerator", False)):
        monkeypatch.setattr(resources, name, lambda *a, _value=value, **k: _value)
    chosen = {k: TRAINER_VALUES[k][i % len(TRAINER_VALUES[k])] for k, i in choice.items()}
    overrides = TINY + [f"{k}={v}" for k, v in chosen.items()]
    try:
        cfg = compose_config(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's own type errors: Hydra prints them without a traceback
        assert type(e).__module__.startswith(("hydra", "omegaconf")), (overrides, e)
        accepted = False
    else:
        try:
            validate(cfg)
            accepted = True
        except ConfigError as e:
            one_line(e)
            accepted = False
    assert accepted == expected_accepted(chosen), (chosen, "accepted" if accepted else "refused")
