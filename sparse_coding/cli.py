"""The training entry point (`python train.py`, console script `sparse-coding-train`): check the
overrides (sparse_coding.config.overrides, .preflight), compose the Hydra config from the package's conf/,
validate it into the run's plan (fast, before heavy imports), run."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sparse_coding.config.checks import check_trainable, validate
from sparse_coding.config.schema import register_configs
from sparse_coding.errors import SparseCodingError
from sparse_coding.paths import config_dir

register_configs()


def train() -> None:
    """`python train.py OVERRIDES`: a misspelled key or a value of the wrong type is one line (exit 2) before
    Hydra composes; a Trainer argument beyond the schema is passed on as `++trainer.ARG=VALUE`."""
    from sparse_coding.config.overrides import check_command_line

    try:
        sys.argv[1:] = check_command_line(sys.argv[1:])
        from sparse_coding.config.preflight import check_command_line as before_hydra

        before_hydra(sys.argv[1:])  # what Hydra itself would stop on with a traceback (run dir, interpolations)
    except SparseCodingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _compose_and_run()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _compose_and_run(cfg: DictConfig) -> None:
    try:
        plan = validate(cfg)
        from hydra.core.hydra_config import HydraConfig

        check_trainable(cfg)
        from sparse_coding.lifecycle.rundir import start_run, write_hydra_files

        out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        with start_run(out_dir, cfg.ckpt_path, cfg.overwrite):  # in use, or a finished run: refused, nothing written
            write_hydra_files(cfg)  # .hydra/ (conf/train.yaml: hydra.output_subdir=null) only for a run that starts
            from sparse_coding.run import run  # torch and Lightning: after the checks, so a refusal is quick

            run(cfg, out_dir, plan=plan)
    except SparseCodingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
