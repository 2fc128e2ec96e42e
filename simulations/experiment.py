"""Run one experiment end to end on the chosen engine and write its results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp
from rich.console import Console

import clients
from fedmerge.data import load_federated

from simulations.config import ExperimentConfig
from simulations.engine import quiet_flower_logs, run_inprocess, run_ray, set_offline_env
from simulations.progress import RunProgress
from simulations.results import check_out_dir, write_results
from simulations.results import ServerOutput
from simulations.server import make_server_app


def run_experiment(
    config: ExperimentConfig, out: Path | None = None, *, progress: bool = True, console: Console | None = None
) -> ServerOutput:
    """Run ``config``; when ``out`` is given, write its results directory there (see ``write_results``)."""
    if out is not None:
        check_out_dir(out)  # fail before any work, not after it
    load_federated(config.data_spec())  # a bad data setting fails here, before any engine starts
    sink: dict[str, Any] = {}
    t0 = time.perf_counter()
    with RunProgress(console, enabled=progress) as bar:
        run_engine(make_server_app(config, bar, sink), config)
    output: ServerOutput = sink["output"]
    output.results["timing"]["total"] = time.perf_counter() - t0
    output.results["timing"]["engine"] = config.run.engine
    if out is not None:
        write_results(output, config, out)
    return output


def run_engine(server_app: ServerApp, config: ExperimentConfig) -> None:
    """Run ``server_app`` against fedmerge's ClientApp on ``config.run.engine``, offline, with quiet Flower logs."""
    set_offline_env()
    quiet_flower_logs()
    if config.run.engine == "inprocess":
        run_inprocess(server_app, clients.app, config.num_clients)
    else:
        run_ray(server_app, clients.app, config.num_clients, config.run.client_cpus, config.run.client_gpus)
