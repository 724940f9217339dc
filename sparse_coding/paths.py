"""Where the package's Hydra configs and installed packages are, and this process's run id (cheap: no heavy imports)."""

from __future__ import annotations

import importlib.util
import os
import secrets
import string
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
_ALPHABET = string.ascii_lowercase + string.digits
_run_id: Optional[str] = None


def config_dir() -> Path:
    """The `conf/` folder: shipped inside the package when installed, `conf/` beside it in a checkout."""
    installed = PACKAGE_DIR / "conf"
    if (installed / "train.yaml").is_file():
        return installed
    return PACKAGE_DIR.parent / "conf"


def run_id() -> str:
    """This process's run id: a W&B agent's WANDB_RUN_ID, else 8 random characters (fixed for the process).

    It names the default run directory (`outputs/DATE/TIME-ID`), so two runs started in the same
    second never share a directory, and it is the W&B run id of the process's first run.
    """
    global _run_id
    if _run_id is None:
        _run_id = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return _run_id


def package_dir(import_name: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
