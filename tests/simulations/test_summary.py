"""What a user reads after a run or a sweep: the summary table, the sweep figures, failures in order."""

from __future__ import annotations

import io
import json
import math

import numpy as np
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


def test_normalized_accuracy_leaves_out_clients_at_or_below_chance():
    from fedmerge.evaluation import normalized_accuracy

    merged, own = [0.5, 0.3, 0.45, 0.2], [0.8, 0.1, 0.9, 0.05]
    keep = np.array(own) > 0.1  # ten classes: client 1 sits exactly at chance, client 3 below it
    expected = float(np.mean(np.array(merged, dtype=np.float64)[keep] / np.array(own, dtype=np.float64)[keep]))
    assert normalized_accuracy(merged, own, chance=0.1) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(normalized_accuracy([0.9, 0.5], [0.1, 0.02], chance=0.1))  # nobody learned: missing
    assert math.isnan(normalized_accuracy([0.3], [0.0]))  # a zero denominator is never used


def test_normalized_accuracy_of_a_run_counts_honest_clients_above_chance(small_config):
    """results.json's normalized accuracy of every strategy is, by hand from its own per-client
    accuracies, the mean of merged / own over the honest clients whose own model beats chance (1/10
    on digits): an attacker's own model (θ0 plus its attacked τ_i) is no reference."""
    from simulations.experiment import run_experiment

    config = small_config.replace(**{"strategies": ["fedavg", "median"], "pretrain-steps": 1,
                                     "lr": [0.1, 0.1, 1e-6, 0.1],  # client 2 barely moves from a weak θ0
                                     "byzantine-fraction": 0.25, "byzantine-mode": "scale", "byzantine-scale": 2.0})
    results = run_experiment(config, progress=False).results
    clients = results["clients"]
    own = np.array([c["accuracy"] for c in clients], dtype=np.float64)
    attacker = np.array([c["byzantine"] for c in clients])
    chance = 1 / 10
    # both rules matter here: an attacker whose own model beats chance, an honest client at or below it
    assert [c["partition_id"] for c in clients if c["byzantine"]] == results["byzantine"] and attacker.sum() == 1
    assert (own[attacker] > chance).all() and ((own > 0) & (own <= chance) & ~attacker).any()
    counted = ~attacker & (own > chance)
    for name, s in results["strategies"].items():
        merged = np.array(s["client_accuracies"], dtype=np.float64)
        expected = float(np.mean(merged[counted] / own[counted]))
        assert s["normalized_accuracy"] == pytest.approx(expected, rel=1e-12), name
        every_client = float(np.mean(merged[own > 0] / own[own > 0]))
        assert expected != pytest.approx(every_client, rel=1e-6), name  # the rules change the number


def test_normalized_accuracy_without_any_client_above_chance_shows_as_missing(tmp_path):
    from simulations.results import ServerOutput, write_results
    from simulations.config import ExperimentConfig

    results = results_with()
    results["base"]["normalized_accuracy"] = float("nan")
    results["strategies"]["fedavg"]["normalized_accuracy"] = float("nan")
    rows = summary_rows(results)
    assert [r["normalized_accuracy"] for r in rows] == [None, None, None]
    normalized_column = [line.split("│")[-2].strip() for line in printed(results).splitlines() if line.count("│") > 4]
    assert normalized_column == ["—", "—", "—"], normalized_column  # base, own models, fedavg
    write_results(ServerOutput(results, {}, {}, {}), ExperimentConfig(), tmp_path / "run")
    csv_rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert all(line.endswith(",") for line in csv_rows[1:])  # the CSV's last column is empty
    assert json.loads((tmp_path / "run" / "results.json").read_text())["base"]["normalized_accuracy"] is None
    # one client above chance: the own-models row is 1 by definition again
    assert summary_rows(results_with())[1]["normalized_accuracy"] == 1.0


def test_setup_line_leaves_out_swept_knobs():
    config = results_with()["config"]
    assert "alpha" not in describe_setup(config, skip={"alpha"})
    assert "local steps" not in describe_setup(config, skip={"local-steps"})


# -- sweeps: a summary table and figures that say what they show ------------------------------------------


def sweep_rows() -> list[dict]:
    """Two strategies × two alphas × two seeds, normalized accuracies chosen by hand."""
    rows = []
    for alpha, seed, fedavg, median in [(0.1, 0, 0.5, 0.7), (0.1, 1, 0.7, 0.9), (10.0, 0, 0.95, 1.0),
                                         (10.0, 1, 0.97, 1.02)]:
        for strategy, norm in (("fedavg", fedavg), ("median", median)):
            rows.append({"alpha": alpha, "seed": seed, "strategy": strategy, "accuracy": norm / 2,
                         "normalized_accuracy": norm, "base_accuracy": 0.1 + seed / 10})
    return rows


def test_sweep_summary_table_is_the_mean_normalized_accuracy_per_strategy_and_value(tmp_path):
    from simulations.sweep import print_sweep_summary, write_csv

    path = tmp_path / "results.csv"
    write_csv([{**r, "cell": "c"} for r in sweep_rows()], ["alpha"], path)
    console = Console(file=io.StringIO(), width=200, markup=False)
    print_sweep_summary(path, ["alpha"], console, title="tiny")
    text = console.file.getvalue()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert "strategy \\ alpha" in text and "0.1" in text and "10.0" in text and "tiny" in text
    # mean over the two seeds, in percent: fedavg (0.5+0.7)/2, (0.95+0.97)/2; median (0.7+0.9)/2, (1.0+1.02)/2
    assert [c.strip() for c in lines["fedavg"].split("│")[2:4]] == ["60.0", "96.0"]
    assert [c.strip() for c in lines["median"].split("│")[2:4]] == ["80.0", "101.0"]


def test_sweep_figure_has_legend_off_the_data_a_reference_line_and_a_title(tmp_path, monkeypatch):
    from simulations import plots

    figures = []
    plt = plots.pyplot()
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    plots.plot_knob(sweep_rows(), "alpha", tmp_path / "a.png", title="data-heterogeneity: 8 clients, lr 0.1")
    (fig,) = figures
    fig.canvas.draw()
    accuracy_ax, normalized_ax = fig.axes[:2]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert legends
    renderer = fig.canvas.get_renderer()
    for legend in legends:  # outside every axes' data area
        box = legend.get_window_extent(renderer)
        for ax in (accuracy_ax, normalized_ax):
            assert not box.overlaps(ax.get_window_extent(renderer))
    reference = [line for line in normalized_ax.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert reference and reference[0].get_linestyle() in (":", "--", "-.")
    assert not [line for line in accuracy_ax.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert "data-heterogeneity: 8 clients, lr 0.1" in fig._suptitle.get_text()
    assert "base changes with the seed" in fig._suptitle.get_text() or any(
        "seed" in t.get_text() for t in fig.texts)


def test_the_flower_app_prints_the_table_and_where_the_results_are(tmp_path, cache_dir, capsys):
    """`flwr run .` ends in ``flwr_main``: it prints what `fedmerge run` prints."""
    from flwr.app import Context, RecordDict

    import clients
    from simulations.engine import InProcessGrid
    from simulations.server import flwr_main

    out = tmp_path / "flwr-out"
    run_config = {"num-clients": 3, "local-steps": 5, "pretrain-steps": 20, "strategies": "fedavg,median",
                  "cache-dir": cache_dir, "engine": "inprocess", "out": str(out)}
    grid = InProcessGrid(clients.app, 3)
    flwr_main(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                            run_config=run_config))
    printed = capsys.readouterr().out
    assert (out / "results.json").is_file()
    assert "clients' own models (mean)" in printed and "median" in printed and "setup:" in printed
    assert f"results: {out}/results.json" in printed


def test_failures_are_listed_by_partition_whatever_order_replies_come_in():
    """Replies arrive in any order on Ray; the failures (results.json, logs, errors) are sorted."""
    from strategies import OneShotMerge

    strategy = OneShotMerge(("fedavg",), min_train_nodes=1, min_available_nodes=4)
    strategy._reset()
    strategy.partition_of = {13: 3, 11: 1, 12: 2, 10: 0}
    strategy.sent_to = [13, 11, 12, 10]  # none replies before the timeout
    strategy._sent_at = 0.0
    with pytest.raises(Exception, match="partition 0: .*partition 1: .*partition 2: .*partition 3: "):
        strategy.aggregate_train(1, [])
    assert [f.partition_id for f in strategy.failures] == [0, 1, 2, 3]


def test_flower_warnings_carry_no_colour_codes_off_a_terminal():
    import logging

    from flwr.common.logger import ConsoleHandler

    from simulations.engine import quiet_flower_logs

    handler = next(h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler))
    buffer = io.StringIO()  # not a terminal, as a pipe or a log file
    before = handler.setStream(buffer)
    try:
        quiet_flower_logs()
        logging.getLogger("flwr").warning("a client was left out")
    finally:
        handler.setStream(before)
    assert "a client was left out" in buffer.getvalue() and "\x1b[" not in buffer.getvalue()
