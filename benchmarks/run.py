"""Every benchmark, one command (`make bench`): the solver tables, the fit loop against its GEMMs, then the
training step and data path (among them the cache extraction against the bare forward pass, interleaved, with
the ratio). Results: benchmarks/results/{solver,fit,data}.{json,md}. Not part of the test suite.

    python -m benchmarks.run [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse

from benchmarks import data_bench, fit_bench, solver_bench


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run of every benchmark")
    args = parser.parse_args(argv)
    common = ["--device", args.device] + (["--quick"] if args.quick else [])
    solver_bench.main(common)
    fit_bench.main(["--quick"] if args.quick else [])
    data_bench.main(common)


if __name__ == "__main__":
    main()
