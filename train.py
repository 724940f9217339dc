"""Entry point: compose the Hydra config, validate it (fast, before heavy imports), run.

The code is `sparse_coding.cli.train` (also the console script `sparse-coding-train`)."""

from sparse_coding.cli import train

if __name__ == "__main__":
    train()
