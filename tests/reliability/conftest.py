"""Shared fixtures of the reliability suite (GitHub issue 6).

Every test here runs with the network unavailable: in-process, socket connections to anything but
loopback fail at once; subprocesses get the same guard through `offline_site/sitecustomize.py`
on PYTHONPATH. Hypothesis runs a bounded number of examples with no deadline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "offline_site"

settings.register_profile("reliability", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_spec = importlib.util.spec_from_file_location("_offline_site", SITE / "sitecustomize.py")
offline_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_site)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Block non-loopback connections here and in every subprocess started by the test."""
    offline_site.install(monkeypatch.setattr)
    monkeypatch.setenv("SPARSE_CODING_NO_NETWORK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
