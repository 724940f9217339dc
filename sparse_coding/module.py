"""The LightningModule that learns unit-norm dictionaries Phi by alternating minimisation (docs/method.md §3).

Each training step: (i) solve for alpha with Phi fixed (no gradient through the solver); (ii) take
`inner_steps` gradient steps on ||x - Phi alpha||^2 over Phi with alpha fixed, removing the part of
each column's gradient parallel to the column and renormalising the columns after every step.
The coefficients stay sparse: decoding, the gradient and every statistic touch only the nonzeros.
The reconstruction error is divided by the mean squared norm of the first training batch, so the
optimizer sees the same gradients whatever the data's scale (Adam's eps would otherwise break the
scale invariance of S1 and L_norm for small data).

One module can hold a bank of dictionaries (one per (mult, lam) pair) that share every batch;
Adam's update is per element, so training them together equals training them one by one.
Under DDP the gradients are averaged by the strategy before the (identical) update on every rank;
the statistics that steer lambda and dead-feature tracking are summed across ranks.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from sparse_coding.config.plan import dictionary_label
from sparse_coding.config.schema import DictionaryConfig, SolverConfig
from sparse_coding.errors import NonFiniteError, TrainingError
from sparse_coding.lightning_compat import attached_trainer, should_update_logs
from sparse_coding.metrics import METRIC_NAMES, SparsityMetrics
from sparse_coding.solver import SolveResult, all_finite, solve


IN_SAMPLE_KEYS = tuple(k for k in METRIC_NAMES if k != "mean_steps")  # the solver's effort: held-out rows only


def in_sample_entry(held_out: dict, in_sample: dict) -> dict:
    """`in_sample` (the metrics on training rows) and `generalization_gap` = held-out normalized_loss /
    in-sample - 1, with its standard error (the two row sets are independent given Phi; docs/method.md §5)."""
    h, i = held_out["normalized_loss"], in_sample["normalized_loss"]
    ratio = h / i
    rel = math.hypot(held_out["normalized_loss_se"] / h, in_sample["normalized_loss_se"] / i)
    return {"in_sample": {key: in_sample[key] for key in IN_SAMPLE_KEYS},
            "generalization_gap": ratio - 1, "generalization_gap_se": ratio * rel}


class SparseCodingModule(pl.LightningModule):
    def __init__(
        self,
        dim: int,
        grid: list,
        *,
        # the run passes every setting (sparse_coding.run.build_module); these defaults are the schema's
        lr: float = DictionaryConfig.lr,
        optimizer: str = DictionaryConfig.optimizer,
        inner_steps: int = DictionaryConfig.inner_steps,
        lam_tol: float = DictionaryConfig.lam_tol,
        lam_init_rounds: int = DictionaryConfig.lam_init_rounds,
        lam_round_every: int = 0,
        max_steps: int = SolverConfig.max_steps,
        tol: float = SolverConfig.tol,
        dead_window: int = DictionaryConfig.dead_window,
        init: str = DictionaryConfig.init,
        seed: int = 0,
        init_rows: Tensor | None = None,
        eval_groups: int = 0,
        in_sample_groups: int = 0,
        epoch_batches: int = 0,
    ) -> None:
        super().__init__()
        if int(lam_round_every) != lam_round_every or lam_round_every < 0:
            raise ValueError(f"lam_round_every must be an integer >= 0, got {lam_round_every!r}")
        self.save_hyperparameters(ignore=["init_rows"])
        self.automatic_optimization = False
        self.grid = [(int(m), lam) for m, lam in grid]
        self.labels = [dictionary_label(m, lam) for m, lam in self.grid]
        self.auto = [lam == "auto" for _, lam in self.grid]
        phis = []
        for mult, _ in self.grid:
            # The start depends on (seed, mult) only, not on the rest of the bank: a dictionary in a bank
            # starts (and so ends) where the same dictionary trained alone does. `init_rows` is a seeded
            # sample of data points whose first m rows are the same whatever its length.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + mult)
            m = mult * dim
            if init == "data" and init_rows is not None and init_rows.shape[0] >= m:
                phi = init_rows[:m].T.clone().float()
                phi += 1e-3 * phi.std() * torch.randn(phi.shape, generator=gen)  # separate duplicate rows
            else:
                phi = torch.randn(dim, m, generator=gen)
            phis.append(nn.Parameter(phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)))
        self.phis = nn.ParameterList(phis)
        initial = [math.nan if lam == "auto" else float(lam) for _, lam in self.grid]
        self.register_buffer("lams", torch.tensor(initial, dtype=torch.float64))
        self.register_buffer("lam_converged", torch.tensor([not a for a in self.auto]))
        self.register_buffer("epoch_sum_max", torch.zeros(len(self.grid), dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.float64))  # training samples, all ranks
        self.register_buffer("lam_round_at", torch.full((), -1.0, dtype=torch.float64))  # batches trained at the last epoch round
        self.register_buffer("data_power", torch.full((), math.nan, dtype=torch.float64))  # mean ||x||^2, batch 1
        for k, (mult, _) in enumerate(self.grid):
            self.register_buffer(f"since_active_{k}", torch.zeros(mult * dim, dtype=torch.float64))
        self.lam_history: list[list[float]] = [[] for _ in self.grid]
        self.history: list[dict] = []  # held-out metrics at every evaluation (see on_validation_epoch_end)
        # held-out metrics (every evaluation) and in-sample metrics (training rows, the final evaluation only);
        # `*_groups`: clusters of the evaluation rows (contexts of a cache) for cluster-robust SEs, 0: independent rows
        self.val_metrics = nn.ModuleList(SparsityMetrics(dim, m * dim, eval_groups) for m, _ in self.grid)
        self.in_sample_metrics = nn.ModuleList(SparsityMetrics(dim, m * dim, in_sample_groups) for m, _ in self.grid)
        self._in_sample_seen = False
        self.final_metrics: list[dict] = []
        self._val_grams: list[Tensor] = []

    # ---- helpers -------------------------------------------------------------------------

    def _sum_across_ranks(self, t: Tensor) -> Tensor:
        if attached_trainer(self) is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _world_size(self) -> int:
        return self.trainer.world_size if attached_trainer(self) is not None else 1

    def lam(self, k: int) -> float:
        return float(self.lams[k])

    def name(self, k: int, metric: str) -> str:
        """Log key: plain for a single dictionary, suffixed with the dictionary label in a bank."""
        return metric if len(self.grid) == 1 else f"{metric}/{self.labels[k]}"

    @torch.no_grad()
    def _initial_lams(self, x: Tensor) -> None:
        """Auto lambda starts at 0.1 * mean max score and iterates lam <- 0.1 mean_max(alpha) a few rounds."""
        count = self._sum_across_ranks(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        for k, phi in enumerate(self.phis):
            if not self.auto[k] or not math.isnan(self.lam(k)):
                continue
            top = (x @ phi).amax(dim=1).clamp_min(0).sum(dtype=torch.float64)
            lam = 0.1 * float(self._sum_across_ranks(top) / count)
            for _ in range(self.hparams.lam_init_rounds):
                if not 0 < lam < math.inf:
                    break
                row_max = self._solve(x, phi, lam).row_max()
                lam = 0.1 * float(self._sum_across_ranks(row_max.sum(dtype=torch.float64)) / count)
            if not 0 < lam < math.inf:
                biggest = float(x.detach().abs().max()) if x.numel() else 0.0
                why = ("the rows' squared norms overflow float32" if biggest * biggest * x.shape[1] > 1e37 else
                       "are the data all zero?")
                raise TrainingError(f"auto lambda found no positive coefficients on the first batch (lam={lam:g}; "
                                    f"largest |x| = {biggest:.3g}: {why}): check data.noise, data.scale or the cache")
            self.lams[k] = lam
            self.lam_history[k].append(lam)

    def _solve(self, x: Tensor, phi: Tensor, lam: float, gram: Tensor | None = None) -> SolveResult:
        return solve(x, phi.detach(), lam, self.hparams.max_steps, gram=gram, tol=self.hparams.tol)

    def _logging_step(self) -> bool:
        """Per-step statistics are computed only on the steps Lightning sends to the logger
        (every trainer.log_every_n_steps)."""
        if attached_trainer(self) is None:
            return True
        return should_update_logs(self.trainer)

    # ---- training --------------------------------------------------------------------------

    def configure_optimizers(self):
        params = list(self.phis.parameters())
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr)
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def _stop_if_nonfinite(self, what: str, ok: bool, batch_idx: int) -> None:
        """Raise NonFiniteError on every rank when any rank found a non-finite `what` (no DDP rank is left waiting)."""
        bad = torch.tensor(0.0 if ok else 1.0, dtype=torch.float64, device=self.device)
        if float(self._sum_across_ranks(bad)) > 0:
            raise NonFiniteError(
                f"non-finite {what} at global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): "
                "training stopped and saved nothing from this step, so checkpoints/last.ckpt (if any) holds the last "
                "good Phi; fix the cause (data, dictionary.lr, data.scale) and resume with ckpt_path=last"
            )

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        self._stop_if_nonfinite("input batch (NaN/Inf in the data)", all_finite(x), batch_idx)
        global_batch = self._sum_across_ranks(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        if torch.isnan(self.data_power):
            power = self._sum_across_ranks(x.pow(2).sum(dtype=torch.float64)) / global_batch
            self.data_power.fill_(float(power) if power > 0 else 1.0)
        if torch.isnan(self.lams).any():
            self._initial_lams(x)
        elif self._lambda_round_due():
            self._lambda_round()
        elif self._epoch_round_due():  # an epoch-end round a checkpoint taken on the epoch's last batch left undone
            self._epoch_round()
        log = self._logging_step()
        codes = []
        with torch.no_grad():
            for k, phi in enumerate(self.phis):
                result = self._solve(x, phi, self.lam(k))
                codes.append(result)
                self.epoch_sum_max[k] += result.row_max().sum(dtype=torch.float64)
                self._track_dead(k, result.feature_counts(), global_batch, log)
                if log:
                    self.log(self.name(k, "train/l0"), result.l0.sum(dtype=torch.float64).float() / max(1, x.shape[0]),
                             on_step=True)
                    self.log(self.name(k, "train/capped_fraction"), result.capped.float().mean(), on_step=True)
        self.epoch_count += x.shape[0]
        self.samples_seen += global_batch

        opt = self.optimizers()
        scale = float(self.data_power)
        for _ in range(self.hparams.inner_steps):
            opt.zero_grad()
            # Per-rank sum over the mean share of the global batch: DDP's gradient average is then exactly the
            # global-batch mean, even when ranks hold unequal (or empty) shares of it.
            share = float(global_batch) / self._world_size()
            errors = [(x - code.decode(phi)).pow(2).sum() / share for phi, code in zip(self.phis, codes)]
            # non-finite alpha would show in the loss, so the loss alone is checked
            self._stop_if_nonfinite("loss", all_finite(torch.stack(errors).detach()), batch_idx)
            self.manual_backward(torch.stack(errors).sum() / scale)
            self._remove_parallel_gradient()
            self._stop_if_nonfinite("gradient", all(p.grad is None or all_finite(p.grad) for p in self.phis), batch_idx)
            opt.step()
            self._renormalise()
            self._stop_if_nonfinite("Phi after the optimizer step (lower dictionary.lr)",
                                    all(all_finite(p) for p in self.phis), batch_idx)
        if log:
            for k, err in enumerate(errors):
                loss = err.detach() + self.lam(k) * codes[k].values.sum() / share
                self.log(self.name(k, "train/loss"), loss, on_step=True, prog_bar=len(self.grid) == 1)
                self.log(self.name(k, "train/lam"), self.lam(k), on_step=True)
        return errors[0].detach()

    @torch.no_grad()
    def _track_dead(self, k: int, counts: Tensor, global_batch: Tensor, log: bool) -> None:
        """`counts` is this rank's (m,) number of samples using each feature; a feature unused for
        dead_window samples (counted over all ranks: `global_batch` per step) is dead."""
        since = getattr(self, f"since_active_{k}")
        used = self._sum_across_ranks(counts.to(torch.float64))
        since += global_batch
        since[used > 0] = 0
        if log:
            dead = (since >= self.hparams.dead_window).double().mean()
            self.log(self.name(k, "train/dead_fraction"), dead.float(), on_step=True)

    @torch.no_grad()
    def _remove_parallel_gradient(self) -> None:
        for phi in self.phis:
            if phi.grad is not None:
                phi.grad -= phi * (phi.grad * phi).sum(dim=0, keepdim=True)

    @torch.no_grad()
    def _renormalise(self) -> None:
        for phi in self.phis:
            phi.div_(phi.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def on_train_epoch_end(self) -> None:
        if self.hparams.lam_round_every == 0 and (self.hparams.epoch_batches == 0 or self._epoch_round_due()):
            self._epoch_round()

    def _epoch_round_due(self) -> bool:
        """Fixed protocol: a round is due at every end of the run's own epoch (`epoch_batches` batches), once;
        Lightning's epoch ends do not line up with it after a resume from a checkpoint on an epoch's last batch."""
        every, done = self.hparams.epoch_batches, self.global_step // self.hparams.inner_steps
        return (self.hparams.lam_round_every == 0 and every > 0 and done > 0 and done % every == 0
                and float(self.lam_round_at) != done)

    def _epoch_round(self) -> None:
        self._lambda_round()
        self.lam_round_at.fill_(self.global_step // self.hparams.inner_steps)

    def _lambda_round_due(self) -> bool:
        """With lam_round_every = N > 0: a round before the first step after every N batches (so a checkpoint
        taken at any step holds exactly the statistics the next round needs)."""
        every = self.hparams.lam_round_every
        batches_done = self.global_step // self.hparams.inner_steps
        return every > 0 and batches_done > 0 and batches_done % every == 0

    def _lambda_round(self) -> None:
        """One round of the auto-lambda fixed point: lam <- 0.1 * mean_max over the round's training samples.

        Rounds are epochs in the paper's fixed protocol (lam is then held once it moved less than lam_tol)
        or, when training to convergence, every `lam_round_every` batches (the held-out evaluation
        interval): lam keeps tracking 0.1 * mean_max as Phi trains, so the converged measurement sits
        at the fixed point."""
        sum_max = self._sum_across_ranks(self.epoch_sum_max.clone())
        count = self._sum_across_ranks(self.epoch_count.clone())
        hold = self.hparams.lam_round_every == 0
        for k in range(len(self.grid)):
            if self.auto[k] and not (hold and bool(self.lam_converged[k])) and count > 0:
                new = 0.1 * float(sum_max[k] / count)
                if new > 0:
                    old = self.lam(k)
                    self.lams[k] = new
                    self.lam_history[k].append(new)
                    self.lam_converged[k] = abs(new - old) / old < self.hparams.lam_tol
        self.epoch_sum_max.zero_()
        self.epoch_count.zero_()

    # ---- evaluation ------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_grams = [phi.detach().T @ phi.detach() for phi in self.phis]  # one Gram per pass

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """An evaluation batch is (rows, cluster ids); loader 0 is the held-out set, loader 1 (the final
        evaluation only) the in-sample rows."""
        x, groups = batch
        if torch.isnan(self.lams).any():  # validating before any training step
            self._initial_lams(x)
        metrics = self.val_metrics if dataloader_idx == 0 else self.in_sample_metrics
        self._in_sample_seen |= dataloader_idx == 1
        with torch.no_grad():
            for k, phi in enumerate(self.phis):
                result = self._solve(x, phi, self.lam(k), gram=self._val_grams[k])
                metrics[k].update(x, result, result.decode(phi.detach()), groups)

    def on_validation_epoch_end(self) -> None:
        self._val_grams = []
        self.final_metrics = []
        for k, metric in enumerate(self.val_metrics):
            values = self._compute(metric, k)
            for key, value in values.items():
                self.log(self.name(k, f"val/{key}"), value, prog_bar=key == "normalized_loss" and len(self.grid) == 1)
            if self._in_sample_seen:
                values.update(in_sample_entry(values, self._compute(self.in_sample_metrics[k], k)))
            mult, lam = self.grid[k]
            values.update(
                lam=self.lam(k), lam_mode="auto" if self.auto[k] else "fixed", lam_history=list(self.lam_history[k]),
                lam_converged=bool(self.lam_converged[k]), dict_mult=mult, dict_size=mult * self.hparams.dim,
                label=self.labels[k],
            )
            self.final_metrics.append(values)
        self._in_sample_seen = False
        self._record_history()

    def _compute(self, metric: SparsityMetrics, k: int) -> dict:
        metric.lam = self.lam(k)
        values = {key: float(v) for key, v in metric.compute().items()}
        metric.reset()
        return values

    def _record_history(self) -> None:
        """One history point per evaluation (a repeated evaluation at the same position replaces it)."""
        point = {
            "samples_seen": int(self.samples_seen),
            "optimizer_steps": int(self.global_step),
            "dictionaries": [
                {key: e[key] for key in ("normalized_loss", "avg_coef_norm", "normalized_loss_se", "avg_coef_norm_se",
                                         "lam", "lam_converged")}
                for e in self.final_metrics
            ],
        }
        if self.history and self.history[-1]["samples_seen"] == point["samples_seen"]:
            self.history[-1] = point
        else:
            self.history.append(point)

    # ---- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lam_history"] = self.lam_history
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.lam_history = checkpoint.get("lam_history", self.lam_history)
        self.history = checkpoint.get("history", self.history)
