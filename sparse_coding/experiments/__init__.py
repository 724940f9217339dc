"""Reproduction of the paper's experiments (issue 4): runner, extras, plots and the results report.

    python -m sparse_coding.experiments run sparsity controls --scale quick
    python -m sparse_coding.experiments report          # docs/RESULTS.md from docs/results/

`grid` lists the points, `runner` trains them (resumable), `extras` holds the checks beyond the
paper (solver gap, functional check), `report` draws the figures and writes docs/RESULTS.md.
"""
