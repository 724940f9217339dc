"""The report (sparse_coding.experiments.report, figures): figures and RESULTS.md from the tables, what is not done
yet, and no number given as the paper's, every claim with its rule and verdict."""

import re
import shutil

from sparse_coding.experiments import claims, report, tables
from sparse_coding.experiments.grid import EXPERIMENTS
from tests.helpers import ROOT


def test_figures_and_report(tiny_results, tmp_path):
    _, results, _ = tiny_results
    for name in ("sparsity", "controls", "dict_size", "sensitivity"):
        paths = report.plot_experiment(name, results)
        assert paths and all(p.stat().st_size > 10_000 for p in paths), name
    text = report.write_report(results, tmp_path / "RESULTS.md").read_text()
    for heading in ("Metric vs true sparsity", "Sparse vs controls", "Dictionary-size", "Sensitivity",
                    "The paper's claims, checked on our runs", "Not done at `--scale paper`"):
        assert heading in text
    assert "sparsity.png)" in text and "not run" in text  # missing experiments are said to be missing
    assert "| converged | λ conv. | capped | dead | samples seen | steps | seeds |" in text
    # a quick table from before the convergence check is named, never shown as a measurement
    (results / "functional.csv").write_text("model,layer,normalized_loss\nsmollm2,3,1.5\n")
    text = report.write_report(results, tmp_path / "RESULTS.md").read_text()
    quick = text.split("## Extra: the quick scale")[1]
    assert "Not shown: `functional.csv`" in quick and "Functional check" not in quick and "Metric vs true sparsity" in quick
    (results / "functional.csv").unlink()
    # the paper-scale tables sit in results/paper/: the same rows there feed the claims
    (results / "paper").mkdir(exist_ok=True)
    for name in ("sparsity", "controls"):
        (results / "paper" / f"{name}.csv").write_text((results / f"{name}.csv").read_text())
    text = report.write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "### Claim 1" in text and "not run at `--scale paper`" in text  # dict_size etc.
    # only paper-scale tables: the quick scale is said to be not run, never left blank
    only_paper = tmp_path / "only_paper"
    (only_paper / "paper").mkdir(parents=True)
    (only_paper / "paper" / "sparsity.csv").write_text((results / "sparsity.csv").read_text())
    text = report.write_report(only_paper, tmp_path / "RESULTS2.md").read_text()
    assert "Not run with the current code" in text.split("## Extra: the quick scale")[1]


def test_not_done_lists_unfinished_grids_and_unrun_extras(tmp_path):
    text = report.not_done_section(tmp_path)  # nothing run: every experiment, the extra too
    assert "| solver_gap | extra | 0 | no point measured yet |" in text
    assert f"| sparsity | {len(EXPERIMENTS['sparsity']('paper'))} | 0 |" in text
    (tmp_path / "solver_gap.csv").write_text("experiment,run,seconds\nsolver_gap,a,6.0\n")
    (tmp_path / "sparsity.csv").write_text("experiment,run,seconds\nsparsity,r0,60.0\n")
    text = report.not_done_section(tmp_path)
    assert "solver_gap" not in text  # an extra that has run is done
    left = len(EXPERIMENTS["sparsity"]("paper")) - 1
    assert f"| sparsity | {left + 1} | 1 | 1.0 | {left / 60:.1f} |" in text


def test_run_times_count_the_points_of_each_cpu(tmp_path):
    (tmp_path / "layers.csv").write_text("experiment,run,seconds,load_start,load_end,cpu\n"
                                         "layers,r0,60.0,1.0,1.0,Zen 1\nlayers,r1,120.0,2.0,2.0,Zen 1\n"
                                         "layers,r2,30.0,1.0,1.0,\n")
    report.record_timing(tmp_path, "layers", "paper", 300.0, 3)
    text = report.runtime_section({"paper": tmp_path})
    assert "| layers | --scale paper | 3 | 3.5 | 1.17 | 1.33 | Zen 1 ×2; not recorded ×1 |" in text
    # an entry written before CPUs were counted
    (tmp_path / "timing.json").write_text('{"sparsity": {"scale": "paper", "points": 2, "rows": 2, "compute_seconds": 60}}')
    text = report.runtime_section({"paper": tmp_path})
    assert "| sparsity | --scale paper | 2 | 1.0 | 0.50 | n/r | not recorded |" in text


def _claim_blocks(text: str) -> dict[int, str]:
    blocks = text.split("### Claim ")[1:]
    return {int(b.split("\n", 1)[0]): b for b in blocks}


def test_report_has_no_paper_digits_and_every_claim_a_rule_and_verdict(tmp_path):
    """SPEC §7 withdrew the paper's figure values: no table column or sentence gives a number as the paper's, and
    each of the six claims states its verdict rule before our numbers and ends with a verdict."""

    paper_like = re.compile(r"\|\s*paper\s*\||paper.s (value|curve|number)", re.IGNORECASE)
    committed = ROOT / "docs"
    (tmp_path / "paper").mkdir()
    for csv in (committed / "results" / "paper").glob("*.csv"):
        shutil.copy(csv, tmp_path / "paper" / csv.name)
    for text in (report.write_report(tmp_path, tmp_path / "RESULTS.md").read_text(),
                 (committed / "RESULTS.md").read_text()):
        assert not paper_like.search(text)
        blocks = _claim_blocks(text.split("## The paper's claims")[1].split("\n## ")[0])
        assert sorted(blocks) == [1, 2, 3, 4, 5, 6]
        for n, block in blocks.items():
            assert claims.CLAIMS[n] in block
            rule, numbers, verdict = (block.index(k) for k in ("**Verdict rule.**", "**Our numbers.**", "**Verdict:**"))
            assert rule < numbers < verdict
            assert any(f"**Verdict:** **{v}**" in block for v in claims.VERDICTS)
        assert "held-out" in text and "in-sample values were not recorded" in text
    for name in ("PAPER_SPARSITY", "PAPER_CONTROLS", "PAPER_EMBEDDINGS", "PAPER_BERT_MEDIUM"):
        assert not hasattr(tables, name)
