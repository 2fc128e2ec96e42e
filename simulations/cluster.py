"""Where Ray runs: a Ray of its own on this machine, kept on the loopback address and offline, or a
running cluster named by ``RAY_ADDRESS``. Light to import (no torch, no Flower), so that a process
can start Ray while it is still importing the rest."""

from __future__ import annotations

import logging
import os
from typing import Any

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}

LOOPBACK_ENV = {
    # Ray on Linux swaps a node address of 127.0.0.1 for the machine's interface address; with this
    # off it keeps loopback, so a local simulation's services, workers and connections stay on
    # 127.0.0.1 (read when Ray is imported: it must be in the environment before that).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def joins_a_cluster() -> bool:
    """True when Ray is told to join a running cluster (``RAY_ADDRESS``) instead of starting its own."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _cluster_is_remote() -> bool:
    """True when ``RAY_ADDRESS`` names a cluster elsewhere (its nodes must reach this machine's
    interface address); a cluster on 127.0.0.1 stays on loopback like a local simulation."""
    host = os.environ.get("RAY_ADDRESS", "").removeprefix("ray://").rsplit(":", 1)[0]
    return bool(host) and host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def set_offline_env() -> None:
    """Flower and Ray must not reach the network at run time, and a local Ray stays on the loopback
    address; a user's explicit setting wins."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if not _cluster_is_remote():
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)




def ray_init_args() -> dict[str, Any]:
    """``ray.init``'s arguments for fedmerge: quiet logs, no dashboard and, for a Ray of our own,
    the loopback address (joining a cluster, the cluster decides)."""
    if joins_a_cluster():
        return {"logging_level": logging.ERROR, "log_to_driver": False}
    return {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False,
            "_node_ip_address": "127.0.0.1"}


def start_ray(num_cpus: int, num_gpus: int) -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a Ray of ``num_cpus`` CPUs and ``num_gpus``
    GPUs on this machine (on loopback: :func:`set_offline_env` must have run before Ray's import)."""
    import ray

    if joins_a_cluster():
        ray.init(**ray_init_args())
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **ray_init_args())
