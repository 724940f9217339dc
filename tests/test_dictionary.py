"""The saved dictionary (sparse_coding.dictionary): SparseDictionary as a torch module (issue 20 item 5), its files
and their validation (issue 22 item 8), and a run's bank loaded back with its cache's mean.

Mostly no training: a dictionary is built from a random unit-norm Φ; a run's files are written by the run's own
writer (save_dictionaries) from a stand-in module. One short run on a cache checks the whole way back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sparse_coding.cache.build import DEFAULT_SHARD_ROWS
from sparse_coding.data.cache_datamodule import CacheDataModule
from sparse_coding.dictionary import FILE, META_KEY, SIDECAR, SparseDictionary, save_dictionaries
from sparse_coding.errors import ConfigError, DataError
from sparse_coding.solver import SolveResult, solve
from tests.helpers import assert_same_metrics, import_cache, train

D, MULT = 8, 4
M = D * MULT


def unit_phi(seed: int = 0, d: int = D, m: int = M, dtype=torch.float32) -> torch.Tensor:
    phi = torch.randn(d, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (phi / phi.norm(dim=0)).to(dtype)


def make(mean: bool = True, **kwargs) -> SparseDictionary:
    gen = torch.Generator().manual_seed(1)
    kwargs.setdefault("label", "mult4_lam0.3")
    return SparseDictionary(unit_phi(), 0.3, mean=torch.randn(D, generator=gen) + 2 if mean else None,
                            max_steps=64, tol=1e-2, batch_size=5, dict_mult=MULT, **kwargs)


def activations(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed)) * 2 + 2


# ---- a torch module ---------------------------------------------------------------------------


def test_it_is_a_module_with_phi_and_mean_as_buffers():
    d = make()
    assert isinstance(d, torch.nn.Module)
    assert set(d.state_dict()) == {"phi", "mean"} and not list(d.parameters())
    assert set(make(mean=False).state_dict()) == {"phi"} and make(mean=False).mean is None

    d64 = make().to(torch.float64)
    assert d64.phi.dtype == d64.mean.dtype == torch.float64
    assert make(mean=False).double().mean is None

    other = SparseDictionary(unit_phi(seed=9), 0.3, mean=torch.zeros(D), dict_mult=MULT)
    other.load_state_dict(d.state_dict())
    assert torch.equal(other.phi, d.phi) and torch.equal(other.mean, d.mean)
    with pytest.raises(RuntimeError):  # a dictionary without a mean has no place for one
        make(mean=False).load_state_dict(d.state_dict())
    assert "mult4_lam0.3: d=8, m=32" in repr(d)


def test_any_leading_shape_and_forward_is_the_reconstruction():
    d = make()
    x = activations(2, 3)
    alpha = d.encode(x)
    assert alpha.shape == (2, 3, M) and (alpha >= 0).all() and (alpha > 0).any()
    assert torch.equal(alpha.reshape(6, M), d.encode(x.reshape(6, D)))  # rows are coded independently
    assert torch.equal(d.encode(x[1, 2]), alpha[1, 2])  # a single vector (d,)
    x_hat = d(x)
    assert x_hat.shape == (2, 3, D) and x_hat.dtype == torch.float32
    assert torch.allclose(x_hat, d.decode(alpha), atol=1e-5)
    assert torch.allclose(d.decode(alpha.reshape(6, M)).reshape(2, 3, D), x_hat, atol=1e-5)
    assert (x_hat - x).norm() < (d.mean - x).norm()  # it reconstructs more than the mean
    assert d.encode(torch.zeros(0, D)).shape == (0, M) and d(torch.zeros(0, D)).shape == (0, D)
    clusters = torch.tensor([[0, 0, 1], [1, 2, 2]])
    assert d.measure(x, clusters) == d.measure(x.reshape(6, D), clusters.reshape(6))
    with pytest.raises(ConfigError, match=r"\(\.\.\., 8\)"):
        d.encode(torch.zeros(3, D + 1))
    with pytest.raises(ConfigError, match="one id per row"):
        d.measure(x, torch.zeros(5))


def test_float64_stays_float64_and_agrees_with_float32():
    d = make()
    x = activations(4, 7)
    a32, a64 = d.encode(x), d.encode(x.double())
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64 and d.phi.dtype == torch.float32
    assert torch.allclose(a64, a32.double(), atol=2e-6, rtol=1e-5)
    assert d(x.double()).dtype == torch.float64 and d.decode(a64).dtype == torch.float64
    assert torch.allclose(d(x.double()), d(x).double(), atol=2e-6, rtol=1e-5)
    m32, m64 = d.measure(x), d.measure(x.double())
    assert m64["normalized_loss"] == pytest.approx(m32["normalized_loss"], rel=1e-5)
    # a float64 module codes float32 input in float32: the input's dtype decides
    d64 = make().double()
    assert d64.encode(x).dtype == torch.float32 and torch.equal(d64.encode(x), a32)
    assert d.encode(x.numpy().astype(np.float64)).dtype == torch.float64  # numpy input too
    assert d.encode(torch.ones(3, D, dtype=torch.int64)).dtype == torch.float32  # integers: Φ's dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype):
    d = make()
    x = activations(3).to(dtype)
    for call in (d.encode, d.forward, d.measure, d.preprocess):
        with pytest.raises(ConfigError, match="half precision"):
            call(x)
    with pytest.raises(ConfigError, match="half precision"):
        d.decode(torch.zeros(3, M, dtype=dtype))


def test_sparse_encode_equals_dense_encode(monkeypatch):
    d = make()
    x = activations(2, 3)
    dense = d.encode(x)
    with monkeypatch.context() as patch:  # the sparse codes come from the solver's CSR rows, never a dense α
        patch.setattr(SolveResult, "alpha", property(lambda self: pytest.fail("dense alpha built")))
        sparse = d.encode(x, sparse=True)
    assert sparse.layout == torch.sparse_coo and sparse.shape == (2, 3, M) and sparse.is_coalesced()
    assert sparse._nnz() == int((dense > 0).sum())
    assert torch.equal(sparse.to_dense(), dense)
    assert torch.equal(d.encode(x.double(), sparse=True).to_dense(), d.encode(x.double()))
    flat = d.encode(x.reshape(6, D), sparse=True)
    assert flat.shape == (6, M) and torch.equal(flat.to_dense(), dense.reshape(6, M))
    # decode takes the sparse codes (COO of any shape, 2-D CSR) as well
    assert torch.allclose(d.decode(sparse), d.decode(dense), atol=1e-5)
    assert torch.allclose(d.decode(flat.to_sparse_csr()), d.decode(dense.reshape(6, M)), atol=1e-5)
    assert torch.allclose(d.decode(torch.zeros(2, M).to_sparse()), d.mean.expand(2, D))


# ---- save_pretrained / from_pretrained ----------------------------------------------------------


def same(a: SparseDictionary, b: SparseDictionary) -> None:
    assert a.phi.dtype == b.phi.dtype and torch.equal(a.phi, b.phi) and a.phi.stride() == b.phi.stride()
    assert (a.mean is None) == (b.mean is None)
    if a.mean is not None:
        assert a.mean.dtype == b.mean.dtype and torch.equal(a.mean, b.mean)
    for key in ("lam", "label", "normalize", "max_steps", "tol", "batch_size", "dict_mult", "drop_positions",
                "max_norm_ratio", "median_row_norm"):
        assert getattr(a, key) == getattr(b, key), key


@pytest.mark.parametrize("variant", ["float32", "float64", "column_major", "no_mean_token"])
def test_save_pretrained_round_trips_bit_exactly(tmp_path, variant):
    d = make(mean=variant != "no_mean_token", normalize="token" if variant == "no_mean_token" else "none",
             drop_positions=2, max_norm_ratio=10.0, median_row_norm=3.25)
    if variant == "float64":
        d = d.double()
    if variant == "column_major":  # the layout of a Φ initialised from data rows
        d.phi = d.phi.T.contiguous().T
    out = d.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == [SIDECAR, FILE]
    for loaded in (SparseDictionary.from_pretrained(out), SparseDictionary.load(out),
                   SparseDictionary.load(out / FILE)):
        same(loaded, d)
    x = activations(9)
    assert torch.equal(SparseDictionary.from_pretrained(out).encode(x), d.encode(x))
    assert json.loads((out / SIDECAR).read_text())["dictionaries"][0]["label"] == d.label


def run_files(out: Path, mean: np.ndarray) -> SparseDictionary:
    """What a cache run writes for one dictionary, by the run's own writer."""
    phi = unit_phi(seed=4)
    module = SimpleNamespace(
        hparams=SimpleNamespace(dim=D), labels=["mult4_lam0.3"], grid=[(MULT, 0.3)], phis=[phi], lam=lambda k: 0.3,
        _trainer=SimpleNamespace(datamodule=SimpleNamespace(mean=mean, normalize="none", drop_positions=0,
                                                            max_norm_ratio=0.0, median_norm=None)))
    cfg = OmegaConf.create({"model": None, "data": {"name": "cache", "batch_size": 64},
                            "solver": {"max_steps": 64, "tol": 0.01, "eval_batch_size": 4096}})
    out.mkdir(parents=True, exist_ok=True)
    save_dictionaries(out, cfg, module)
    return SparseDictionary(phi, 0.3, mean=torch.from_numpy(mean), max_steps=64, tol=0.01, batch_size=64,
                            label="mult4_lam0.3", dict_mult=MULT)


def test_save_pretrained_writes_the_file_a_run_writes(tmp_path):
    mean = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    want = run_files(tmp_path / "run", mean)
    loaded = SparseDictionary.load(tmp_path / "run")
    same(loaded, want)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / FILE).read_bytes() == (tmp_path / "run" / FILE).read_bytes()
    run_json = json.loads((tmp_path / "run" / SIDECAR).read_text())
    assert "config" in run_json
    del run_json["config"]  # the run's config is the one thing a saved dictionary cannot know
    assert json.loads((tmp_path / "again" / SIDECAR).read_text()) == run_json


def test_a_downloaded_wandb_artifact_directory_loads(tmp_path):
    want = run_files(tmp_path / "run", np.zeros(D, dtype=np.float32))
    art = tmp_path / "artifacts" / "dictionary-abc123:v0"  # what `wandb artifact get` / artifact.download() gives
    art.mkdir(parents=True)
    for name in (FILE, SIDECAR):
        shutil.copy(tmp_path / "run" / name, art / name)
    (art / "metrics.json").write_text(json.dumps({"normalized_loss": 1.5, "lam": 0.3}))
    same(SparseDictionary.from_pretrained(art), want)
    same(SparseDictionary.from_pretrained(str(art / FILE), label="mult4_lam0.3"), want)


def test_a_file_without_metadata_reads_dictionary_json(tmp_path):
    """Runs written before the metadata existed: the description is in dictionary.json."""
    want = run_files(tmp_path / "run", np.ones(D, dtype=np.float32))
    tensors = load_file(str(tmp_path / "run" / FILE))
    save_file(tensors, str(tmp_path / "run" / FILE))  # the same tensors, no metadata
    same(SparseDictionary.load(tmp_path / "run"), want)


def test_a_hub_id_offline_is_one_line_that_asks_for_the_network_or_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "someone/dictionary" is not a local directory here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError) as err:
        SparseDictionary.from_pretrained("sparse-coding-tests/never-published-dictionary")
    msg = str(err.value)
    assert "\n" not in msg and "network" in msg and "local copy" in msg
    assert msg.startswith("sparse-coding-tests/never-published-dictionary:")
    with pytest.raises(DataError, match="no such file or directory") as err:
        SparseDictionary.from_pretrained(str(tmp_path / "no" / "such" / "run"))
    assert "\n" not in str(err.value)


# ---- damaged and wrong files: one DataError line each -----------------------------------------


def meta_case(change):
    """A damage to the metadata (a dict) and/or the tensors (a dict of name -> Φ)."""
    def damage(out: Path) -> None:
        tensors = load_file(str(out / FILE))
        meta = json.loads((out / SIDECAR).read_text())
        raw = change(meta, tensors)
        header = raw if isinstance(raw, str) else json.dumps(meta)
        save_file(tensors, str(out / FILE), metadata={META_KEY: header})
    return damage


def set_path(*keys_value):
    *keys, value = keys_value

    def change(meta, tensors):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def scale_phi(factor):
    def change(meta, tensors):
        tensors["mult4_lam0.3"] = tensors["mult4_lam0.3"] * factor
    return change


def set_phi(make_phi):
    def change(meta, tensors):
        tensors["mult4_lam0.3"] = make_phi(tensors["mult4_lam0.3"])
    return change


def one_column_off(meta, tensors):
    phi = tensors["mult4_lam0.3"].clone()
    phi[:, 5] *= 1.01
    tensors["mult4_lam0.3"] = phi


def file_case(damage_file):
    def damage(out: Path) -> None:
        damage_file(out / FILE, out)
    return damage


def truncate(file, out):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def random_bytes(file, out):
    file.write_bytes(np.random.default_rng(0).bytes(4096))


def symlink_to(target_kind):
    def damage_file(file, out):
        target = out.parent / f"elsewhere-{target_kind}"
        if target_kind == "garbage":
            target.write_bytes(b"\x00\x01not a safetensors file" * 100)
        elif target_kind == "directory":
            target.mkdir()
        file.unlink()
        os.symlink(target, file)
    return damage_file


def wrong_safetensors(file, out):
    save_file({"embed.weight": torch.randn(4, 4)}, str(file))  # some other model's weights, no metadata
    (out / SIDECAR).unlink()


def wrong_sidecar(data: bytes):
    def damage_file(file, out):
        save_file(load_file(str(file)), str(file))  # no metadata: dictionary.json is read instead
        (out / SIDECAR).write_bytes(data)
    return damage_file


DAMAGES = {
    # (damage, a word the message must contain)
    "mean_one_element": (meta_case(set_path("preprocessing", "center_mean", [0.5])), "center_mean"),
    "mean_nan": (meta_case(set_path("preprocessing", "center_mean", [float("nan")] * D)), "center_mean"),
    "mean_strings": (meta_case(set_path("preprocessing", "center_mean", ["a"] * D)), "center_mean"),
    "mean_nested": (meta_case(set_path("preprocessing", "center_mean", [[0.0] * D])), "center_mean"),
    "batch_size_negative": (meta_case(set_path("solver", "batch_size", -1)), "batch_size"),
    "batch_size_float": (meta_case(set_path("solver", "batch_size", 64.5)), "batch_size"),
    "batch_size_string": (meta_case(set_path("solver", "batch_size", "64")), "batch_size"),
    "max_steps_zero": (meta_case(set_path("solver", "max_steps", 0)), "max_steps"),
    "max_steps_float": (meta_case(set_path("solver", "max_steps", 2.5)), "max_steps"),
    "max_steps_missing": (meta_case(lambda meta, t: meta["solver"].pop("max_steps")), "max_steps"),
    "tol_zero": (meta_case(set_path("solver", "tol", 0)), "tol"),
    "tol_one": (meta_case(set_path("solver", "tol", 1.0)), "tol"),
    "tol_too_small": (meta_case(set_path("solver", "tol", 1e-9)), "tol"),
    "tol_string": (meta_case(set_path("solver", "tol", "0.01")), "tol"),
    "phi_scaled": (meta_case(scale_phi(3.0)), "unit norm"),
    "phi_one_column_off": (meta_case(one_column_off), "column 5"),
    "phi_integer": (meta_case(set_phi(lambda p: (p * 10).to(torch.int64))), "floating"),
    "phi_nan": (meta_case(set_phi(lambda p: torch.where(p > 0.5, float("nan"), p))), "NaN"),
    "phi_1d": (meta_case(set_phi(lambda p: p[:, 0].contiguous())), "(d, m)"),
    "phi_wrong_dim": (meta_case(set_path("dim", D + 1)), "dim"),
    "dict_size_wrong": (meta_case(set_path("dictionaries", 0, "dict_size", 99)), "dict_size"),
    "dict_mult_wrong": (meta_case(set_path("dictionaries", 0, "dict_mult", 99)), "dict_mult"),
    "dict_mult_string": (meta_case(set_path("dictionaries", 0, "dict_mult", "4")), "dict_mult"),
    "normalize_typo": (meta_case(set_path("preprocessing", "normalize", "tokn")), "normalize"),
    "lam_zero": (meta_case(set_path("dictionaries", 0, "lam", 0)), "lam"),
    "lam_negative": (meta_case(set_path("dictionaries", 0, "lam", -0.3)), "lam"),
    "lam_nan": (meta_case(set_path("dictionaries", 0, "lam", float("nan"))), "lam"),
    "lam_infinite": (meta_case(set_path("dictionaries", 0, "lam", float("inf"))), "lam"),
    "lam_string": (meta_case(set_path("dictionaries", 0, "lam", "auto")), "lam"),
    "lam_missing": (meta_case(lambda meta, t: meta["dictionaries"][0].pop("lam")), "lam"),
    "tensor_missing": (meta_case(set_path("dictionaries", 0, "tensor", "mult8_lam0.3")), "no tensor"),
    "label_empty": (meta_case(set_path("dictionaries", 0, "label", "")), "label"),
    "label_twice": (meta_case(lambda meta, t: meta["dictionaries"].append(dict(meta["dictionaries"][0]))),
                    "twice"),
    "column_major_string": (meta_case(set_path("dictionaries", 0, "column_major", "yes")), "column_major"),
    "entry_not_object": (meta_case(set_path("dictionaries", 0, "mult4")), "dictionaries[0]"),
    "no_dictionaries": (meta_case(set_path("dictionaries", [])), "dictionaries"),
    "dictionaries_object": (meta_case(set_path("dictionaries", {"a": 1})), "dictionaries"),
    "no_solver": (meta_case(lambda meta, t: meta.pop("solver")), "solver"),
    "preprocessing_list": (meta_case(set_path("preprocessing", [1])), "preprocessing"),
    "future_format": (meta_case(set_path("format", 99)), "newer"),
    "metadata_not_json": (meta_case(lambda meta, t: '{"format": 1, "dictionaries": ['), "not valid JSON"),
    "metadata_a_list": (meta_case(lambda meta, t: "[1, 2]"), "not an object"),
    "truncated": (file_case(truncate), "not a readable safetensors"),
    "random_bytes": (file_case(random_bytes), "not a readable safetensors"),
    "empty_file": (file_case(lambda file, out: file.write_bytes(b"")), "not a readable safetensors"),
    "symlink_to_garbage": (file_case(symlink_to("garbage")), "not a readable safetensors"),
    "symlink_to_directory": (file_case(symlink_to("directory")), "directory"),
    "broken_symlink": (file_case(symlink_to("nothing")), "broken symbolic link"),
    "a_directory": (file_case(lambda file, out: (file.unlink(), file.mkdir())), "directory"),
    "missing": (file_case(lambda file, out: file.unlink()), "does not exist"),
    "other_safetensors": (file_case(wrong_safetensors), "not a sparse-coding dictionary"),
    "sidecar_not_json": (file_case(wrong_sidecar(b"{not json")), "not readable JSON"),
    "sidecar_a_list": (file_case(wrong_sidecar(b"[]")), "holds list"),
    "sidecar_metrics_json": (file_case(wrong_sidecar(b'{"normalized_loss": 1.5}')), "dictionaries"),
    "sidecar_binary": (file_case(wrong_sidecar(b"\xff\xfe\x00garbage")), "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_damaged_or_wrong_file_is_one_data_error_line(tmp_path, case):
    out = tmp_path / "saved"
    make().save_pretrained(out)
    SparseDictionary.load(out)  # undamaged, it loads
    damage, word = DAMAGES[case]
    damage(out)
    for load in (SparseDictionary.load, SparseDictionary.load_bank, SparseDictionary.from_pretrained):
        with pytest.raises(DataError) as err:  # any other exception fails the test
            load(out)
        msg = str(err.value)
        assert "\n" not in msg and str(out) in msg, msg  # one line, naming the file
        assert word in msg, msg


def test_the_constructor_checks_the_same_things():
    phi = unit_phi()
    for kwargs, word in (({"phi": phi * 2}, "unit norm"), ({"mean": torch.zeros(1)}, "center_mean"),
                         ({"batch_size": -1}, "batch_size"), ({"normalize": "tokn"}, "normalize"),
                         ({"dict_mult": 99}, "dict_mult"), ({"lam": float("nan")}, "lam"),
                         ({"phi": phi.to(torch.int32)}, "floating")):
        args = {"phi": phi, "lam": 0.3, **kwargs}
        with pytest.raises(ConfigError, match=word):
            SparseDictionary(args.pop("phi"), args.pop("lam"), **args)


def test_a_centred_cache_dictionary_encodes_raw_activations(tmp_path):
    """A run on a cache far from centred: every bank member loads with the cache's mean, measures the raw held-out
    rows exactly as the run did, and encodes raw activations as the solver does on centred ones."""
    acts = (np.random.default_rng(0).standard_normal((600, 8)) + 5.0).astype(np.float32)  # the mean matters
    path = import_cache(tmp_path / "cache", acts, shard_rows=DEFAULT_SHARD_ROWS)
    out = tmp_path / "run"
    train(out, ["data=cache", f"data.path={path}", "data.batch_size=64", "trainer.max_epochs=1", "dictionary.mult=2",
                "dictionary.lam=[0.5,auto]"])
    written = {e["label"]: e for e in json.loads((out / "metrics.json").read_text())["dictionaries"]}
    bank = SparseDictionary.load_bank(out)
    assert sorted(bank) == sorted(written)  # a bank: one loadable dictionary per member
    with pytest.raises(ConfigError, match="bank of 2"):
        SparseDictionary.load(out)
    raw = CacheDataModule(path, center=False, batch_size=64)
    raw_val = torch.cat([b for b, _ in raw.val_dataloader()])  # the held-out rows as stored, not centred
    mean = torch.from_numpy(np.load(path / "layers" / "data" / "mean.npy").astype(np.float32))
    for label, d in bank.items():
        assert torch.equal(d.mean, mean)
        assert_same_metrics(d.measure(raw_val), written[label])
        assert SparseDictionary.load(out / "dictionary.safetensors", label=label).lam == d.lam
        want = solve(raw_val - mean, d.phi, d.lam, d.max_steps, tol=d.tol).alpha
        assert torch.equal(d.encode(raw_val), want)
        assert torch.allclose(d.decode(want), (want @ d.phi.T) + mean)
