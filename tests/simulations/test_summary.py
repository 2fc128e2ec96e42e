"""What a user reads after a run or a sweep: the summary table, the sweep figures, failures in order."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from simulations.results import describe_setup, print_table, summary_rows


def results_with(byzantine: tuple[int, ...] = (), tuned: bool = False) -> dict:
    """A results dict of four clients (accuracies chosen by hand) in the layout server.py writes."""
    from simulations.config import ExperimentConfig

    config = ExperimentConfig.from_mapping({"name": "demo", "num-clients": 4, "partition": "dirichlet",
                                            "alpha": 0.3, "local-steps": "20:100",
                                            "byzantine-fraction": 0.25 if byzantine else 0.0}).to_dict()
    clients = [{"partition_id": i, "node_id": 100 + i, "accuracy": acc, "global_accuracy": g,
                "byzantine": i in byzantine}
               for i, (acc, g) in enumerate([(0.8, 0.5), (0.6, 0.4), (0.1, 0.05), (0.9, 0.7)])]
    strategy = {"scale": 0.4, "accuracy": 0.6, "client_accuracy": 0.7, "normalized_accuracy": 0.9,
                **({"tuning": {"scale": 0.4}} if tuned else {})}
    return {"config": config, "clients": clients, "failures": [], "method_failures": {},
            "base": {"accuracy": 0.2, "client_accuracy": 0.25, "normalized_accuracy": 0.3},
            "strategies": {"fedavg": strategy}}


def printed(results: dict) -> str:
    console = Console(file=io.StringIO(), width=200, markup=False)
    print_table(results, console)
    return console.file.getvalue()


def test_summary_says_what_ran():
    text = printed(results_with())
    assert "partition dirichlet alpha 0.3" in text and "local steps 20:100" in text and "4 clients" in text
    assert "attackers" not in text and "(tuned)" not in text


def test_tuned_scale_is_marked():
    assert "0.4 (tuned)" in printed(results_with(tuned=True))


def test_attackers_are_named_and_left_out_of_the_own_models_row():
    results = results_with(byzantine=(2,))
    text = printed(results)
    assert "attackers: client 2 (sign-flip)" in text
    assert "byzantine-fraction 0.25" in text
    own = summary_rows(results)[1]
    assert own["row"] == "clients' own models (mean of 3 honest)"
    assert own["accuracy"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)  # client 2's attacked model left out
    assert own["client_accuracy"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)


def test_setup_line_leaves_out_swept_knobs():
    config = results_with()["config"]
    assert "alpha" not in describe_setup(config, skip={"alpha"})
    assert "local steps" not in describe_setup(config, skip={"local-steps"})
