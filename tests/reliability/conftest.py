"""Shared fixtures of the reliability suite (GitHub issue 6).

Every test here runs with the network unavailable: in-process, socket connections to anything but
loopback fail at once; subprocesses get the same guard through `offline_site/sitecustomize.py`
on PYTHONPATH. The guard is checked once before the first test (not a test of its own: it is the harness, and a
broken guard would let every offline test pass on a machine that happens to have no network). Hypothesis runs a
bounded number of examples with no deadline.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import ROOT, RANK_VARIABLES

SITE = Path(__file__).resolve().parent / "offline_site"
GUARD_MESSAGE = "network disabled in tests"

settings.register_profile("reliability", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_spec = importlib.util.spec_from_file_location("_offline_site", SITE / "sitecustomize.py")
offline_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_site)


def _guarded_env() -> dict:
    return {**os.environ, "SPARSE_CODING_NO_NETWORK": "1",
            "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="session", autouse=True)
def network_guard_is_on():
    """The guard refuses a public address and a public name lookup, here and in a subprocess, and leaves loopback."""
    with pytest.MonkeyPatch.context() as patch:
        offline_site.install(patch.setattr)
        for attempt in (lambda: socket.create_connection(("93.184.216.34", 443), timeout=30),
                        lambda: socket.getaddrinfo("huggingface.co", 443)):
            try:
                attempt()
            except OSError as e:
                if GUARD_MESSAGE not in str(e):
                    pytest.fail(f"the network guard did not refuse the attempt itself: {e}")
            else:
                pytest.fail("the network guard let a connection through")
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        socket.create_connection(server.getsockname(), timeout=10).close()  # loopback still works
        server.close()
    connect = "import socket; socket.create_connection(('1.1.1.1', 443), timeout=30)"
    proc = subprocess.run([sys.executable, "-c", connect], cwd=ROOT, env=_guarded_env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode == 0 or GUARD_MESSAGE not in proc.stderr:
        pytest.fail(f"the network guard is not active in subprocesses: {proc.stderr[-500:]}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Block non-loopback connections here and in every subprocess started by the test."""
    offline_site.install(monkeypatch.setattr)
    monkeypatch.setenv("SPARSE_CODING_NO_NETWORK", "1")
    monkeypatch.setenv("PYTHONPATH", _guarded_env()["PYTHONPATH"])
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
