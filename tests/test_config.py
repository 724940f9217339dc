"""The run configuration: every default and group option composes to the values it had before issue 21 item 1."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from sparse_coding.cache import compose_config

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "fixtures" / "composed_config.json"  # composed before the schema became the one source


def test_composed_configs_are_the_snapshot():
    """Every default and group option composes to the values it had when defaults lived in three places
    (the JSON text compared, so an int that became a float shows)."""
    for case, expected in json.loads(SNAPSHOT.read_text()).items():
        got = OmegaConf.to_container(compose_config(case.split()), resolve=True)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True), case or "(defaults)"
