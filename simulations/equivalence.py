"""Task Arithmetic is one-shot FedAvg: the lesson behind ``fedmerge equivalence``, runnable.

Four demonstrations on the clients of one experiment config (the shipped default: 8 clients on the
bundled digits). Tutorial: ``docs/equivalence.md``.

1. :func:`one_shot`: the clients once through a one-shot Flower round whose strategy is FedAvg with
   server learning rate η (θ0 + η Σ p_i Δ_i), and once fine-tuned alone without Flower
   (:func:`fedmerge.train.local.local_update`) and merged by Task Arithmetic: λ = η/N for uniform p_i,
   per-client λ_i = η p_i for p_i ∝ num-examples, and λ_i = η (Σ_j p_j K_j) p_i / K_i for FedNova.
   The two ways must give the same weights to ``ONE_SHOT_TOLERANCE``.
2. :func:`multi_round`: R rounds of FedAvg through Flower, each client taking one full-batch plain SGD
   step (lr η_l) per round, against centralized gradient descent (lr η·η_l) on the union of the
   clients' data: equal to ``MULTI_ROUND_TOLERANCE`` after every round.
3. :func:`step_heterogeneity`: unequal local steps K_i; FedAvg weights client i by p_i K_i / Σ p_j K_j
   (objective inconsistency), FedNova by p_i.
4. :func:`data_heterogeneity`: Dirichlet alpha falling; the merged model falls, each client's own
   model stays good at home.

The heterogeneity demos always run in-process: both engines give bit-identical weights (tested).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from fedmerge import TaskVector, apply, merge
from fedmerge.data import FederatedData, Split, load_federated
from fedmerge.errors import ConfigError, FederationError
from fedmerge.io import atomic_path
from fedmerge.evaluation import Evaluator, score
from fedmerge.train.local import LocalUpdate, local_update
from fedmerge.merging import normalised_weights
from fedmerge.models import build_model
from fedmerge.train import TrainPlan, pretrained_base, single_thread, train
from simulations.config import ExperimentConfig
from simulations.experiment import run_engine, run_experiment
from simulations.plots import pyplot
from simulations.progress import RunProgress
from simulations.results import staged_directory, to_json
from simulations.results import ServerOutput
from simulations.server import client_config
from strategies.multi_round import TaskVectorFedAvg

ONE_SHOT_TOLERANCE = 1e-6  # float32 round-off of two summation orders is ~1e-7 here
MULTI_ROUND_TOLERANCE = 1e-5
SERVER_LR = 1.0  # η
ROUNDS, LOCAL_LR = 5, 0.3  # multi-round FedAvg: R rounds of one full-batch step with lr η_l
STEP_RANGE, STEP_LR = (10, 160), 0.02  # K_i spread geometrically over the clients; small steps
ALPHAS = (100.0, 1.0, 0.3, 0.1, 0.05)
DATA_STEPS = 50  # every client's K in the data-heterogeneity sweep


@dataclass(frozen=True)
class Check:
    """One equivalence: the model Flower produced, the model offline Task Arithmetic produced."""

    name: str
    formula: str
    flower_accuracy: float
    offline_accuracy: float
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def max_abs_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """max |a − b| over every floating-point entry of two state dicts (or task vectors)."""
    if set(a) != set(b):
        return math.inf
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()),
               default=0.0)


def weighted_task_arithmetic(base: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
                             coefficients: Sequence[float]) -> dict[str, Tensor]:
    """θ0 + Σ_i λ_i τ_i: Task Arithmetic with one coefficient per task, written as task-vector arithmetic."""
    total = cast(TaskVector, sum(c * TaskVector(t) for c, t in zip(coefficients, task_vectors)))
    return apply(base, total, 1.0)


def fednova_coefficients(p: Sequence[float], local_steps: Sequence[int], eta: float) -> list[float]:
    """λ_i = η (Σ_j p_j K_j) p_i / K_i: FedNova as Task Arithmetic."""
    tau_eff = sum(pj * kj for pj, kj in zip(p, local_steps))
    return [eta * tau_eff * pi / ki for pi, ki in zip(p, local_steps)]


def _base(config: ExperimentConfig) -> tuple[FederatedData, dict[str, Tensor]]:
    data = load_federated(config.data_spec())
    return data, pretrained_base(config.pretrain, config.model, config.seed, data, config.cache_path())[0]


def _complete(output: ServerOutput) -> ServerOutput:
    """The run, if every client's task vector made it into the merge (else the comparison is moot)."""
    if output.results["failures"]:
        f = output.results["failures"][0]
        raise FederationError(f"client {f['partition_id']} was left out of the Flower round: {f['reason']}")
    return output


def fine_tune_alone(config: ExperimentConfig) -> tuple[FederatedData, dict[str, Tensor], list[LocalUpdate]]:
    """Every client of ``config`` fine-tuned on its own, without Flower: (data, θ0, updates)."""
    data, base = _base(config)
    updates = [local_update(config.model, base, data.clients[i], plan, config.seed, data.input_shape,
                            data.num_classes) for i, plan in enumerate(config.client_plans())]
    return data, base, updates


# ------------------------------------------------------------------------------------------------
# 1. One-shot FedAvg (and FedNova) through Flower = Task Arithmetic on individually fine-tuned τ_i
# ------------------------------------------------------------------------------------------------


def one_shot(config: ExperimentConfig, eta: float = SERVER_LR,
             weightings: Sequence[str] = ("uniform", "num-examples")) -> dict[str, Any]:
    """Flower's one-shot FedAvg/FedNova against offline Task Arithmetic, for each weighting of p_i."""
    config = config.replace(strategies=["fedavg", "fednova"], scale=eta)
    data, base, updates = fine_tune_alone(config)
    taus = [u.task_vector for u in updates]
    steps = [u.local_steps for u in updates]
    sizes = [u.num_examples for u in updates]
    n = len(taus)
    evaluator = Evaluator(build_model(config.model, data.input_shape, data.num_classes))

    def check(name: str, formula: str, flower: dict, offline: dict) -> Check:
        return Check(name, formula, evaluator.accuracy(flower, data.test), evaluator.accuracy(offline, data.test),
                     max_abs_diff(flower, offline), ONE_SHOT_TOLERANCE)

    checks, tau_diff = [], 0.0
    for weighting in weightings:
        out = _complete(run_experiment(config.replace(weighting=weighting), progress=False))
        tau_diff = max([tau_diff] + [max_abs_diff(out.task_vectors[i], t) for i, t in enumerate(taus)])
        p = normalised_weights(sizes if weighting == "num-examples" else None, n)
        fedavg_model = apply(out.base, out.merged["fedavg"], eta)
        if weighting == "uniform":
            ta_model = apply(base, merge("task_arithmetic", taus), eta / n)
            checks.append(check("FedAvg, uniform p_i", f"θ0 + λ Σ τ_i, λ = η/N = {eta / n:.4g}", fedavg_model, ta_model))
        else:
            ta_model = weighted_task_arithmetic(base, taus, [eta * pi for pi in p])
            checks.append(check("FedAvg, p_i ∝ n_i", "θ0 + Σ λ_i τ_i, λ_i = η p_i", fedavg_model, ta_model))
        nova_model = weighted_task_arithmetic(base, taus, fednova_coefficients(p, steps, eta))
        checks.append(check(f"FedNova, {'uniform p_i' if weighting == 'uniform' else 'p_i ∝ n_i'}",
                            "θ0 + Σ λ_i τ_i, λ_i = η (Σ_j p_j K_j) p_i / K_i",
                            apply(out.base, out.merged["fednova"], eta), nova_model))
    return {
        "server_lr": eta, "num_clients": n, "engine": config.run.engine,
        "clients": [{"partition_id": i, "local_steps": k, "num_examples": m} for i, (k, m) in enumerate(zip(steps, sizes))],
        "task_vector_max_abs_diff": tau_diff,
        "checks": [{**asdict(c), "passed": c.passed} for c in checks],
    }


# ------------------------------------------------------------------------------------------------
# 2. Multi-round FedAvg with one full-batch step per round = centralized gradient descent
# ------------------------------------------------------------------------------------------------


def client_union(data: FederatedData) -> Split:
    """Every client's training split, concatenated: the data centralized training would see."""
    splits = [c.train for c in data.clients]
    assert all(isinstance(s, Split) for s in splits), "the lesson runs on in-memory datasets"
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))  # type: ignore[attr-defined]


def federated_trajectory(config: ExperimentConfig, base: Mapping[str, Tensor], plan: TrainPlan, rounds: int,
                         eta: float) -> list[dict[str, Tensor]]:
    """θ_0 … θ_R of ``rounds`` FedAvg rounds through Flower, every client training with ``plan``."""
    return run_engine(functools.partial(fedavg_app, base=dict(base), plan=plan, rounds=rounds, eta=eta), config)


def fedavg_app(config: ExperimentConfig, progress: RunProgress, deliver: Callable[[Any], None], *,
               base: dict[str, Tensor], plan: TrainPlan, rounds: int, eta: float) -> ServerApp:
    """A ServerApp running ``rounds`` rounds of task-vector FedAvg; it delivers θ_0 … θ_R."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        trajectory: list[dict[str, Tensor]] = []

        def record(server_round: int, arrays: ArrayRecord) -> None:
            trajectory.append(arrays.to_torch_state_dict())

        n = config.num_clients
        strategy = TaskVectorFedAvg(server_lr=eta, min_train_nodes=n, min_available_nodes=n)
        train_config = ConfigRecord({**client_config(config), **plan.to_config()})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(dict(base)), num_rounds=rounds, timeout=config.run.timeout,
                       train_config=train_config, evaluate_fn=record)
        deliver(trajectory)

    return app


def centralized_trajectory(config: ExperimentConfig, base: Mapping[str, Tensor], data: Split, lr: float,
                           rounds: int, input_shape: tuple[int, ...], num_classes: int) -> list[dict[str, Tensor]]:
    """θ_0 … θ_R of full-batch gradient descent with learning rate ``lr`` on ``data``."""
    model = build_model(config.model, input_shape, num_classes)
    model.load_state_dict(base)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    step = TrainPlan(local_steps=1, lr=lr, batch_size=len(data))  # plain SGD on every example = one GD step
    with single_thread():
        for r in range(rounds):
            train(model, data, step, seed=r)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def multi_round(config: ExperimentConfig, rounds: int = ROUNDS, local_lr: float = LOCAL_LR,
                eta: float = SERVER_LR) -> dict[str, Any]:
    """FedAvg (p_i ∝ n_i, one full-batch SGD step per round) against centralized GD, round by round."""
    config = config.replace(weighting="num-examples")
    data, base = _base(config)
    union = client_union(data)
    plan = TrainPlan(local_steps=1, lr=local_lr, batch_size=len(union), optimizer="sgd", weight_decay=0.0)
    federated = federated_trajectory(config, base, plan, rounds, eta)
    central = centralized_trajectory(config, base, union, eta * local_lr, rounds, data.input_shape, data.num_classes)
    model = build_model(config.model, data.input_shape, data.num_classes)
    per_round = []
    for r, (fed, cen) in enumerate(zip(federated, central)):
        model.load_state_dict(fed)
        fed_scores, fed_test = score(model, union), score(model, data.test)
        model.load_state_dict(cen)
        per_round.append({"round": r, "max_abs_diff": max_abs_diff(fed, cen),
                          "federated_loss": fed_scores.loss, "centralized_loss": score(model, union).loss,
                          "federated_accuracy": fed_test.accuracy, "centralized_accuracy": score(model, data.test).accuracy})
    worst = max(r["max_abs_diff"] for r in per_round)
    return {
        "rounds": rounds, "local_lr": local_lr, "server_lr": eta, "engine": config.run.engine,
        "num_examples": [len(c.train) for c in data.clients], "per_round": per_round,
        "max_abs_diff": worst, "tolerance": MULTI_ROUND_TOLERANCE,
        "passed": len(federated) == rounds + 1 and worst <= MULTI_ROUND_TOLERANCE,
    }


# ------------------------------------------------------------------------------------------------
# 3. Training heterogeneity: unequal K_i (objective inconsistency) and FedNova
# ------------------------------------------------------------------------------------------------


def spread_steps(n: int, lo: int, hi: int) -> list[int]:
    """n step counts spread geometrically from ``lo`` to ``hi``."""
    return [round(lo * (hi / lo) ** (i / max(1, n - 1))) for i in range(n)]


def step_heterogeneity(config: ExperimentConfig, steps: Sequence[int] | None = None,
                       lr: float = STEP_LR) -> dict[str, Any]:
    """One round, uniform p_i, unequal K_i: each client's weight in FedAvg's and FedNova's merge."""
    steps = list(steps or spread_steps(config.num_clients, *STEP_RANGE))
    config = config.replace(**{"local-steps": steps, "lr": lr, "weighting": "uniform", "engine": "inprocess",
                               "strategies": ["fedavg", "fednova"], "scale": 1.0})
    r = _complete(run_experiment(config, progress=False)).results
    steps = [c["local_steps"] for c in r["clients"]]
    n = len(steps)
    p = [1.0 / n] * n
    norms = [c["task_vector_norm"] for c in r["clients"]]
    implicit = {"fedavg": [pi * k / sum(pj * kj for pj, kj in zip(p, steps)) for pi, k in zip(p, steps)],
                "fednova": p}
    # Share of each client in the merged update: |coefficient| · ‖τ_i‖, normalised.
    raw = {"fedavg": [pi * nrm for pi, nrm in zip(p, norms)],
           "fednova": [c * nrm for c, nrm in zip(fednova_coefficients(p, steps, 1.0), norms)]}
    share = {m: [v / sum(vals) for v in vals] for m, vals in raw.items()}
    clients = [{
        "partition_id": c["partition_id"], "local_steps": c["local_steps"], "task_vector_norm": c["task_vector_norm"],
        "own_accuracy": c["accuracy"],
        **{f"{m}_{what}": val[i] for m in ("fedavg", "fednova") for what, val in
           (("implicit_weight", implicit[m]), ("update_share", share[m]),
            ("accuracy", r["strategies"][m]["client_accuracies"]))},
    } for i, c in enumerate(r["clients"])]
    return {
        "lr": lr, "local_steps": steps, "clients": clients,
        "accuracy": {m: r["strategies"][m]["accuracy"] for m in ("fedavg", "fednova")},
        "normalized_accuracy": {m: r["strategies"][m]["normalized_accuracy"] for m in ("fedavg", "fednova")},
        "base_accuracy": r["base"]["accuracy"],
        "share_ratio": {m: max(s) / min(s) for m, s in share.items()},  # 1 = every client counts equally
    }


# ------------------------------------------------------------------------------------------------
# 4. Data heterogeneity: Dirichlet alpha
# ------------------------------------------------------------------------------------------------


def data_heterogeneity(config: ExperimentConfig, alphas: Sequence[float] = ALPHAS,
                       local_steps: int = DATA_STEPS) -> dict[str, Any]:
    """One-shot FedAvg as label skew grows: merged vs own models, per Dirichlet alpha."""
    rows, skipped = [], []
    for alpha in alphas:
        cfg = config.replace(**{"partition": "dirichlet", "alpha": alpha, "local-steps": local_steps,
                                "strategies": ["fedavg"], "scale": 1.0, "engine": "inprocess"})
        try:
            r = run_experiment(cfg, progress=False).results
        except ConfigError as exc:  # Dirichlet cannot always give every client enough examples
            skipped.append({"alpha": alpha, "reason": str(exc)})
            continue
        clients = r["clients"]
        merged = r["strategies"]["fedavg"]
        rows.append({
            "alpha": alpha, "merged_accuracy": merged["accuracy"], "merged_client_accuracy": merged["client_accuracy"],
            "normalized_accuracy": merged["normalized_accuracy"],
            "own_local_accuracy": sum(c["accuracy"] for c in clients) / len(clients),
            "own_local_accuracy_min": min(c["accuracy"] for c in clients),
            "own_global_accuracy": sum(c["global_accuracy"] for c in clients) / len(clients),
            "base_accuracy": r["base"]["accuracy"],
        })
    return {"local_steps": local_steps, "rows": rows, "skipped": skipped}


# ------------------------------------------------------------------------------------------------
# Figures, the whole lesson, printing
# ------------------------------------------------------------------------------------------------


def plot_step_heterogeneity(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    clients = result["clients"]
    ks = [c["local_steps"] for c in clients]
    x = range(len(ks))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    for off, m, color in ((-width / 2, "fedavg", "tab:red"), (width / 2, "fednova", "tab:blue")):
        ax1.bar([i + off for i in x], [c[f"{m}_update_share"] for c in clients], width, color=color,
                label=f"{'FedAvg / Task Arithmetic' if m == 'fedavg' else 'FedNova'}")
        ax1.plot([i + off for i in x], [c[f"{m}_implicit_weight"] for c in clients], "_", color="black", ms=14,
                 mew=2, label="p_i K_i / Σ p_j K_j and p_i (first order)" if m == "fedavg" else None)
    ax1.set_xticks(list(x), [str(k) for k in ks])
    ax1.set_xlabel("client's local steps K_i")
    ax1.set_ylabel("share of the merged update")
    ax1.set_title("Who moves the merged model")
    ax1.legend(fontsize=8, loc="upper left")
    for m, color, marker in (("fedavg", "tab:red", "o"), ("fednova", "tab:blue", "s")):
        ax2.plot(ks, [100 * c[f"{m}_accuracy"] for c in clients], marker=marker, color=color,
                 label=f"{'FedAvg' if m == 'fedavg' else 'FedNova'} ({100 * result['accuracy'][m]:.1f}% global)")
    ax2.plot(ks, [100 * c["own_accuracy"] for c in clients], "k:", marker=".", label="client's own model")
    ax2.set_xscale("log")
    ax2.set_xlabel("client's local steps K_i")
    ax2.set_ylabel("accuracy on the client's local test split (%)")
    ax2.set_title("Merged model, client by client")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def plot_data_heterogeneity(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    rows = result["rows"]
    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label, style in (
        ("merged_accuracy", "merged model (FedAvg), global test", "o-"),
        ("own_local_accuracy", "clients' own models, own local test", "s--"),
        ("own_global_accuracy", "clients' own models, global test", "^:"),
    ):
        ax.plot(alphas, [100 * r[key] for r in rows], style, label=label)
    if rows:
        ax.axhline(100 * rows[0]["base_accuracy"], color="gray", lw=1, label="pre-trained base, global test")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Dirichlet alpha (smaller = more label skew →)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Data heterogeneity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


FIGURES = {"step_heterogeneity": ("step-heterogeneity.png", plot_step_heterogeneity),
           "data_heterogeneity": ("data-heterogeneity.png", plot_data_heterogeneity)}


def failures(report: Mapping[str, Any]) -> list[str]:
    """One line per equivalence that exceeded its tolerance (empty when all hold)."""
    bad = [f"{c['name']}: max |Δw| = {c['max_abs_diff']:.3g} > {c['tolerance']:g}"
           for c in report["one_shot"]["checks"] if not c["passed"]]
    mr = report["multi_round"]
    if not mr["passed"]:
        bad.append(f"multi-round FedAvg vs centralized GD: max |Δw| = {mr['max_abs_diff']:.3g} > {mr['tolerance']:g}")
    return bad


def run_lesson(config: ExperimentConfig, stage: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """All four demonstrations on ``config``'s clients; the report that ``write_lesson`` saves."""
    stage("One-shot FedAvg / FedNova through Flower vs Task Arithmetic")
    report: dict[str, Any] = {"config": config.to_dict(), "one_shot": one_shot(config, SERVER_LR)}
    stage(f"{ROUNDS} FedAvg rounds of one full-batch step vs centralized gradient descent")
    report["multi_round"] = multi_round(config, ROUNDS, LOCAL_LR, SERVER_LR)
    stage("Training heterogeneity: unequal local steps")
    report["step_heterogeneity"] = step_heterogeneity(config, spread_steps(config.num_clients, *STEP_RANGE), STEP_LR)
    stage("Data heterogeneity: Dirichlet alpha sweep")
    report["data_heterogeneity"] = data_heterogeneity(config, ALPHAS, DATA_STEPS)
    report["failures"] = failures(report)
    return report


def write_lesson(report: Mapping[str, Any], out: Path) -> Path:
    """``equivalence.json`` and one PNG per heterogeneity demo, moved into ``out`` in one rename."""
    with staged_directory(out) as staging:
        (staging / "equivalence.json").write_text(to_json(report))
        for key, (name, plot) in FIGURES.items():
            plot(report[key], staging / name)
    return out


def print_lesson(report: Mapping[str, Any], console: Console) -> None:
    os_ = report["one_shot"]
    t = Table(title=f"1. One-shot FedAvg through Flower (η = {os_['server_lr']:g}, {os_['num_clients']} clients, "
                    f"{os_['engine']}) = Task Arithmetic on clients fine-tuned alone")
    for col in ("Flower round", "Task Arithmetic", "Flower acc %", "TA acc %", "max |Δw|", ""):
        t.add_column(col, justify="right" if "acc" in col or "Δ" in col else "left")
    for c in os_["checks"]:
        t.add_row(c["name"], c["formula"], f"{100 * c['flower_accuracy']:.2f}", f"{100 * c['offline_accuracy']:.2f}",
                  f"{c['max_abs_diff']:.2e}", Text("ok", "green") if c["passed"] else Text("FAIL", "red"))
    console.print(t)
    console.print(f"   every client's τ_i through Flower vs alone: max |Δ| = {os_['task_vector_max_abs_diff']:.2e}; "
                  f"K_i = {[c['local_steps'] for c in os_['clients']]}, n_i = {[c['num_examples'] for c in os_['clients']]}")

    mr = report["multi_round"]
    t = Table(title=f"2. FedAvg, one full-batch SGD step per round (η_l = {mr['local_lr']:g}, p_i ∝ n_i) "
                    f"= gradient descent on all clients' data (lr = {mr['server_lr'] * mr['local_lr']:g})")
    for col in ("round", "FedAvg loss", "GD loss", "FedAvg acc %", "GD acc %", "max |Δw|"):
        t.add_column(col, justify="right")
    for r in mr["per_round"]:
        t.add_row(str(r["round"]), f"{r['federated_loss']:.5f}", f"{r['centralized_loss']:.5f}",
                  f"{100 * r['federated_accuracy']:.2f}", f"{100 * r['centralized_accuracy']:.2f}",
                  f"{r['max_abs_diff']:.2e}")
    console.print(t)

    sh = report["step_heterogeneity"]
    t = Table(title=f"3. Unequal local steps (uniform p_i, lr {sh['lr']:g}): share of each client in the merged update")
    for col in ("K_i", "‖τ_i‖", "FedAvg p_iK_i/ΣpK", "FedAvg share", "FedNova share", "FedAvg acc %", "FedNova acc %",
                "own acc %"):
        t.add_column(col, justify="right")
    for c in sh["clients"]:
        t.add_row(str(c["local_steps"]), f"{c['task_vector_norm']:.3f}", f"{c['fedavg_implicit_weight']:.3f}",
                  f"{c['fedavg_update_share']:.3f}", f"{c['fednova_update_share']:.3f}",
                  f"{100 * c['fedavg_accuracy']:.1f}", f"{100 * c['fednova_accuracy']:.1f}",
                  f"{100 * c['own_accuracy']:.1f}")
    console.print(t)
    console.print(f"   largest/smallest share: FedAvg {sh['share_ratio']['fedavg']:.2f}, FedNova "
                  f"{sh['share_ratio']['fednova']:.2f} (1 = equal); global accuracy: FedAvg "
                  f"{100 * sh['accuracy']['fedavg']:.2f}%, FedNova {100 * sh['accuracy']['fednova']:.2f}% "
                  f"(base {100 * sh['base_accuracy']:.2f}%)")

    dh = report["data_heterogeneity"]
    t = Table(title=f"4. Label skew (Dirichlet alpha, K = {dh['local_steps']} for every client)")
    for col in ("alpha", "merged acc %", "merged normalized %", "own models, local test %", "own models, global test %"):
        t.add_column(col, justify="right")
    for r in dh["rows"]:
        t.add_row(f"{r['alpha']:g}", f"{100 * r['merged_accuracy']:.2f}", f"{100 * r['normalized_accuracy']:.2f}",
                  f"{100 * r['own_local_accuracy']:.2f}", f"{100 * r['own_global_accuracy']:.2f}")
    console.print(t)
    for s in dh["skipped"]:
        console.print(Text.assemble((f"   alpha={s['alpha']:g} skipped:", "yellow"), " ", s["reason"]))
