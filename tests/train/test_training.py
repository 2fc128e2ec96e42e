"""Local training runs exactly K steps, deterministically; the pre-trained base is cached."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedmerge import ConfigError
from fedmerge.data import DataSpec, load_federated
from fedmerge.evaluation.scores import score
from fedmerge.train.local import local_update
from fedmerge.models import MODELS, build_model
from fedmerge.train import PretrainSpec, TrainPlan, pretrained_base, train
from fedmerge.train.loop import batches


@pytest.fixture(scope="module")
def data():
    return load_federated(DataSpec(num_clients=4, seed=0))


@pytest.mark.parametrize("steps", [1, 7, 40])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_exactly_k_optimizer_steps(data, steps, optimizer):
    model = build_model("mlp", data.input_shape, data.num_classes)
    calls = []
    handle = register_optimizer_step_post_hook(lambda *a: calls.append(1))
    try:
        train(model, data.clients[0].train, TrainPlan(local_steps=steps, optimizer=optimizer), seed=0)
    finally:
        handle.remove()
    assert len(calls) == steps


def test_batches_cover_every_example_each_pass():
    gen = torch.Generator().manual_seed(0)
    got = torch.cat(list(batches(10, 5, 4, gen)))
    assert sorted(got[:10].tolist()) == list(range(10)) and sorted(got[10:].tolist()) == list(range(10))


def test_batch_larger_than_data_is_full_batch():
    assert [len(b) for b in batches(3, 32, 2, torch.Generator())] == [3, 3]


TOKEN_MODELS = {"tiny-lm"}  # models that read the text tasks' tokens, not images


# CLIP and causal-lm need their weights: tests/models/test_clip.py, tests/train/test_lora.py
@pytest.mark.parametrize("model", [name for name, family in MODELS.items() if not family.needs_source])
def test_local_update_is_deterministic_and_learns(data, model):
    if model in TOKEN_MODELS:
        data = load_federated(DataSpec(dataset="text-tasks", num_clients=3, seed=0))
    base_model = build_model(model, data.input_shape, data.num_classes, seed=0)
    base = base_model.state_dict()
    plan = TrainPlan(local_steps=30, lr=0.01, optimizer="adam")
    a = local_update(model, base, data.clients[1], plan, 0, data.input_shape, data.num_classes)
    b = local_update(model, base, data.clients[1], plan, 0, data.input_shape, data.num_classes)
    assert all(torch.equal(a.task_vector[k], b.task_vector[k]) for k in a.task_vector)
    assert a.local_steps == 30 and a.num_examples == len(data.clients[1].train)
    assert a.task_vector.norm() > 0 and a.train_loss < score(base_model, data.clients[1].train).loss
    if model not in TOKEN_MODELS:
        assert a.accuracy > 0.2  # better than chance (0.1) after 30 steps


@pytest.mark.parametrize("kwargs,needle", [
    ({"local_steps": 0}, "local-steps must be an integer >= 1"),
    ({"local_steps": 1, "lr": 0}, r"lr must lie in \(0, 10\], got 0"),
    ({"local_steps": 1, "lr": 1e6}, r"lr must lie in \(0, 10\], got 1000000.0"),
    ({"local_steps": 1, "batch_size": 0}, "batch-size"),
    ({"local_steps": 1, "optimizer": "lbfgs"}, "optimizer='lbfgs'"),
    ({"local_steps": 1, "weight_decay": -1}, r"weight-decay must lie in \[0, 100\], got -1"),
    ({"local_steps": 1, "weight_decay": 1e308}, r"weight-decay must lie in \[0, 100\], got 1e\+308"),
])
def test_bad_plans(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainPlan(**kwargs)


@pytest.mark.parametrize("lr", [0, -0.1, 10.5, 1e6])
def test_pretraining_learning_rate_is_checked_by_the_library_spec(lr):
    """PretrainSpec itself refuses what a run refuses, in the same words: lr in (0, 10]."""
    assert PretrainSpec(lr=10).lr == 10.0
    with pytest.raises(ConfigError) as info:
        PretrainSpec(lr=lr)
    assert str(info.value) == f"pretrain-lr must lie in (0, 10], got {lr!r}"


def test_pretrained_base_is_cached_by_its_settings(data, tmp_path, monkeypatch):
    spec = PretrainSpec(steps=20)
    first, cached1 = pretrained_base(spec, "mlp", 0, data, tmp_path)
    calls = []
    monkeypatch.setattr("fedmerge.train.pretrain.train", lambda *a, **k: calls.append(1))
    second, cached2 = pretrained_base(spec, "mlp", 0, data, tmp_path)
    assert (cached1, cached2) == (False, True) and calls == []
    assert all(torch.equal(first[k], second[k]) for k in first)
    _, cached3 = pretrained_base(PretrainSpec(steps=21), "mlp", 0, data, tmp_path)
    assert cached3 is False and len(list(tmp_path.glob("base-*.safetensors"))) == 2


def test_overlapping_single_thread_blocks_keep_one_thread_until_the_last_leaves():
    """A client abandoned at its deadline may leave its block while the next client trains: that
    must not give the next one every core (results would depend on the core count)."""
    import threading

    from fedmerge.train import single_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with single_thread():
                first_in.set()
                second_in.wait()
            first_out.set()

        def second():
            first_in.wait()
            with single_thread():
                second_in.set()
                first_out.wait()
                seen["after the first left"] = torch.get_num_threads()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"after the first left": 1}
        assert torch.get_num_threads() == 2  # the last to leave restored it
    finally:
        torch.set_num_threads(before)
