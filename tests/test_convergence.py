"""Training until the measurement converges (SPEC §3): the stopping rule, the fixed protocol, budgets,
scale invariance and the auto-lambda fixed point."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT
from sparse_coding.config.schema import register_configs
from sparse_coding.convergence import has_converged, unconverged_advice

register_configs()

QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
SMALL = ["data=sparse_linear", "data.dim=16", "data.active=4", "data.n=2048", "data.n_val=1024",
         "data.batch_size=256", "dictionary.mult=4"]


def train(out, overrides):
    from sparse_coding.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=QUIET + overrides)
    return run(cfg, out)


def point(samples, values, lam_ok=True):
    return {"samples_seen": samples, "dictionaries": [
        {"normalized_loss": v, "avg_coef_norm": v / 2, "lam_converged": lam_ok} for v in values]}


def test_has_converged_rule():
    flat = [point(i, [10.0]) for i in range(6)]
    assert has_converged(flat, window=3, tol=0.01)
    assert not has_converged(flat[:5], window=3, tol=0.01)  # two windows are needed
    drifting = [point(i, [10.6 - 0.1 * i]) for i in range(6)]  # window means 10.5 and 10.2: 3 %
    assert not has_converged(drifting, window=3, tol=0.01)
    assert has_converged(drifting, window=3, tol=0.05)
    noisy = [point(i, [18.0 + (0.1 if i % 2 else -0.1)]) for i in range(6)]  # 1.1 % swings, no drift
    assert has_converged(noisy, window=2, tol=0.01)
    assert not has_converged([point(i, [10.0], lam_ok=False) for i in range(6)], window=3, tol=0.01)
    bank = [point(i, [10.0, 5.0 + 0.2 * i]) for i in range(6)]  # the second dictionary still moves
    assert not has_converged(bank, window=3, tol=0.01)
    assert not has_converged([point(i, [math.nan]) for i in range(6)], window=3, tol=0.01)


def test_default_run_converges_and_reports(tmp_path):
    result = train(tmp_path, SMALL)
    assert result["converged"] is True and result["stopped_by"] == "converged"
    history = result["history"]
    assert len(history) >= 6
    assert [h["samples_seen"] for h in history] == sorted({h["samples_seen"] for h in history})
    for key in ("normalized_loss", "avg_coef_norm"):
        values = [h["dictionaries"][0][key] for h in history[-6:]]
        assert abs(sum(values[3:]) - sum(values[:3])) / 3 <= 0.01 * sum(values[3:]) / 3
    assert result["lam_converged"]
    assert result["samples_seen"] == result["optimizer_steps"] * 256
    timing = result["timing"]
    assert 0 < timing["eval_seconds"] < timing["fit_seconds"] and timing["samples_per_second"] > 0
    assert result["normalized_loss_se"] > 0 and result["avg_coef_norm_se"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("converged", "samples_seen", "optimizer_steps", "history", "timing", "normalized_loss_se"):
        assert key in saved
    assert (tmp_path / "plots" / "convergence.png").stat().st_size > 0


def test_fixed_protocol_is_exact_and_evaluation_does_not_change_training(tmp_path):
    """convergence.stop=false + trainer.max_epochs=N trains exactly N epochs, whatever the evaluation cadence."""
    fixed = SMALL + ["convergence.stop=false", "trainer.max_epochs=3"]
    a = train(tmp_path / "a", fixed + ["convergence.eval_every=512"])
    b = train(tmp_path / "b", fixed + ["convergence.eval_every=100000"])
    assert a["samples_seen"] == b["samples_seen"] == 3 * 2048
    assert a["optimizer_steps"] == 3 * 8
    assert a["stopped_by"] == "trainer.max_epochs"
    assert len(a["history"]) > len(b["history"])
    for key in ("normalized_loss", "avg_coef_norm", "l0", "lam", "fvu"):
        assert a[key] == b[key], key  # bit-identical: evaluating never touches Phi, lambda or the data order


def test_budget_ends_an_unconverged_run_with_advice(tmp_path, capsys):
    result = train(tmp_path, SMALL + ["convergence.max_samples=768"])
    assert result["converged"] is False and result["stopped_by"] == "convergence.max_samples"
    assert result["samples_seen"] == 768
    out = capsys.readouterr().out
    assert "NOT converged" in out and "convergence.max_samples" in out
    assert "raise convergence.max_samples" in unconverged_advice(result)


@pytest.mark.parametrize("scale", ["1e-6", "1e-3", "1e3", "1e6"])
def test_scale_invariance_over_the_allowed_range(tmp_path, scale):
    """S1 and L_norm do not depend on the data's scale under auto-lambda (SPEC §4), down as well as up:
    the reconstruction error is normalised by the data's power, so Adam's eps never matters."""
    fixed = SMALL + ["convergence.stop=false", "trainer.max_epochs=3"]
    base = train(tmp_path / "base", fixed)
    scaled = train(tmp_path / "scaled", fixed + [f"data.scale={scale}"])
    for key in ("normalized_loss", "avg_coef_norm"):
        assert scaled[key] == pytest.approx(base[key], rel=2e-3), key
    assert scaled["lam"] == pytest.approx(float(scale) * base["lam"], rel=2e-3)


def test_auto_lambda_is_the_fixed_point_of_a_tenth_of_mean_max(tmp_path):
    """After training, lambda = 0.1 * mean_i max(alpha_i) over the training data under the final Phi
    (to the auto-lambda tolerance): a different factor would fail this."""
    from safetensors.torch import load_file

    from sparse_coding.data.synthetic_datamodule import SyntheticDataModule
    from sparse_coding.solver import solve

    result = train(tmp_path, SMALL + ["dictionary.lam_tol=0.002", "convergence.tol=0.002"])
    assert result["lam_converged"]
    phi = load_file(str(tmp_path / "dictionary.safetensors"))["mult4_lamauto"]
    data = SyntheticDataModule("sparse_linear", 16, 2048, 1024, seed=0, active=4)
    codes = solve(data.train_x, phi, result["lam"], tol=1e-2)
    implied = 0.1 * float(codes.row_max().double().mean())
    assert implied == pytest.approx(result["lam"], rel=0.02)  # a factor of 0.2 would give implied = lam / 2


def test_history_survives_resume(tmp_path):
    first = train(tmp_path, SMALL + ["convergence.stop=false", "trainer.max_epochs=2", "convergence.eval_every=512"])
    resumed = train(tmp_path, SMALL + ["convergence.stop=false", "trainer.max_epochs=4", "convergence.eval_every=512",
                                       "ckpt_path=last"])
    seen = [h["samples_seen"] for h in resumed["history"]]
    assert seen[: len(first["history"])] == [h["samples_seen"] for h in first["history"]]
    assert resumed["samples_seen"] == 4 * 2048


@pytest.mark.parametrize("protocol", [[], ["convergence.stop=false", "trainer.max_epochs=2"]], ids=["converged", "fixed"])
def test_a_run_killed_before_writing_its_outputs_resumes_to_them(tmp_path, protocol):
    """Ended (converged or at its budget), checkpointed, then killed before metrics.json: resuming writes the
    outputs from the checkpoint without training further, and only then refuses to resume it again."""
    from sparse_coding.errors import ConfigError

    first = train(tmp_path, SMALL + protocol)
    (tmp_path / "metrics.json").unlink()
    again = train(tmp_path, SMALL + protocol + ["ckpt_path=last"])
    for key in ("optimizer_steps", "samples_seen", "converged", "stopped_by", "normalized_loss", "avg_coef_norm"):
        assert again[key] == first[key], key
    assert (tmp_path / "metrics.json").is_file()
    with pytest.raises(ConfigError, match="already (converged|finished)"):
        train(tmp_path, SMALL + protocol + ["ckpt_path=last"])


def test_sparse_training_step_matches_dense_gradient():
    """The training step's decode/gradient from the nonzeros equals the dense alpha @ Phi^T form."""
    from sparse_coding.solver import solve

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    phi = torch.randn(12, 48, generator=gen, dtype=torch.float64)
    phi /= phi.norm(dim=0)
    codes = solve(x, phi, 0.3)
    p1, p2 = phi.clone().requires_grad_(True), phi.clone().requires_grad_(True)
    (x - codes.decode(p1)).pow(2).sum(1).mean().backward()
    (x - codes.alpha @ p2.T).pow(2).sum(1).mean().backward()
    torch.testing.assert_close(p1.grad, p2.grad)
