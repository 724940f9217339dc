"""The run's data position and the one resumable training loader, used by both data modules.

The training order is a function of the run's own position, not of Lightning's epoch counter: the
k-th global batch a run trains on is batch k mod B of epoch k div B (B batches an epoch), where k
is the number of batches trained so far (`trained_batches`, restored with the checkpoint). Lightning
re-enters a finished epoch when it resumes from a checkpoint taken on its last batch; because each
pass of the loader yields the rest of the run's current epoch from k, the batches stay exactly those
of an uninterrupted run whatever Lightning's epoch bookkeeping does (`ckpt_path=last`).

Without a fitting trainer (a loader used by hand) the data module chooses the epoch of each pass
(`set_epoch`), and `load_state_dict` makes the next pass over that epoch skip its first batches.

`Passes` chooses each pass (epoch, batches to skip); `ResumableLoader` is the DataLoader that asks it
before every pass, hands the pass to the data's reader (`start`: the synthetic sampler, or the cache's
row stream, which returns the batches the loader itself must drop) and reports the position to Lightning.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch.utils.data import DataLoader


def trained_batches(trainer) -> Optional[int]:
    """Global batches the run has trained on (its data position), or None outside a fit."""
    if trainer is None or trainer.state.fn != "fit":
        return None
    module = trainer.lightning_module
    return int(trainer.global_step) // int(module.hparams.get("inner_steps", 1))


def position(batches: int, per_epoch: int) -> dict:
    """A data position as (epoch, batches done in it), `per_epoch` batches an epoch."""
    epoch, done = divmod(int(batches), max(1, int(per_epoch)))
    return {"epoch": epoch, "batches_done": done}


class Passes:
    """The passes of one training loader: which epoch each reads and how many of its first batches it skips.

    `per_epoch()`: batches an epoch (of this loader); `trained()`: batches trained in this fit, None outside
    one; `next_epoch()`: the epoch of the next pass outside a fit.
    """

    def __init__(self, per_epoch: Callable[[], int], trained: Callable[[], Optional[int]],
                 next_epoch: Callable[[], int]) -> None:
        self.per_epoch, self.trained, self.next_epoch = per_epoch, trained, next_epoch
        self.epoch = 0  # the epoch of the latest pass outside a fit
        self._resume: Optional[tuple[int, int]] = None

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """The next pass over `epoch` starts after its first `batches_done` batches (outside a fit)."""
        self._resume = (int(epoch), int(batches_done))

    def next_pass(self) -> tuple[int, int]:
        """(epoch, batches to skip) of the pass about to start: in a fit the rest of the run's current epoch."""
        resume, self._resume = self._resume, None
        trained = self.trained()
        if trained is not None:
            return divmod(trained, max(1, self.per_epoch()))
        self.epoch = self.next_epoch()
        return self.epoch, resume[1] if resume is not None and resume[0] == self.epoch else 0

    def state_dict(self) -> dict:
        """The run's data position (in a fit), else the latest pass's epoch from its start."""
        trained = self.trained()
        if trained is None:
            return {"epoch": self.epoch, "batches_done": 0}
        return position(trained, self.per_epoch())


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning treats as stateful (`state_dict`/`load_state_dict`: the data position).

    Before each pass it asks `passes` for (epoch, batches to skip) and calls `start(epoch, skip)`, which sets up
    the reader and returns how many batches the loader drops itself once iteration has begun.
    """

    def __init__(self, dataset, passes: Passes, start: Callable[[int, int], int], **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.passes, self._start = passes, start

    def __iter__(self):
        drop = self._start(*self.passes.next_pass())
        it = super().__iter__()  # worker processes start here with their copy of the reader's pass
        for _ in range(drop):
            next(it, None)
        return it

    def state_dict(self) -> dict:
        return self.passes.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.passes.resume_from(int(state["epoch"]), int(state["batches_done"]))
