"""`python -m sparse_coding OVERRIDES`: the training entry point (= `python train.py`, `sparse-coding-train`),
runnable from any directory wherever the package is installed; the sweep files run it this way."""

from sparse_coding.cli import train

if __name__ == "__main__":
    train()
