"""What this machine offers a run and what the run needs of it: the GPUs visible to this process, the CPU
cores, a multi-node launcher, the memory available and the memory a run's sizes take (`memory_estimate`,
read from the run's plan). Read without importing torch (a file of the installed torch, /dev, /proc).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from sparse_coding.config.plan import RunPlan
from sparse_coding.errors import ConfigError

# Environment variables by which Lightning's cluster environments recognise a multi-node launch
MULTI_NODE_ENV = (("MASTER_ADDR", "NODE_RANK"), ("SLURM_NTASKS",), ("TORCHELASTIC_RUN_ID",), ("GROUP_RANK",),
                  ("OMPI_COMM_WORLD_SIZE",), ("PMI_SIZE",), ("LSB_JOBID",))


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch (0 when torch is a CPU build)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return 0
    version = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", version.read_text(), re.M)
    except OSError:
        return 0
    if match is None or match.group(1).strip() in ("None", "''", '""'):
        return 0
    n = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return n


def has_accelerator(name: str) -> bool:
    """Whether Apple's MPS ("mps") or a TPU through torch_xla ("tpu") can be used here. MPS exists only on macOS,
    where asking torch (imported for it) is the one way to know; elsewhere nothing is imported."""
    if name == "tpu":
        return importlib.util.find_spec("torch_xla") is not None
    if name == "mps":
        if sys.platform != "darwin":
            return False
        import torch

        return torch.backends.mps.is_available()
    raise ValueError(f"unknown accelerator {name!r}")


def cpu_count() -> int:
    return os.cpu_count() or 1


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[str]:
    """The CPU's name with its family and model numbers ("AMD EPYC (family 23, model 1)"): virtual machines often
    name only the vendor line, and run times differ several-fold between its generations. None where not readable."""
    try:
        first = cpuinfo.read_text().split("\n\n", 1)[0]
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    name = fields.get("model name")
    if name is None:
        return None
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if key in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def multi_node_launcher(environ: Optional[dict] = None) -> bool:
    """Whether this process was started by something that runs the command on several nodes."""
    env = os.environ if environ is None else environ
    return any(all(env.get(k) for k in keys) for keys in MULTI_NODE_ENV)


# --------------------------------------------------------------------------------------------
# Memory


def memory_estimate(cfg: Any, plan: RunPlan) -> dict[str, int]:
    """Bytes a run holds at its peak, by part (a lower bound: what it cannot run without)."""
    dim = plan.data.width
    f32 = 4
    m_all = [member.mult * dim for member in plan.grid]
    m_max = max(m_all)
    per_param = 4 if cfg.dictionary.optimizer == "adam" else 3  # Phi, its gradient, (Adam's two moments)
    batch = max(int(cfg.data.batch_size), 1)
    eval_batch = max(int(cfg.solver.eval_batch_size), 1)
    parts = {
        "dictionaries (Phi, gradient, optimizer state, feature counters)": sum(m * dim * f32 * per_param + m * 16 for m in m_all),
        "Gram matrix": m_max * m_max * f32,
        "training scores and coefficients": 3 * batch * m_max * f32,
        "evaluation scores and coefficients": 3 * eval_batch * m_max * f32,
    }
    if plan.data.source == "synthetic":
        # a fixed sample holds n + n_val rows; fresh data the held-out set, as many in-sample rows and a batch
        rows = (2 * int(cfg.data.n_val) + batch) if getattr(cfg.data, "fresh", False) else int(cfg.data.n) + int(cfg.data.n_val)
        width = 4 * dim if cfg.data.name in ("sparse_linear", "sparse_nonlinear") else dim
        parts["generated data"] = rows * dim * f32 + rows * width * 8
    else:
        parts["shuffle buffer"] = 2 * int(cfg.data.shuffle_buffer) * dim * f32
    return parts


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: MemAvailable, capped by a ulimit -v and a cgroup limit."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    for max_file, cur_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            top = open(max_file).read().strip()
            if top != "max":
                limits.append(int(top) - int(open(cur_file).read().strip()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_memory(cfg: Any, plan: RunPlan) -> None:
    """The run's sizes fit in the memory this process may still allocate (on a GPU: only the data's part)."""
    parts = memory_estimate(cfg, plan)
    accelerator = plan.trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and visible_gpus() > 0):
        parts = {k: v for k, v in parts.items() if k in ("generated data", "shuffle buffer")}  # the rest is on the GPU
    need = sum(parts.values())
    have = available_memory()
    if have is None or need <= have:
        return
    biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
    detail = ", ".join(f"{name} {_gib(b)}" for name, b in biggest)
    raise ConfigError(f"this run needs at least {_gib(need)} of memory ({detail}) but only {_gib(have)} is available: "
                      "lower dictionary.mult, data.batch_size, solver.eval_batch_size or data.n")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"
