"""Entry point: compose the Hydra config, validate it (fast, before heavy imports), run."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparse_coding.config import register_configs, validate
from sparse_coding.errors import ConfigError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        from sparse_coding.run import run

        run(cfg, Path(cfg.out_dir or HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
