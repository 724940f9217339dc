"""Override strings checked before Hydra composes (sparse_coding.config.overrides): every Trainer argument is a
setting, with or without `+`; a misspelled key or a bad value is one line naming the closest valid key."""

from __future__ import annotations

import pytest

from sparse_coding.api import compose
from sparse_coding.config.keys import trainer_arguments
from sparse_coding.config.overrides import check_overrides
from sparse_coding.errors import ConfigError


def one_line_error(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_trainer_argument_is_a_setting_with_or_without_plus():
    for arg in sorted(trainer_arguments()):
        plain, plus = check_overrides([f"trainer.{arg}=1"]), check_overrides([f"+trainer.{arg}=1"])
        assert plus == [f"+trainer.{arg}=1"]
        assert plain[0] in (f"trainer.{arg}=1", f"++trainer.{arg}=1")  # ++: added or changed, whichever applies


@pytest.mark.parametrize("override, expected", [
    ("dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("+dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("++dictionary.mutl=4", "unknown setting dictionary.mutl: did you mean dictionary.mult?"),
    ("dictonary.mult=4", "did you mean dictionary.mult?"),
    ("data.lam=0.1", "did you mean dictionary.lam?"),
    ("convergence.tolerance=0.1", "did you mean convergence.tol?"),
    ("modle=minilm", "did you mean model?"),
    ("model=minlm", "did you mean model=minilm?"),
    ("trainer=ddp_cpuu", "did you mean trainer=ddp_cpu?"),
    ("experiment=layers_quick", "+experiment=layers_quick"),
    ("bogus=1", "the run config has no such key"),
    ("data.dim=abc", "data.dim=abc: Value 'abc'"),
    ("seed=1.5", "seed=1.5"),
    ("dictionary.mult.x=1", "dictionary.mult is a value, not a section"),
    ("layer=[1", "cannot read the override 'layer=[1'"),
])
def test_misspelled_keys_and_bad_values_are_one_line(override, expected):
    assert expected in one_line_error([override])


def test_synthetic_fields_are_refused_for_real_activations():
    assert "data.dim does not apply to data=cache" in one_line_error(["model=minilm", "layer=3", "data.dim=32"])
