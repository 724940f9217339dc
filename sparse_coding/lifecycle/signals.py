"""What SIGTERM and Ctrl-C do to a run: a resumable checkpoint, then one line and exit 2.

Lightning turns a SIGTERM during a fit into its `SIGTERMException` (uncaught: exit 0), and a Ctrl-C
into `sys.exit(1)` (a Ctrl-C outside the fit is a `KeyboardInterrupt`). On SIGTERM the run's
checkpoint callback saves `last.ckpt` first (`AtomicCheckpoint.on_exception`, which asks `is_sigterm`);
then the run directory's owner (`rundir.own_run_dir`) turns either stop into `RunInterrupted`, whose
one line says where the resumable checkpoint is (`interrupted`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sparse_coding.errors import RunInterrupted


def is_sigterm(e: BaseException) -> bool:
    """Lightning's SIGTERMException (matched by name: no torch import before the run starts)."""
    return any(c.__name__ == "SIGTERMException" and c.__module__.split(".")[0] in ("pytorch_lightning", "lightning")
               for c in type(e).__mro__)


def interruption(e: BaseException) -> Optional[str]:
    """How the run was stopped ("SIGTERM", "Ctrl-C (SIGINT)"), or None for any other exception."""
    if is_sigterm(e):
        return "SIGTERM"
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return "Ctrl-C (SIGINT)"
    return None


def interrupted(how: str, out_dir: Path, outputs: list) -> RunInterrupted:
    """The error of a run stopped by `how` in `out_dir`, which holds the finished results `outputs` (of an earlier
    end): it says whether a checkpoint was written and how to resume."""
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    where = f"{last} holds the state" if last.is_file() else "no checkpoint was written yet"
    written = f"its {', '.join(outputs)} are from an earlier end" if outputs else "no outputs were written"
    return RunInterrupted(f"stopped by {how} before the run finished; {written}; {where}: "
                          "rerun the same command with ckpt_path=last to resume")
