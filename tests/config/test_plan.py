"""The config package (sparse_coding/config): the schema is the one source of defaults, a composed config is
parsed once into the run's plan, the package has no import cycle and its checks import nothing heavy."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from sparse_coding import models
from sparse_coding.cache import build
from sparse_coding.config import plan as plan_mod
from sparse_coding.config import schema
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.run import build_datamodule, build_module

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "fixtures" / "composed_config.json"  # composed before the schema became the one source


def test_composed_configs_are_the_snapshot():
    """Every default and group option composes to the values it had when defaults lived in three places
    (the JSON text compared, so an int that became a float shows)."""
    for case, expected in json.loads(SNAPSHOT.read_text()).items():
        got = OmegaConf.to_container(compose_config(case.split()), resolve=True)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True), case or "(defaults)"


SCHEMAS = {"data": schema.DataConfig, "dictionary": schema.DictionaryConfig, "solver": schema.SolverConfig,
           "convergence": schema.ConvergenceConfig, "trainer": schema.TrainerConfig, "logger": schema.LoggerConfig,
           "model": schema.ModelConfig, "corpus": schema.CorpusConfig}
IDENTITY = ("name",)  # what an option is (data=gaussian sets name: gaussian), not a default it repeats


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_yaml_files_select_a_schema_and_set_only_what_they_change(group):
    defaults = {f.name: f.default for f in dataclasses.fields(SCHEMAS[group]) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(SCHEMAS[group])
                     if f.default_factory is not dataclasses.MISSING})
    files = sorted((ROOT / "conf" / group).glob("*.yaml"))
    assert files, f"conf/{group}/ has no option"
    for file in files:
        body = yaml.safe_load(file.read_text()) or {}
        chain = [d if isinstance(d, str) else next(iter(d)) for d in body.pop("defaults", [])]
        assert f"{group}_schema" in chain or "cache_data_schema" in chain or "default" in chain, \
            f"{file.relative_to(ROOT)} does not extend its schema"
        repeated = sorted(k for k, v in body.items() if k not in IDENTITY and k in defaults and defaults[k] == v)
        assert not repeated, f"{file.relative_to(ROOT)} repeats the schema's defaults of {repeated}"


def test_every_schema_has_a_group_in_the_default_list():
    chosen = {k for d in yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"] if isinstance(d, dict)
              for k in d}
    assert set(SCHEMAS) <= chosen | {"model"}  # model: null (a synthetic run) is a choice too
    assert "model" in chosen


def _count(monkeypatch, module, name, counts):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.fixture
def counts(monkeypatch):
    found: dict = {}
    for name in ("parse_lam", "parse_mult"):
        _count(monkeypatch, plan_mod, name, found)
    _count(monkeypatch, models, "read_model_shape", found)
    return found


def test_each_value_is_parsed_once_synthetic(counts):
    """validate (which builds the plan), the data module and the module: each lambda and mult parsed once."""
    cfg = compose_config(["data.dim=8", "data.n=64", "data.n_val=16", "data.batch_size=16", "data.active=2",
                          "dictionary.mult=[1,2]", "dictionary.lam=[0.1,auto,0.3]", "logger=none"])
    plan = validate(cfg)
    module = build_module(cfg, plan, build_datamodule(cfg, plan))
    assert counts == {"parse_mult": 2, "parse_lam": 3}
    assert module.grid == [(1, 0.1), (1, "auto"), (1, 0.3), (2, 0.1), (2, "auto"), (2, 0.3)]
    assert module.labels == [m.label for m in plan.grid] and module.labels[1] == "mult1_lamauto"


def test_each_value_is_parsed_once_with_a_model(counts, tmp_path):
    """A model's shape (config.json) is read once too: model=minilm with a given cache of its width."""
    rows = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    path = build.import_array(tmp_path / "rows.npy", tmp_path / "cache", shard_rows=128)
    cfg = compose_config(["model=minilm", "activation=token_embeddings", f"data.path={path}", "data.batch_size=32",
                          "dictionary.mult=1", "dictionary.lam=0.5", "logger=none"])
    plan = validate(cfg)
    datamodule = build_datamodule(cfg, plan)
    build_module(cfg, plan, datamodule)
    assert counts == {"parse_mult": 1, "parse_lam": 1, "read_model_shape": 1}
    assert plan.data.source == "cache" and plan.data.width == datamodule.dim == 384 and plan.data.model.num_layers == 6


def test_the_plan_is_frozen():
    plan = validate(compose_config(["logger=none"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.grid = ()


def _package_imports(path: Path) -> set[str]:
    """The sparse_coding modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_coding"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sparse_coding")}
    return found


def test_the_config_package_has_no_import_cycle():
    """No module of sparse_coding/config imports one that imports it back (at the top or in a function)."""
    folder = ROOT / "sparse_coding" / "config"
    names = {f"sparse_coding.config.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    edges = {n: {m for m in _package_imports(p) if m in names and m != n} for n, p in names.items()}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in edges[start])

    cycles = sorted(n for n in names if reaches(n, n))
    assert not cycles, {n: sorted(edges[n]) for n in cycles}
    for old in ("config.py", "run_checks.py", "overrides.py", "preflight.py", "trainer.py"):
        assert not (ROOT / "sparse_coding" / old).exists(), f"sparse_coding/{old} is back"


def _top_level_imports(path: Path, modules: set) -> set:
    """The sparse_coding modules (of `modules`) a file imports when it is imported: at its top, not in a function."""
    found = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import x`: still the module's top
            nodes += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [n for h in getattr(node, "handlers", []) for n in h.body]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_coding"):
            found |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def test_the_package_has_no_import_cycle_at_module_top_level():
    """Importing any module of sparse_coding never comes back to it (imports inside functions left aside)."""
    package = ROOT / "sparse_coding"
    names = {".".join(("sparse_coding", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    edges = {n: _top_level_imports(p, set(names)) - {n} for n, p in names.items()}
    done: set = set()

    def visit(n, stack):
        if n in stack:
            return stack[stack.index(n):] + [n]
        if n in done:
            return None
        for m in sorted(edges[n]):
            cycle = visit(m, stack + [n])
            if cycle:
                return cycle
        done.add(n)
        return None

    cycles = [c for c in (visit(n, []) for n in sorted(names)) if c]
    assert not cycles, " -> ".join(cycles[0])
    for old in ("cache.py", "cache_store.py", "cache_build.py", "streaming.py", "datamodule.py", "synthetic.py",
                "preprocess.py", "rundir.py", "checkpoints.py"):
        assert not (package / old).exists(), f"sparse_coding/{old} is back"


def test_the_checks_import_nothing_heavy():
    code = ("import sys; import sparse_coding.config.checks, sparse_coding.config.overrides, "
            "sparse_coding.config.preflight; print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', "
            "'transformers', 'numpy') if m in sys.modules))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
