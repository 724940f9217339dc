"""The loggers (sparse_coding.loggers): the W&B mode rule (offline unless asked, online under an agent) and the
flat keys of the W&B config. (W&B runs as users run them: tests/integration/test_wandb.py.)"""

from __future__ import annotations

from sparse_coding.loggers import flat_config, wandb_mode


def test_the_wandb_mode_rule():
    assert wandb_mode(None, {}) == "offline"  # the default: never needs a login
    assert wandb_mode(None, {"WANDB_MODE": "online"}) == "online"  # the environment beats the default
    assert wandb_mode(None, {"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_mode(None, {"WANDB_SWEEP_ID": "abc"}) == "online"  # a wandb agent's run reaches its server
    assert wandb_mode(None, {"WANDB_SWEEP_ID": "abc", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode("disabled", {"WANDB_MODE": "online", "WANDB_SWEEP_ID": "abc"}) == "disabled"  # explicit config
    assert flat_config({"data": {"dim": 8, "name": "x"}, "layer": 3, "tags": [1]}) == {
        "data.dim": 8, "data.name": "x", "layer": 3, "tags": [1]}
