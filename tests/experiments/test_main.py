"""The experiments CLI refuses a functional check it cannot run in one line, before loading any model."""

import pytest

from sparse_coding.experiments.__main__ import main


@pytest.mark.parametrize("only, says", [
    ("layer=x", "--only layer=x: give hidden states as integers, e.g. layer=15,18"),
    ("model=gpt2", "--only model=gpt2: the functional check runs on smollm2, minilm"),
    ("seed=1", "--only seed=...: the functional check selects by model=NAME, layer=K[,K...] and "
               "preprocess=raw|remedy only (it uses each layer's seed-0 dictionary)"),
    ("preprocess=token", "--only preprocess=token: raw (the layers curve) or remedy (layers_remedy)"),
])
def test_functional_refuses_a_bad_only(tmp_path, only, says):
    with pytest.raises(SystemExit) as err:
        main(["run", "functional", "--scale", "paper", "--root", str(tmp_path), "--results", str(tmp_path / "res"),
              "--only", only, "--no-wandb"])
    assert str(err.value) == says
    assert not (tmp_path / "res").exists()  # nothing written
