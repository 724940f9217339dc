"""The names a config may hold (sparse_coding.config.keys): the Trainer's arguments, read from its source."""

from __future__ import annotations

import inspect

import pytorch_lightning as pl

from sparse_coding.config.keys import trainer_arguments


def test_trainer_arguments_are_the_installed_signature():
    """Read from Lightning's source without importing it; the same set the imported signature has."""
    expected = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    assert trainer_arguments() == expected
