"""Issue 6, storage: a build that cannot fit refuses to start and says how much it needs; a build that
runs out of space mid-way leaves no partial shard that looks complete, and resumes once space is free.

Both run against a real 2 MiB tmpfs (mounted by the test as root); they are skipped when mounting
is not permitted here.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from tests.helpers import error_lines
from tests.reliability.helpers import file_digests, run_py
from sparse_coding.cache import build, store
from sparse_coding.errors import DataError, StorageError


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_build_that_cannot_fit_refuses_to_start(small_disk, tmp_path):
    arr = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)  # 4 MiB of shards
    src = tmp_path / "acts.npy"
    np.save(src, arr)
    out = small_disk / "cache"
    proc = run_py(["-m", "sparse_coding.cache", "import", "--input", src, "--output", out], timeout=120)
    lines = error_lines(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: ") and "needs 4.0 MiB but only" in lines[-1] and "is free" in lines[-1], lines
    assert not list(small_disk.rglob("*.npy"))  # nothing was written


def test_running_out_of_space_mid_build_leaves_only_complete_shards(small_disk, tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((1024, 256)).astype(np.float32)  # 16 shards of 64 KiB: fits the 2 MiB disk
    out = small_disk / "cache"
    filler = small_disk / "other_process_data"
    calls = []

    def rows(lo, hi):  # after two shards another process eats the free space
        calls.append(lo)
        if len(calls) == 3:
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(free - 8192, 0))
        return arr[lo:hi]

    base = {"kind": "imported", "model": None, "corpus": None, "n_tokens": 1024}
    with pytest.raises(StorageError, match="no space left on device.*rerun the same command to resume"):
        build.write_array_cache(out, rows, 1024, 256, "data", base, shard_rows=64)
    layer = out / "layers" / "data"
    shards = sorted(layer.glob("shard_*.npy"))
    assert [p.name for p in shards] == ["shard_00000.npy", "shard_00001.npy"]
    for p in shards:  # what is there is complete: checksum sidecar matches, shape is right
        assert store.sha256_file(p) == (layer / (p.name + ".sha256")).read_text().strip()
        assert np.load(p, allow_pickle=False).shape == (64, 256)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no partial temporary file left behind
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest"):
        store.read_manifest(out)
    # space comes back: the same build resumes and ends identical to an undisturbed one
    filler.unlink()
    build.write_array_cache(out, lambda lo, hi: arr[lo:hi], 1024, 256, "data", base, shard_rows=64)
    ref = build.write_array_cache(tmp_path / "ref", lambda lo, hi: arr[lo:hi], 1024, 256, "data", base, shard_rows=64)
    assert file_digests(out) == file_digests(ref)
    assert store.verify(out)["files"] == 16
