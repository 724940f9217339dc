"""The cache's folder format (sparse_coding.cache.store): shard files written as np.save writes them (in one
copy, with statistics summed while writing), verify against the manifest, and the build lock (non-blocking polls,
a message that says what it waits for)."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sparse_coding.cache import store
from sparse_coding.errors import DataError, StorageError
from tests.helpers import ROOT, import_cache, one_line


@pytest.mark.parametrize("shape,dtype", [((5, 3), np.float32), ((32768, 384), np.float16), ((1, 1), np.float32),
                                         ((0, 7), np.float32), ((3, 100_000), np.float16)])
def test_shard_bytes_are_np_save_bytes(tmp_path, shape, dtype):
    arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    digest = store.write_shard(tmp_path / "shard_00000.npy", arr)
    assert (tmp_path / "shard_00000.npy").read_bytes() == buf.getvalue()
    assert digest == store.sha256_file(tmp_path / "shard_00000.npy")
    assert (tmp_path / "shard_00000.npy.sha256").read_text().strip() == digest
    # written as the rows come, in pieces: the same file
    streamed = store.ShardFile(tmp_path / "shard_00001.npy", *shape, dtype)
    for lo in range(0, shape[0] + 1, max(1, shape[0] // 3)):
        streamed.write(arr[lo : lo + max(1, shape[0] // 3)])
    assert streamed.finish() == digest and (tmp_path / "shard_00001.npy").read_bytes() == buf.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.npy", "shard_00000.npy.sha256",
                                                         "shard_00001.npy", "shard_00001.npy.sha256"]


def test_a_shard_starts_going_to_disk_as_it_is_written(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES the kernel is asked to start writing the file out (so a build's last fsync has little
    left), the bytes already written are in the file by then, and the shard is unchanged by it."""
    sizes = []
    monkeypatch.setattr(store.ShardFile, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(store, "start_writeback", lambda fd: sizes.append(os.fstat(fd).st_size))
    arr = np.arange(100 * 64, dtype=np.float32).reshape(100, 64)  # 25,600 bytes of rows
    shard = store.ShardFile(tmp_path / "shard_00000.npy", 100, 64, np.float32)
    for lo in range(0, 100, 10):
        shard.write(arr[lo : lo + 10])  # 2,560 bytes a write
    # 128 header bytes, then a writeback on the first write that takes the bytes not yet sent to 4,096 or more
    assert sizes == [128 + 2 * 2560, 128 + 4 * 2560, 128 + 6 * 2560, 128 + 8 * 2560, 128 + 10 * 2560]
    shard.finish()
    np.testing.assert_array_equal(np.load(tmp_path / "shard_00000.npy"), arr)


def test_starting_writeback_is_a_hint_that_returns(tmp_path):
    """On Linux the C library's sync_file_range is found and accepted; on a file, a pipe (which it refuses) or
    elsewhere, start_writeback returns without raising."""
    if sys.platform.startswith("linux"):
        assert store._SYNC_FILE_RANGE is not None
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 10_000)
        f.flush()
        store.start_writeback(f.fileno())
    r, w = os.pipe()
    try:
        store.start_writeback(w)
    finally:
        os.close(r), os.close(w)


def test_a_shard_file_refuses_rows_it_does_not_hold(tmp_path):
    with pytest.raises(ValueError, match="more bytes than the shard holds"):
        store.ShardFile(tmp_path / "shard_00000.npy", 4, 3, np.float32).write(np.zeros((5, 3), np.float32))
    short = store.ShardFile(tmp_path / "shard_00000.npy", 4, 3, np.float32)
    short.write(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="short of the shard"):
        short.finish()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_statistics_summed_while_writing_equal_those_read_back(tmp_path):
    """The same bits whether the shards are added from memory or read from disk, across shards and chunks,
    non-finite rows included."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((r, 24)).astype(np.float32) * 30 for r in (70, 70, 33)]
    arrays[1][5, 3] = np.nan
    arrays[2][0, 0] = np.inf
    running = store.LayerStats(24, chunk=16)
    for i, a in enumerate(arrays):
        store.write_shard(tmp_path / "layers" / "0" / store.shard_name(i), a)
        running.add(a, store.shard_name(i))
    files = [tmp_path / "layers" / "0" / store.shard_name(i) for i in range(3)]
    from_disk = store.layer_stats(files, [70, 70, 33], 24, "float32", chunk=16)
    got = running.result()
    assert got.pop("mean").tobytes() == from_disk.pop("mean").tobytes()
    assert got == from_disk and got["n_nonfinite"] == 2 and got["first_nonfinite"] == {"file": "shard_00001.npy", "row": 5}



def test_corruption_is_detected(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    clean = import_cache(tmp_path / "clean", x, shard_rows=64)
    path = tmp_path / "c"
    shutil.copytree(clean, path)
    shard = path / "layers" / "data" / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one value
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00002\.npy: sha256 does not match"):
        store.verify(path)
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "verify", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "shard_00002.npy" in proc.stderr
    shard.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(DataError, match=r"shard_00002\.npy: cannot be read as \.npy, truncated"):
        store.verify(path)
    shutil.copy(clean / "layers" / "data" / "shard_00002.npy", shard)
    store.verify(path)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"]["data"][0]["rows"] = 63
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="shards of layer data hold 299 rows, the manifest says 300"):
        store.verify(path)
    m["shards"]["data"][0]["rows"] = 64
    m["d"] = 31
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard_00000\.npy: shape \(64, 32\) float32 does not match .*\(64, 31\)"):
        store.verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        store.verify(path)


def test_a_manifest_with_stats_or_mean_of_the_wrong_type_or_shape_fails_verify(tmp_path):
    path = import_cache(tmp_path / "c", np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    good = json.loads((path / "manifest.json").read_text())
    for mutate in (lambda m: m["stats"]["data"].update(mean_sq_norm="big"),
                   lambda m: m["stats"]["data"].update(n_finite=-3),
                   lambda m: m["stats"]["data"].update(first_nonfinite=[1]),
                   lambda m: m.update(stats=[1, 2])):
        m = json.loads(json.dumps(good))
        mutate(m)
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError) as e:
            store.verify(path)
        one_line(e.value)
    (path / "manifest.json").write_text(json.dumps(good))
    mean = path / "layers" / "data" / "mean.npy"
    np.save(mean, np.zeros(5))  # wrong shape, checksum updated to match
    good["stats"]["data"]["mean_sha256"] = store.sha256_file(mean)
    (path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match="mean row is \\(5,\\)"):
        store.verify(path)


def test_build_lock_serialises_builders_in_process(tmp_path):
    """The lock itself: a second holder waits until the first lets go."""
    import threading

    out = tmp_path / "c"
    order = []
    with store.build_lock(out):
        t = threading.Thread(target=lambda: (store.build_lock(out).__enter__(), order.append("second")))
        # flock locks belong to open file descriptions, so a second open in another thread waits too
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(timeout=10)
    assert order == ["first done", "second"]


def test_the_cache_lock_wait_never_blocks_in_flock_and_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    calls = []
    real = fcntl.flock

    def recording(fd, op):
        calls.append(op)
        if op & fcntl.LOCK_EX and not op & fcntl.LOCK_NB:
            raise AssertionError("a blocking flock(2): a Ctrl-C that lands just before it is lost")
        return real(fd, op)

    out = tmp_path / "c"
    with store.build_lock(out):  # this open file description holds the lock, with our pid in the lock file
        monkeypatch.setattr(store.fcntl, "flock", recording)
        with pytest.raises(StorageError, match="gave up waiting") as e:
            with open(tmp_path / ".c.lock", "a+b") as f:
                store.wait_for_lock(f, lambda holder: f"[cache] waiting for it{holder}", timeout=0.3)
        one_line(e.value)
        monkeypatch.undo()
    # a blocking flock(2) entered just after a Ctrl-C was handled waits forever: only non-blocking attempts
    assert len(calls) >= 2 and all(op & fcntl.LOCK_NB for op in calls), calls
    assert capsys.readouterr().err.strip() == f"[cache] waiting for it (pid {os.getpid()})"


def test_the_cache_lock_wait_ends_when_the_holder_lets_go(tmp_path, capsys):
    out = tmp_path / "c"
    released = threading.Event()
    got = []

    def second():
        with store.build_lock(out):
            got.append(released.is_set())

    with store.build_lock(out):
        t = threading.Thread(target=second)
        t.start()
        for _ in range(1200):  # at most a minute for the thread to start waiting
            if "waiting for it to finish" in capsys.readouterr().err:
                break
            t.join(timeout=0.05)
        else:
            pytest.fail("the second builder never said it waits")
        released.set()
    t.join(timeout=60)
    assert got == [True]


def test_disk_full_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """The error text a user sees when the disk fills (ENOSPC from the write itself)."""
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_bytes", full)  # write_shard lives in cache.store
    with pytest.raises(StorageError) as info:
        store.write_shard(tmp_path / "shard_00000.npy", np.zeros((4, 4), np.float32))
    assert "\n" not in str(info.value) and "no space left on device" in str(info.value)
