"""`python -m sparse_coding.cache build|import|verify ...` (see sparse_coding.cache.cli)."""

import sys

from sparse_coding.cache.cli import main

if __name__ == "__main__":
    sys.exit(main())
