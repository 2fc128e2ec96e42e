"""λ tuning: the grid, the search on synthetic scores, and end to end on validation splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge import MergeError
from fedmerge.errors import MergeOverflowError
from fedmerge.evaluation.tuning import LAMBDA_GRID, scale_grid, tune, tune_method
from fedmerge.merging import METHODS
from fedmerge.merging.linear import FEDGMA_RHO_GRID
from fedmerge.task_vector import apply
from simulations.config import ExperimentConfig
from simulations.experiment import run_experiment


def test_the_papers_grid_and_the_wider_grid_for_sum_methods():
    assert len(LAMBDA_GRID) == 40 and LAMBDA_GRID[0] == 0.05 and LAMBDA_GRID[-1] == 2.0
    assert scale_grid("mean", 8) == list(LAMBDA_GRID)
    wide = scale_grid("sum", 8)
    assert wide[0] == pytest.approx(0.05 / 8) and wide[-1] == 2.0 and set(LAMBDA_GRID) <= set(wide)
    with pytest.raises(MergeError):
        scale_grid("median", 8)


def vectors():
    return [{"v": torch.tensor([1.0, 2.0])}, {"v": torch.tensor([3.0, -2.0])}]


def test_tune_picks_the_scale_that_maximises_a_synthetic_score():
    calls = []

    def score(merged, scale):  # best where scale · merged[0] is 1.2, i.e. scale = 0.6 for fedavg (mean 2)
        calls.append(scale)
        return -abs(scale * float(merged["v"][0]) - 1.2)

    result = tune_method("fedavg", vectors(), score)
    assert result.scale == pytest.approx(0.6) and result.options == {}
    assert len(calls) == 40 and result.scores[0][LAMBDA_GRID.index(0.6)] == result.score
    assert torch.equal(result.merged["v"], torch.tensor([2.0, 0.0]))
    assert result.report()["grid"]["scale"] == list(LAMBDA_GRID)


def test_sum_methods_search_below_the_papers_grid():
    # task_arithmetic sums to 4; the best scale, 0.025 = 0.05/N with N = 2, lies only on the wide grid
    result = tune_method("task_arithmetic", vectors(), lambda m, s: -abs(s * float(m["v"][0]) - 0.1))
    assert result.scale == pytest.approx(0.025)


def test_rho_is_tuned_jointly_and_merges_once_per_option_set():
    merges = []

    def merge_fn(options):
        merges.append(options)
        return {"v": torch.tensor([options.get("rho", 0.0)])}

    # the score peaks at rho = 0.4 and scale = 1.5
    result = tune(merge_fn, lambda m, s: -abs(float(m["v"][0]) - 0.4) - abs(s - 1.5), LAMBDA_GRID,
                  [{"rho": r} for r in FEDGMA_RHO_GRID])
    assert result.options == {"rho": 0.4} and result.scale == 1.5
    assert len(merges) == len(FEDGMA_RHO_GRID)
    assert len(result.scores) == 9 and all(len(row) == 40 for row in result.scores)


def test_identical_merges_reuse_their_scores_and_plateaus_pick_the_middle():
    calls = []
    result = tune(lambda o: {"v": torch.ones(1)}, lambda m, s: calls.append(s) or (1.0 if 0.5 <= s <= 0.7 else 0.0),
                  [0.4, 0.5, 0.6, 0.7, 0.8], [{"a": 1}, {"a": 2}])
    assert len(calls) == 5 and result.scale == 0.6 and result.options == {"a": 1}


# float32 task vectors of size 1e30: θ0 + λ·τ leaves float32's range (3.4e38) for λ beyond ~3e8
BASE = {"v": torch.zeros(3)}
LARGE = [{"v": torch.tensor([1e30, 2e30, -1e30])}, {"v": torch.tensor([3e30, 2e30, 1e30])}]


def mean_weight(merged, scale):
    """A score that grows with λ, read off the model θ0 + λ·τ itself (so an overflow surfaces here)."""
    return float(apply(BASE, merged, scale)["v"].double().mean()) / 1e30


def test_a_scale_whose_model_overflows_is_unusable_and_never_chosen():
    grid = [0.5, 1.0, 1e9, 2.0]  # the mean τ is (2e30, 2e30, 0): 1e9 · 2e30 overflows float32
    result = tune_method("fedavg", LARGE, mean_weight, scales=grid)
    assert result.scale == 2.0 and result.score == pytest.approx(2.0 * 4 / 3)
    assert result.scores[0][2] == -math.inf and all(math.isfinite(v) for i, v in enumerate(result.scores[0]) if i != 2)
    assert all(torch.isfinite(t).all() for t in apply(BASE, result.merged, result.scale).values())


def test_a_plateau_of_missing_scores_never_picks_an_overflowing_scale():
    # every usable λ scores NaN (say, no client beats chance): the middle of the usable ones, 1.0, not 1e10
    def nan_score(merged, scale):
        apply(BASE, merged, scale)
        return float("nan")

    assert tune_method("fedavg", LARGE, nan_score, scales=[1e9, 0.5, 1e10, 1.0, 2.0, 1e11]).scale == 1.0


def test_overflowing_option_sets_are_skipped_and_all_overflowing_is_one_error():
    def merge_fn(options):
        if options["rho"] > 0.5:
            raise MergeOverflowError("merged tensor 'v' is not finite")
        return {"v": torch.tensor([options["rho"]])}

    result = tune(merge_fn, lambda m, s: float(m["v"][0]) * s, [1.0, 2.0], [{"rho": 0.9}, {"rho": 0.4}, {"rho": 0.6}])
    assert result.options == {"rho": 0.4} and result.scale == 2.0
    assert result.scores == [[-math.inf, -math.inf], pytest.approx([0.4, 0.8]), [-math.inf, -math.inf]]
    with pytest.raises(MergeOverflowError, match=r"every λ in \[1e\+09, 1e\+10\]"):
        tune_method("fedavg", LARGE, mean_weight, scales=[1e9, 1e10])


def test_option_grids_and_fixed_options():
    assert [o["rho"] for o in METHODS["fedgma"].tuning_grid(vectors())] == list(FEDGMA_RHO_GRID)
    assert METHODS["fedgma"].tuning_grid(vectors(), {"rho": 0.3}) == [{}]
    norms = sorted(float(x["v"].norm()) for x in vectors())
    rhos = [o["rho"] for o in METHODS["cclip"].tuning_grid(vectors())]
    assert rhos[0] == pytest.approx(norms[0]) and max(rhos) < norms[1] and len(rhos) == 5
    assert METHODS["tsv"].tuning_grid(vectors()) == [{}]


@pytest.mark.slow  # a full run with λ and ρ searches
def test_tuning_end_to_end_on_the_clients_validation_splits(small_config):
    config = small_config.replace(strategies=["fedavg", "fedgma", "ties"], scale={"fedavg": 1.0, "fedgma": "tune",
                                                                                   "ties": "tune"},
                                  **{"byzantine-fraction": 0.25, "byzantine-mode": "scale", "byzantine-scale": 2.0})
    out = run_experiment(config, progress=False)
    s = out.results["strategies"]
    assert s["fedavg"]["scale"] == 1.0 and "tuning" not in s["fedavg"]
    for m in ("fedgma", "ties"):
        t = s[m]["tuning"]
        assert s[m]["scale"] == t["scale"] and t["scale"] in t["grid"]["scale"]
        best = max(max(row) for row in t["scores"])
        assert t["score"] == best
    assert "rho" in s["fedgma"]["tuning"]["options"]
    # the reported validation score is reproducible from the saved merged vector and the chosen λ: the
    # mean of merged / own over the honest clients whose own model beats chance (1/10 on digits)
    from fedmerge.data import load_federated
    from fedmerge.evaluation import Evaluator
    from fedmerge.models import build_model
    from fedmerge.task_vector import apply

    data = load_federated(config.data_spec())
    ev = Evaluator(build_model(config.model, data.input_shape, data.num_classes))
    honest = [i for i in sorted(out.task_vectors) if i not in out.results["byzantine"]]
    assert len(honest) == len(out.task_vectors) - 1  # one attacker replied, and is not counted
    vals = [data.clients[i].val for i in honest]
    own = np.array([ev.accuracy(apply(out.base, out.task_vectors[i], 1.0), v) for i, v in zip(honest, vals)])
    merged = apply(out.base, out.merged["fedgma"], s["fedgma"]["scale"])
    kept = own > 0.1
    expected = np.mean(np.array(ev.accuracies(merged, vals), dtype=np.float64)[kept] / own[kept])
    assert s["fedgma"]["tuning"]["score"] == pytest.approx(float(expected), rel=1e-12)


def test_config_accepts_tune_globally_per_method_and_in_flat_form():
    assert ExperimentConfig(scale="tune").merging.scale == "tune"
    assert ExperimentConfig(scale="fedavg=1,tsv=tune").merging.scale["tsv"] == "tune"
    from fedmerge.errors import ConfigError
    with pytest.raises(ConfigError, match='scale.tsv must be a number or "tune"'):
        ExperimentConfig(scale={"tsv": "auto"})
