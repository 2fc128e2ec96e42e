"""Run one experiment end to end on the chosen engine and write its results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmerge.data import load_federated

from simulations.config import ExperimentConfig
from simulations.engine import quiet_flower_logs, run_inprocess, run_ray, set_offline_env
from simulations.progress import RunProgress
from simulations.results import check_out_dir, write_results
from simulations.server import ServerOutput, make_server_app


def run_experiment(
    config: ExperimentConfig, out: Path | None = None, *, progress: bool = True, console: Console | None = None
) -> ServerOutput:
    """Run ``config``; when ``out`` is given, write its results directory there (see ``write_results``)."""
    import clients  # the ClientApp; imported here so that `simulations` can load without Flower clients

    if out is not None:
        check_out_dir(out)  # fail before any work, not after it
    load_federated(config.data_spec())  # a bad data setting fails here, before any engine starts
    set_offline_env()
    quiet_flower_logs()
    sink: dict[str, Any] = {}
    t0 = time.perf_counter()
    with RunProgress(console, enabled=progress) as bar:
        server_app = make_server_app(config, bar, sink)
        if config.engine == "inprocess":
            run_inprocess(server_app, clients.app, config.num_clients)
        else:
            run_ray(server_app, clients.app, config.num_clients, config.client_cpus, config.client_gpus)
    output: ServerOutput = sink["output"]
    output.results["timing"]["total"] = time.perf_counter() - t0
    output.results["timing"]["engine"] = config.engine
    if out is not None:
        write_results(output, config, out)
    return output
