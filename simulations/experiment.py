"""Run one experiment end to end on the chosen engine and write its results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp
from rich.console import Console

import clients
from fedmerge.data import load_federated
from fedmerge.errors import FederationError

from simulations.config import ExperimentConfig, check_resources, load_plugins
from simulations.cluster import joins_a_cluster, set_offline_env
from simulations.engine import quiet_flower_logs, run_inprocess, run_ray
from simulations.isolation import Post, allow_result_type, run_isolated
from simulations.progress import ForwardedProgress, RunProgress
from simulations.results import check_out_dir, write_results
from simulations.results import ServerOutput
from simulations.server import make_server_app


AppBuilder = Callable[[ExperimentConfig, RunProgress, Callable[[Any], None]], ServerApp]
"""``build(config, progress, deliver)``: a ServerApp whose main hands its result to ``deliver``."""

allow_result_type(ServerOutput)


def run_experiment(
    config: ExperimentConfig, out: Path | None = None, *, progress: bool = True, console: Console | None = None
) -> ServerOutput:
    """Run ``config``; when ``out`` is given, write its results directory there (see ``write_results``)."""
    if out is not None:
        check_out_dir(out)  # fail before any work, not after it
    load_federated(config.data_spec())  # a bad data setting fails here, before any engine starts
    t0 = time.perf_counter()
    with RunProgress(console, enabled=progress) as bar:
        output: ServerOutput = run_engine(make_server_app, config, bar)
    output.results["timing"]["total"] = time.perf_counter() - t0
    output.results["timing"]["engine"] = config.run.engine
    if out is not None:
        write_results(output, config, out)
    return output


def run_engine(build: AppBuilder, config: ExperimentConfig, progress: RunProgress | None = None) -> Any:
    """Run the ServerApp ``build`` makes against fedmerge's ClientApp on ``config.run.engine``, offline,
    with quiet Flower logs, and return what it delivered.

    ``inprocess`` runs here; ``ray`` runs Flower's simulation in a child process (see
    :mod:`simulations.isolation`), so Ctrl-C, SIGTERM and the end of the round stop it at once.
    ``build`` must then pickle: a module-level function, or a ``functools.partial`` of one."""
    progress = progress or RunProgress(enabled=False)
    if config.run.engine == "ray" and not joins_a_cluster():
        check_resources(config.run.client_cpus, config.run.client_gpus)
    set_offline_env()  # before the Ray engine's child starts: it inherits the environment
    quiet_flower_logs()
    if config.run.engine == "inprocess":
        delivered: list[Any] = []
        run_inprocess(build(config, progress, delivered.append), clients.app, config.num_clients)
        if not delivered:
            raise FederationError("the ServerApp finished without a result")
        return delivered[0]
    return run_isolated(_run_on_ray, (build, config), progress.apply)


def _run_on_ray(post: Post, deliver: Callable[[Any], None], build: AppBuilder, config: ExperimentConfig) -> None:
    """The Ray engine's child process: the experiment's plugins, then Flower's simulation on Ray."""
    load_plugins(config.run.plugins)
    quiet_flower_logs()
    app = build(config, ForwardedProgress(post), deliver)
    run_ray(app, clients.app, config.num_clients, config.run.client_cpus, config.run.client_gpus)
