"""The cache CLI (`python -m sparse_coding.cache build|import|verify`, sparse_coding.cache.cli): an import through a
real process, the composed config it shows, one line for every bad argument, and `--force` that never replaces
a run's folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sparse_coding.cache import cli, store
from sparse_coding.errors import ConfigError
from tests.helpers import ROOT, digests, fake_run_dir, one_line


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_import_user_array(tmp_path, suffix):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)
    src = tmp_path / f"acts{suffix}"
    if suffix == ".npy":
        np.save(src, x)
    elif suffix == ".pt":
        torch.save(torch.from_numpy(x), src)
    else:
        from safetensors.numpy import save_file

        save_file({"acts": x}, str(src))
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "import", "--input", str(src), "--output",
                           str(out), "--shard-rows", "300"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = store.read_manifest(out)
    assert m["kind"] == "imported" and m["layers"] == ["data"] and [s["rows"] for s in m["shards"]["data"]] == [300, 300, 300, 100]
    rows = np.concatenate([np.load(out / "layers" / "data" / s["file"]) for s in m["shards"]["data"]])
    np.testing.assert_array_equal(rows, x)
    assert m["stats"]["data"]["mean_sq_norm"] == pytest.approx(float((x.astype(np.float64) ** 2).sum(1).mean()))
    assert store.verify(out)["files"] == 4


def test_the_cache_cli_shows_its_composed_config():
    proc = subprocess.run([sys.executable, "-m", "sparse_coding.cache", "build", "--cfg", "model=minilm", "layer=2",
                           "corpus.max_tokens=1000"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "max_tokens: 1000" in proc.stdout and "name: minilm" in proc.stdout and "layer: 2" in proc.stdout


def test_the_cache_cli_answers_bad_flags_and_overrides_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    (tmp_path / "file").write_text("x")
    cases = [["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--shard-rows", "0"],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--shard-rows", "x"],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "file")],
             ["import", "--input", str(tmp_path / "nope.npy"), "--output", str(tmp_path / "o")],
             ["import", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o"), "--dtype", "int8"],
             ["build", "model=nosuch"], ["build", "model=minilm", "layer=1", "+trainer.gradient_clip_val=-1"],
             ["build", "model=minilm", "layer=[1"], ["verify", str(tmp_path / "file")], ["frobnicate"]]
    for argv in cases:
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (argv, err)


def test_cache_force_refuses_a_run_directory_and_touches_nothing(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((40, 4), np.float32))
    run = fake_run_dir(tmp_path / "run")
    before, siblings = digests(run), sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["import", "--input", str(tmp_path / "a.npy"), "--output", str(run), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a cache folder (a training run's folder)" in err[0], err
    assert digests(run) == before and sorted(p.name for p in tmp_path.iterdir()) == siblings  # not even a lock file
    # the same guard under the lock, where `cache build --force` swaps its new cache in
    with pytest.raises(ConfigError, match="not a cache folder") as e:
        with store.replacing(run):
            pytest.fail("replacing() yielded for a run directory")
    one_line(e.value)
    assert digests(run) == before
