"""A cache whose rows can be told apart after any shuffle: row i carries its own index in column 0."""

import numpy as np
import pytest

from tests.helpers import import_cache

ROWS, WIDTH = 5000, 8


@pytest.fixture(scope="session")
def indexed_cache(tmp_path_factory):
    """(the rows, the cache folder): 5,000 rows of width 8 in shards of 1,000, row i holding i in column 0."""
    x = np.random.default_rng(1).standard_normal((ROWS, WIDTH)).astype(np.float32)
    x[:, 0] = np.arange(ROWS)
    return x, import_cache(tmp_path_factory.mktemp("indexed") / "cache", x, shard_rows=1000)
