"""The experiments' grid (sparse_coding.experiments.grid): every experiment of the issue with its points, seeds and
run keys at both scales, and the fresh-batch repeats of Fig. 1a and 1b."""

import json

from sparse_coding.experiments.grid import EXPERIMENTS


def test_grid_covers_the_issue():
    quick = {name: fn("quick") for name, fn in EXPERIMENTS.items()}
    paper = {name: fn("paper") for name, fn in EXPERIMENTS.items()}
    assert sorted({p.x["a"] for p in quick["sparsity"]}) == [2, 4, 8, 16, 20, 32, 64, 128, 256]
    # issue 11, item 1: Fig. 1a at d=256 (synthetic_paper.yaml) with the issue's list of a
    assert sorted({p.x["a"] for p in paper["sparsity"]}) == [2, 4, 8, 16, 20, 32, 64, 128, 256, 512]
    assert {p.x["data"] for p in quick["controls"]} == {"sparse_linear", "gaussian", "rademacher", "heavy_tailed",
                                                        "sparse_nonlinear"}
    # item 2: heavy-tailed with >= 5 seeds, dense controls with a raised solver cap; no separate d=256 repeat
    heavy = [p for p in paper["controls"] if p.x["data"] == "heavy_tailed"]
    assert len({p.seed for p in heavy}) >= 5 and all("solver.max_steps=2048" in p.overrides for p in heavy)
    assert paper["controls_d256"] == []
    # item 3: 2d..16d banks for a=10, a=20 and the Gaussian
    assert {(p.x["data"], p.x["a"]) for p in paper["dict_size"]} == {("sparse_linear", 10), ("sparse_linear", 20),
                                                                     ("gaussian", None)}
    layers = {(p.x["model"], p.x["layer"]) for p in quick["layers"]}
    assert len(layers) == 7 + 11  # quick: every third SmolLM2 hidden state
    assert {(p.x["model"], p.x["layer"]) for p in paper["layers"]} == layers
    # item 5: the same curve again with the massive-activation remedy
    assert all({"data.drop_positions=1", "data.max_norm_ratio=10"} <= set(p.overrides) for p in paper["layers_remedy"])
    assert {p.x["model"] for p in paper["layers_remedy"]} == {"smollm2"}  # MiniLM's data is unchanged by it
    assert {p.key("paper") for p in paper["layers_remedy"]}.isdisjoint({p.key("paper") for p in paper["layers"]})
    for name, pts in quick.items():  # every point has 3 seeds
        seeds = {}
        for p in pts:
            seeds.setdefault(json.dumps(p.x, sort_keys=True), set()).add(p.seed)
        assert all(len(s) >= 3 for s in seeds.values()), name
    # identical overrides share a run directory: Fig. 1a's a=20 is Fig. 1b's a=20
    a20 = [p for p in quick["sparsity"] if p.x["a"] == 20 and p.seed == 0][0]
    b20 = [p for p in quick["controls"] if p.x.get("a") == 20 and p.seed == 0][0]
    assert a20.key("quick") == b20.key("quick")
    assert a20.key("quick") != a20.key("paper")


def test_the_fresh_experiments_repeat_fig1a_and_1b_on_fresh_batches_with_the_real_nonlinear_control():
    for name, base in (("sparsity_fresh", "sparsity"), ("controls_fresh", "controls")):
        fresh, fixed = EXPERIMENTS[name]("paper"), EXPERIMENTS[base]("paper")
        assert len(fresh) == len(fixed) and {p.experiment for p in fresh} == {name}
        for p, q in zip(fresh, fixed):
            assert p.overrides[:len(q.overrides)] == q.overrides and "data.fresh=true" in p.overrides
            assert ("data.preact_std=1" in p.overrides) == (p.x["data"] == "sparse_nonlinear")
            assert p.key("paper") != q.key("paper")
