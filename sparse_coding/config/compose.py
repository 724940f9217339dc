"""`compose_config`: a run config (conf/train.yaml) composed with Hydra's compose API from override strings.

Used where a run is composed without `train.py`'s `hydra.main`: `sparse_coding.api`, the cache CLI, the
experiments runner and the tests. Nothing is checked here (sparse_coding.config.checks does that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def compose_config(overrides: list[str], config_dir: Optional[Path] = None, config_name: str = "train"):
    """The project's run config (conf/train.yaml) with Hydra-style overrides, via the compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparse_coding.config.schema import register_configs

    register_configs()
    from sparse_coding.paths import config_dir as package_config_dir

    config_dir = Path(config_dir or package_config_dir())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
