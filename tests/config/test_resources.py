"""The resources a run needs (sparse_coding.config.resources): a size that cannot fit in memory is refused before
anything is allocated."""

from __future__ import annotations

import pytest

from sparse_coding.config import resources
from sparse_coding.config.checks import validate
from sparse_coding.config.compose import compose_config
from sparse_coding.errors import ConfigError
from tests.helpers import QUIET, one_line

TINY = [*QUIET, "data.dim=8", "data.n=256", "data.n_val=64", "data.batch_size=64", "dictionary.mult=2",
        "trainer.max_epochs=2"]


def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating(monkeypatch):
    with pytest.raises(ConfigError, match="needs at least .* GiB of memory .*Gram matrix") as e:
        validate(compose_config(TINY + ["dictionary.mult=4000", "data.dim=256"]))  # a 1M x 1M Gram matrix
    one_line(e.value)
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 10)
    with pytest.raises(ConfigError, match="is available: lower dictionary.mult"):
        validate(compose_config(TINY))


def test_accelerators_this_machine_lacks_are_seen_as_missing():
    """MPS is Apple's (never on Linux), a TPU needs torch_xla; unknown names are a caller's bug."""
    import importlib.util
    import sys

    import torch

    assert resources.has_accelerator("mps") is (sys.platform == "darwin" and torch.backends.mps.is_available())
    assert resources.has_accelerator("tpu") is (importlib.util.find_spec("torch_xla") is not None)
    with pytest.raises(ValueError, match="unknown accelerator"):
        resources.has_accelerator("cuda")


def test_cpu_model_names_the_generation_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\n")
    assert resources.cpu_model(info) == "AMD EPYC (family 23, model 1)"
    info.write_text("processor\t: 0\nmodel name\t: ARMv8 Processor\n")  # no family or model numbers
    assert resources.cpu_model(info) == "ARMv8 Processor"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model name at all
    assert resources.cpu_model(info) is None
    assert resources.cpu_model(tmp_path / "missing") is None
