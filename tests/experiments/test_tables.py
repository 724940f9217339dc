"""The report's tables (sparse_coding.experiments.tables): the massive-activation summary, seed groups (collapsed
seeds left out, robust summaries, status cells), and the sample-size table with its threshold and figure."""

import numpy as np
import pytest

from sparse_coding.experiments import tables
from sparse_coding.experiments.figures import plot_sample_size
from sparse_coding.experiments.grid import sample_size_points
from sparse_coding.experiments.massive import analyse_layer
from sparse_coding.experiments.tables import (gap_threshold, layer_ranges, massive_summary, sample_size_groups,
                                              section_sample_size)


def test_massive_summary_names_the_layers_a_few_rows_rule():
    rng = np.random.default_rng(0)
    pos = np.arange(1280) % 128  # 10 sinks: under 1 % of the rows
    layers = {}
    for k in range(4):
        x = rng.standard_normal((1280, 16))
        if k in (1, 2):
            x[pos == 0, 5] += 100.0
        layers[str(k)] = analyse_layer(x, pos)
    text = massive_summary({"layers": layers})
    assert "Above half at hidden states 1–2 as stored" in text and "No row away from the first position" in text
    assert layer_ranges(["7", "3", "4", "5", "12"]) == "3–5, 7, 12" and layer_ranges([]) == ""


def _row(seed, nl, **kw):
    return {"a": 10, "data": "sparse_linear", "seed": seed, "normalized_loss": nl, "avg_coef_norm": nl / 2,
            "l0": 20.0, "loss": 1.0, "explained_variance": 0.95, "dead_fraction": 0.0, "capped_fraction": 0.0,
            "converged": True, "lam_converged": True, "samples_seen": 1000, "optimizer_steps": 10, **kw}


def test_group_excludes_collapsed_seeds_and_summarises_by_median():
    rows = [_row(s, v) for s, v in enumerate((5.0, 5.2, 4.8, 50.0, 5.1))]
    rows[3]["dead_fraction"] = 0.9  # most features dead: collapsed
    rows.append(_row(5, 5.0, explained_variance=0.3))  # far below the others' explained variance: collapsed
    g = tables.group(rows, ("a",), ("normalized_loss",))[0]
    assert g["collapsed"] == [3, 5] and g["n_seeds"] == 4 and not g["robust"]
    assert g["normalized_loss"] == pytest.approx(5.025)  # mean of the four kept seeds, the collapsed one not in it
    rows.append(_row(6, 5.3))
    g = tables.group(rows, ("a",), ("normalized_loss",))[0]
    assert g["robust"] and g["normalized_loss"] == 5.1 and (g["normalized_loss_lo"], g["normalized_loss_hi"]) == (4.8, 5.3)
    assert "5.1 [4.8–5.3]" == tables.ms(g, "normalized_loss") and not g["flagged"]
    cells = tables.status_cells(g)
    assert cells[0] == "7/7" and cells[-1] == "7, 2 collapsed (seed 3, 5; left out of the values)"
    # converged counts every seed run: 5 seeds of which 2 collapsed unconverged read "3/5", never "3/3"
    heavy = [_row(s, 50.0 + s) for s in range(3)] + [_row(s, 900.0, dead_fraction=0.9, converged=False) for s in (3, 4)]
    g = tables.group(heavy, ("a",), ("normalized_loss",))[0]
    assert tables.status_cells(g)[0] == "3/5" and tables.seeds_text(g).startswith("5, 2 collapsed")
    assert g["converged_all"] and not g["flagged"]  # the values come from the 3 kept seeds, all converged
    # one seed: the run's own standard error is the error bar; unconverged or capped points are flagged
    one = tables.group([_row(0, 5.0, normalized_loss_se=0.3, converged=False)], ("a",), ("normalized_loss",))[0]
    assert one["normalized_loss_err"] == 0.3 and one["flagged"] and one["converged"] == "0/1"
    assert tables.group([_row(0, 5.0, capped_fraction=0.02)], ("a",), ("normalized_loss",))[0]["flagged"]


def test_sample_size_grid_table_and_figure(tmp_path):
    """Issue 19: the sample-size points, and a table that states where the gap falls within gap_tol."""
    pts = sample_size_points("paper")
    fixed = [p for p in pts if p.x.get("n") not in (None, "fresh")]
    assert all("data.fresh=false" in p.overrides for p in fixed)
    assert all("data.fresh=true" in p.overrides for p in pts if p.x.get("n") == "fresh")
    assert {p.x["tokens"] for p in pts if p.x.get("model")} == {50_000, 100_000, 200_000, 400_000, 800_000}
    assert len({p.key("paper") for p in pts}) == len(pts)
    rows = []
    for n, gap in ((4096, 0.30), (16384, 0.10), (65536, 0.015), (262144, 0.004), ("fresh", 0.001)):
        rows.append({"experiment": "sample_size", "seed": 0, "data": "sparse_linear", "a": 10, "n": n, "dim": 256,
                     "normalized_loss": 7.0, "normalized_loss_se": 0.03, "in_sample_normalized_loss": 7 / (1 + gap),
                     "generalization_gap": gap, "generalization_gap_se": 0.005, "sample_sufficient": gap <= 0.02,
                     "converged": True, "run": f"r{n}"})
    groups = [g for g in sample_size_groups(rows)]
    assert [g["size"] for g in groups] == [4096, 16384, 65536, 262144, "fresh"]
    assert gap_threshold(groups, "rows") == "within 2% from 65,536 rows on"
    rows[2]["generalization_gap"] = 0.05  # a later size above the bar moves the threshold up
    assert gap_threshold(sample_size_groups(rows), "rows") == "within 2% from 262,144 rows on"
    text = section_sample_size(rows)
    assert "| sparse_linear a=10 | fresh |" in text and "5 runs behind this table, 5 converged" in text
    assert plot_sample_size(rows, tmp_path)[0].is_file()


def test_a_cache_series_says_how_its_values_move_with_size():
    """A model's cache series names its smallest and largest sizes' held-out and in-sample values (in size order,
    not row order); a synthetic series and a one-point series say nothing of it."""
    rows = [{"experiment": "sample_size", "seed": 0, "model": "minilm", "layer": 3, "corpus": "wiki", "tokens": t,
             "normalized_loss": held, "normalized_loss_se": 0.05, "in_sample_normalized_loss": ins,
             "generalization_gap": held / ins - 1, "generalization_gap_se": 0.01, "sample_sufficient": False,
             "converged": True, "run": f"r{t}"}
            for t, held, ins in ((400_000, 6.79, 6.62), (50_000, 5.91, 4.97), (100_000, 6.26, 5.73))]
    text = section_sample_size(rows)
    assert ("from 50,000 to 400,000 tokens held-out moves 5.91 → 6.79 and in-sample 4.97 → 6.62" in text
            and "reads further into the corpus" in text)
    assert "reads further into the corpus" not in section_sample_size(rows[:1])


def _functional_row(model, layer, clean, rec, zero, mean, fvu, retrieval=None):
    return {"model": model, "layer": layer, "tokens": 8192, "clean_loss": clean, "reconstruction_loss": rec,
            "loss_increase": rec - clean, "zero_ablation_loss": zero, "fraction_recovered": (zero - rec) / (zero - clean),
            "mean_ablation_loss": mean, "fraction_recovered_vs_mean": (mean - rec) / (mean - clean),
            "retrieval_top1": retrieval, "retrieval_top1_mean_ablated": None if retrieval is None else 0.1,
            "heldout_fvu": fvu, "heldout_l0": 40.0, "lam": 1.0, "normalized_loss": 5.0, "converged": True}


def test_functional_section_has_a_table_per_model_in_its_own_measure(tmp_path):
    from sparse_coding.experiments.figures import plot_functional

    rows = [_functional_row("minilm", 1, -1.1e-08, 0.02, 0.9, 0.6, 0.08, retrieval=1.0),  # rounding of an older row
            _functional_row("minilm", 0, 0.0, 0.5, 0.9, 0.6, 0.2, retrieval=0.5),
            _functional_row("smollm2", 12, 4.3, 8.7, 10.8, 9.6, 0.002),
            _functional_row("smollm2", 3, 4.3, 4.6, 10.8, 9.8, 0.07)]
    text = tables.section_functional(rows)
    smol, mini = text.split("**minilm (raw)**")
    assert smol.startswith("**smollm2 (raw)** — measure: next-token loss (nats)") and "retrieval" not in smol
    assert "measure: 1 − cos(sentence embedding, clean)" in mini and "retrieval top-1 (Φα)" in mini
    # the hidden states in order, and each model's verdict in its own unit and reason
    assert mini.index("| 0 |") < mini.index("| 1 |") and smol.index("| 3 |") < smol.index("| 12 |")
    assert "e-08" not in mini and "| 1 | 0 | 0.02 |" in mini  # the clean distance is shown as the 0 it is
    assert "At hidden state 12 it recovers only 0.17 (+4.4 nats)" in smol and "not what the model uses" in smol
    assert "keeps at least 90% of the behaviour (vs mean-ablation) at 1." in mini
    assert "At hidden state 0 it recovers only 0.167 (+0.5)" in mini and "carries behaviour the features miss" in mini
    assert "positions replaced" not in text  # every position, without the remedy
    # a remedy dictionary: its own table, with the share of positions it replaced (the rest stay clean)
    remedy = dict(_functional_row("smollm2", 12, 4.3, 4.4, 10.8, 9.6, 0.1), preprocess="remedy", replaced_share=0.97)
    text = tables.section_functional(rows + [remedy])
    assert "**smollm2 (raw)**" in text and "**smollm2 (remedy)**" in text
    block = text.split("**smollm2 (remedy)**")[1].split("**minilm")[0]
    assert "| hidden state | positions replaced |" in block and "| 12 | 0.97 |" in block
    assert "attention-sink rows it leaves out stay as the clean model computed them" in block
    (path,) = plot_functional(rows + [remedy], tmp_path)
    assert path.is_file() and path.stat().st_size > 0
