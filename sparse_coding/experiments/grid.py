"""The experiments of issue 4 as lists of points: one point = one training run (a Hydra override list).

Every point is a plain run of `sparse_coding.run.run` on the composed config
`+experiment=<family>_<scale>` plus its own overrides, so any point can be rerun by hand with
`python train.py +experiment=... <overrides>`. Points with identical overrides share one run
directory (Fig. 1a's a=20 is also Fig. 1b's a=20).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SCALES = ("quick", "full")
SEEDS = (0, 1, 2)

SPARSITY_A = {"full": (2, 4, 8, 16, 20, 32, 64, 128, 512),
              # d=64 has 4d = 256 ground-truth features, so a = 256 (every feature active) replaces 512
              "quick": (2, 4, 8, 16, 20, 32, 64, 128, 256)}
CONTROL_A = (5, 10, 20)
CONTROLS = ("gaussian", "rademacher", "heavy_tailed", "sparse_nonlinear")
NONLINEAR_A = 10  # the sparse non-linear control uses a=10 active features
DICT_MULTS = (2, 4, 8, 16)
DICT_SIZE_DATA = {"quick": (("sparse_linear", 10),),  # a=20 and the Gaussian banks did not fit our CPU budget
                  "full": (("sparse_linear", 10), ("sparse_linear", 20), ("gaussian", None))}
EMBED_MODELS = ("minilm", "smollm2")
LAYER_MODELS = {"minilm": 6, "smollm2": 30}  # number of blocks; hidden states 0..N
MODEL_DIM = {"minilm": 384, "smollm2": 576}
# a decade around the auto value, log-spaced (quick: the two ends and the middle only)
SENSITIVITY_FACTORS = {"full": (0.316, 0.562, 1.0, 1.78, 3.16), "quick": (0.316, 1.0, 3.16)}
SENSITIVITY_REAL = ("minilm", 3)

# The Gaussian controls of the embedding experiment see as many rows as the models' embeddings do
# (quick: 6 batches x 512 x 3 epochs; full: the MiniLM vocabulary size, 10 epochs).
EMBED_GAUSSIAN_N = {"quick": (3072, 1536), "full": (30522, 3052)}


@dataclass
class Point:
    experiment: str
    family: str  # synthetic | embeddings | layers: picks conf/experiment/<family>_<scale>.yaml
    overrides: list[str]
    seed: int
    x: dict = field(default_factory=dict)  # what the point varies (a, data, model, layer, ...)
    base_of: bool = False  # sensitivity: needs the auto lambda of the same overrides without a lambda bank

    def all_overrides(self, scale: str) -> list[str]:
        return [f"+experiment={self.family}_{scale}", *self.overrides, f"seed={self.seed}", f"data.seed={self.seed}"]

    def key(self, scale: str) -> str:
        """A stable, readable run-directory name for this override list."""
        text = " ".join(self.all_overrides(scale))
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        short = "_".join(o.split("=", 1)[1] for o in self.overrides if "=" in o and not o.startswith("dictionary.lam"))
        short = "".join(c if c.isalnum() or c in "._-" else "-" for c in short)[:60]
        return f"{self.family}-{short}-s{self.seed}-{digest}"


def sparse(a: float, seed: int, experiment: str, **extra) -> Point:
    return Point(experiment, "synthetic", ["data=sparse_linear", f"data.active={a}"], seed,
                 {"data": "sparse_linear", "a": a, **extra})


def control(name: str, seed: int, experiment: str, active: float | None = None) -> Point:
    overrides = [f"data={name}"] + ([f"data.active={active}"] if active is not None else [])
    return Point(experiment, "synthetic", overrides, seed, {"data": name, "a": active})


def sparsity_points(scale: str) -> list[Point]:
    return [sparse(a, s, "sparsity") for s in SEEDS for a in SPARSITY_A[scale]]


def controls_points(scale: str) -> list[Point]:
    pts = []
    for s in SEEDS:
        pts += [sparse(a, s, "controls") for a in CONTROL_A]
        pts += [control(name, s, "controls", NONLINEAR_A if name == "sparse_nonlinear" else None) for name in CONTROLS]
    return pts


def controls_d256_points(scale: str) -> list[Point]:
    """Fig. 1b at the paper's width d=256 (quick: the other quick settings unchanged; full: same as `controls`)."""
    pts = []
    for s in SEEDS:
        for p in [sparse(a, s, "controls_d256") for a in CONTROL_A] + [
                control(name, s, "controls_d256") for name in ("gaussian", "rademacher", "heavy_tailed")]:
            p.overrides.append("data.dim=256")
            pts.append(p)
    return pts


def dict_size_points(scale: str) -> list[Point]:
    """One run per data set and seed trains the whole bank of sizes on the same batches."""
    pts = []
    bank = "dictionary.mult=[" + ",".join(str(m) for m in DICT_MULTS) + "]"
    for name, a in DICT_SIZE_DATA[scale]:
        for s in SEEDS:
            p = sparse(a, s, "dict_size") if a is not None else control(name, s, "dict_size")
            p.overrides.append(bank)
            pts.append(p)
    return pts


def embeddings_points(scale: str) -> list[Point]:
    pts = []
    n, n_val = EMBED_GAUSSIAN_N[scale]
    for model in EMBED_MODELS:
        for s in SEEDS:
            pts.append(Point("embeddings", "embeddings", [f"model={model}"], s,
                             {"source": model, "dim": MODEL_DIM[model]}))
            pts.append(Point("embeddings", "synthetic",
                             ["data=gaussian", f"data.dim={MODEL_DIM[model]}", f"data.n={n}", f"data.n_val={n_val}",
                              "data.batch_size=512", f"trainer.max_epochs={3 if scale == 'quick' else 10}"], s,
                             {"source": f"gaussian_d{MODEL_DIM[model]}", "dim": MODEL_DIM[model]}))
    return pts


# quick: every third SmolLM2 hidden state (0, 3, ..., 30); our CPU budget did not cover all 31 x 3 seeds
LAYER_STRIDE = {"quick": {"minilm": 1, "smollm2": 3}, "full": {"minilm": 1, "smollm2": 1}}


def layers_points(scale: str) -> list[Point]:
    """Seed-major order: a run cut short still covers every layer once."""
    return [Point("layers", "layers", [f"model={model}", f"layer={k}"], s, {"model": model, "layer": k})
            for s in SEEDS for model, n in LAYER_MODELS.items() for k in range(0, n + 1, LAYER_STRIDE[scale][model])]


def sensitivity_points(scale: str) -> list[Point]:
    """A fixed-lambda bank around each seed's auto value (filled in from the `after` point at run time)."""
    model, layer = SENSITIVITY_REAL
    pts = [Point("sensitivity", "layers", [f"model={model}", f"layer={layer}"], s, {"case": f"{model} layer {layer}"},
                 base_of=True) for s in SEEDS]
    pts += [Point("sensitivity", "synthetic", ["data=sparse_linear", "data.active=10"], s, {"case": "sparse_linear a=10"},
                  base_of=True) for s in SEEDS]
    return pts


EXPERIMENTS = {
    "sparsity": sparsity_points,
    "controls": controls_points,
    "controls_d256": controls_d256_points,
    "dict_size": dict_size_points,
    "embeddings": embeddings_points,
    "layers": layers_points,
    "sensitivity": sensitivity_points,
}
