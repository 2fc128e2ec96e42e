"""The synthetic text tasks and the tiny language model: answers right by construction, exact match
scored in one forward pass equal to greedy decoding, one task per client, and the whole run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from fedmerge.data import DataSpec, load_federated
from fedmerge.data.text_tasks import BOS, CHARACTERS, EOS, IGNORED, PAD, TASKS, decode, text_task_examples
from fedmerge.errors import ConfigError
from fedmerge.evaluation.scores import score
from fedmerge.models import build_model
from fedmerge.train import TrainPlan
from fedmerge.train.loop import train


def prompt_and_answer(row: torch.Tensor, target: torch.Tensor) -> tuple[str, str]:
    answer_positions = (target != IGNORED).nonzero().squeeze(-1)
    start = int(answer_positions[0])  # the input position whose next token is the answer's first
    return decode(row[1:start + 1]), decode(target[answer_positions])


def expected_answer(task: str, body: str) -> str:
    if task == "addition":
        return str(sum(int(v) for v in body.split("+")))
    if task == "counting":
        letter, word = body.split(":")
        return str(word.count(letter))
    return {"reversal": body[::-1], "sorting": "".join(sorted(body)), "copying": body}[task]


def test_every_example_answers_its_prompt():
    """Each answer recomputed from the decoded prompt, in plain Python."""
    examples = text_task_examples(per_task=200)
    names = list(TASKS)
    for row, target, label in zip(examples.x, examples.targets, examples.y):
        prompt, answer = prompt_and_answer(row, target)
        task, body = names[int(label)], prompt[1:-1]
        assert prompt.endswith("=") and int(target[target != IGNORED][-1]) == EOS
        assert answer == expected_answer(task, body), (task, prompt, answer)
    assert len(examples) == 5 * 200 and set(examples.y.tolist()) == {0, 1, 2, 3, 4}
    assert len({tuple(r.tolist()) for r in examples.x}) == len(examples)  # distinct examples


def greedy_exact_match(model, row: torch.Tensor, target: torch.Tensor) -> bool:
    """Decode greedily from the prompt, one token at a time, and compare with the answer and EOS."""
    positions = (target != IGNORED).nonzero().squeeze(-1)
    tokens = row[: int(positions[0]) + 1].tolist()
    wanted = target[positions].tolist()
    for _ in wanted:
        logits = model(torch.tensor([tokens]))[0, :, -1]
        tokens.append(int(logits.argmax()))
        if tokens[-1] == EOS:
            break
    return tokens[len(tokens) - len(wanted):] == wanted if len(tokens) >= len(wanted) else False


def test_exact_match_in_one_pass_is_greedy_decoding():
    data = load_federated(DataSpec(dataset="text-tasks", num_clients=2, partition="iid", seed=0))
    model = build_model("tiny-lm", data.input_shape, data.num_classes, seed=0)
    train(model, data.pretrain, TrainPlan(local_steps=150, lr=0.003, optimizer="adamw"), seed=0)
    test = data.test.subset(torch.arange(120))
    model.eval()
    with torch.no_grad():
        decoded = [greedy_exact_match(model, r, t) for r, t in zip(test.x, test.targets)]
        scored = score(model, test).accuracy
    assert 0 < sum(decoded) < len(decoded)  # neither nothing nor everything: the comparison means something
    assert scored == sum(decoded) / len(decoded)


def test_one_task_per_client_and_a_vocabulary_the_model_reads():
    data = load_federated(DataSpec(dataset="text-tasks", num_clients=5, partition="pathological",
                                   classes_per_client=1, seed=0))
    tasks = [set(c.train.y.tolist()) for c in data.clients]
    assert all(len(t) == 1 for t in tasks) and set().union(*tasks) == {0, 1, 2, 3, 4}
    assert data.chance_level == 0.0  # exact match: guessing scores nothing
    assert int(data.test.x.max()) < 3 + len(CHARACTERS) and {PAD, BOS} <= set(data.test.x.unique().tolist())


def test_tiny_lm_on_images_is_one_clear_error():
    with pytest.raises(ConfigError, match="tiny-lm reads token sequences"):
        build_model("tiny-lm", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="transforms images; dataset 'text-tasks' is text"):
        load_federated(DataSpec(dataset="text-tasks", num_clients=4, partition="transforms", seed=0))


@pytest.mark.slow  # a whole run: pre-training, five clients, every rule tuned
def test_the_tiny_lm_preset_tells_the_merging_story(tmp_path, cache_dir):
    from simulations.config import load_config
    from simulations.experiment import run_experiment

    config = load_config("tiny-lm-tasks", [f'cache-dir="{cache_dir}"', 'engine="inprocess"',
                                           "pretrain-steps=600", "local-steps=150"])
    output = run_experiment(config, tmp_path / "run", progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    own = [c["accuracy"] for c in results["clients"]]
    assert sum(own) / len(own) > results["base"]["client_accuracy"]  # each client learned its task
    assert set(results["strategies"]) == set(config.strategies)
    assert all(s["normalized_accuracy"] is not None for s in results["strategies"].values())
    assert output.merged and all(c["bytes_sent"] > 0 for c in results["clients"])


@pytest.mark.slow  # two cells of a language sweep
def test_a_sweep_runs_on_the_text_tasks(tmp_path, cache_dir):
    import csv

    from simulations.sweep import SweepSpec, run_sweep

    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
name = "tiny-lm-skew"
preset = "tiny-lm-tasks"
seeds = [0]
[set]
partition = "dirichlet"
pretrain-steps = 200
local-steps = 40
local-steps-spread = 4.0
lora-rank = 2
lora-send = "factors"
strategies = ["fedavg", "ties"]
scale = 1.0
engine = "inprocess"
cache-dir = "{cache_dir}"
[grid]
alpha = [0.3, 3.0]
""")
    out = run_sweep(SweepSpec.load(spec), tmp_path / "out", progress=False)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["alpha"], r["strategy"]) for r in rows} == {(a, s) for a in ("0.3", "3.0") for s in ("fedavg", "ties")}
    for cell in (out / "cells").iterdir():
        clients = json.loads((cell / "results.json").read_text())["clients"]
        assert len({c["local_steps"] for c in clients}) > 1 and all(c["lora_rank"] == 2 for c in clients)
        assert all(0 < c["bytes_sent"] < 0.1 * 344_000 for c in clients)  # factors, not the dense 344 KB
