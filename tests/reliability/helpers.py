"""Helpers of the reliability suite: subprocesses under the network guard, cache digests, user nobody.
(one_line, error_lines and import_cache are the whole suite's: tests.helpers.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def child_env(**changes) -> dict:
    """The current environment (network guard included) with changes; a value None removes the key."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_py(args, *, env=None, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess under the network guard; never waits on stdin."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def file_digests(d: Path, skip=("verified.json",)) -> dict:
    """sha256 of every file under d (relative names), manifest.json without its timing field."""
    import hashlib
    import json

    out = {}
    for p in sorted(d.rglob("*")):
        if not p.is_file() or p.name in skip:
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            m = json.loads(data)
            m.pop("build_seconds", None)
            (m.get("source") or {}).pop("file", None)  # where an imported array came from
            data = json.dumps(m, sort_keys=True).encode()
        out[str(p.relative_to(d))] = hashlib.sha256(data).hexdigest()
    return out


def as_nobody() -> None:
    """preexec_fn: run the child as user nobody (the permission tests; root reads everything)."""
    os.setgid(65534)
    os.setuid(65534)
