"""LoRA clients: the task vector is the dense (α/r)·B·A of each adapted weight, as PEFT's own
merge_and_unload() makes it; factors sent instead make the same dense update on the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fedmerge import merge
from fedmerge.data import DataSpec, load_federated
from fedmerge.errors import ConfigError, MergeError
from fedmerge.models import build_model
from fedmerge.train import TrainPlan
from fedmerge.train.local import local_update
from fedmerge.train.lora import dense_task_vector, dense_update, factor_arrays, lora_factors, tensor_names, with_lora
from fedmerge.train.loop import train


@pytest.fixture(scope="module")
def text():
    return load_federated(DataSpec(dataset="text-tasks", num_clients=3, partition="pathological",
                                   classes_per_client=1, seed=0))


def test_a_lora_task_vector_is_what_peft_merge_and_unload_adds(text):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = tensor_names(model)
    lora = with_lora(model, rank=4, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    train(lora, text.clients[0].train, TrainPlan(local_steps=20, lr=0.01, optimizer="adam"), seed=1)
    ours = dense_update(lora_factors(lora, names), base)
    merged = lora.merge_and_unload().state_dict()  # PEFT's own: W + (α/r)·B·A per adapted layer
    adapted = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert len(adapted) == 3 * 2  # two layers
    for key in base:
        peft_delta = merged[key].double() - base[key].double()
        np.testing.assert_allclose(ours[key].double().numpy(), peft_delta.numpy(), rtol=0, atol=1e-6)
        if key in adapted:
            assert ours[key].abs().max() > 1e-4  # trained, and of rank at most 4
            assert np.linalg.matrix_rank(ours[key].double().numpy(), tol=1e-6) <= 4
        else:
            assert not ours[key].any()  # frozen: no update


def test_factors_sent_instead_make_the_same_dense_update_in_fewer_bytes(text):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = model.state_dict()
    plans = {send: TrainPlan(local_steps=10, lr=0.01, optimizer="adam", lora_rank=2, lora_send=send)
             for send in ("dense", "factors")}
    updates = {send: local_update("tiny-lm", base, text.clients[1], plan, seed=0, input_shape=text.input_shape,
                                  num_classes=text.num_classes) for send, plan in plans.items()}
    assert updates["dense"].factors is None and updates["factors"].factors is not None
    for key, value in updates["dense"].task_vector.items():
        torch.testing.assert_close(updates["factors"].task_vector[key], value, rtol=0, atol=0)
    rebuilt = dense_task_vector(updates["factors"].factors, base)  # what the server makes of them
    for key, value in updates["dense"].task_vector.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=0)
    sent = {send: sum(t.numel() * t.element_size() for t in u.sent.values()) for send, u in updates.items()}
    assert sent["factors"] < sent["dense"] / 5


def test_task_arithmetic_over_lora_clients_is_fedavg_of_their_dense_updates(text):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = model.state_dict()
    plan = TrainPlan(local_steps=5, lr=0.01, optimizer="adam", lora_rank=2)
    taus = [local_update("tiny-lm", base, c, plan, seed=0, input_shape=text.input_shape,
                         num_classes=text.num_classes).task_vector for c in text.clients]
    ta = merge("task_arithmetic", taus)
    avg = merge("fedavg", taus)
    for key in base:
        np.testing.assert_allclose((ta[key] / 3).double().numpy(), avg[key].double().numpy(), rtol=1e-6, atol=1e-9)


def test_lora_targets_that_name_no_layer_are_one_error_listing_the_layers(text):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    with pytest.raises(ConfigError, match=r"lora-targets=\('qproj',\) names none of the model's linear layers "
                                          r"\(.*q_proj.*\)"):
        with_lora(model, 2, 8.0, 0.0, ("qproj",))


@pytest.mark.parametrize("change,needle", [
    (lambda f: {k: v for k, v in f.items() if not k.endswith("::lora_A")}, "comes without"),
    (lambda f: {**f, "model.norm.weight": torch.zeros(3)}, "also holds 'model.norm.weight'"),
    (lambda f: {k.replace("q_proj", "x_proj"): v for k, v in f.items()}, "a weight the base model does not have"),
    (lambda f: {k: (v[:, :-1] if k.endswith("::lora_A") else v) for k, v in f.items()}, "do not make its"),
])
def test_bad_factors_in_a_reply_are_one_merge_error(text, change, needle):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = tensor_names(model)
    lora = with_lora(model, 2, 8.0, 0.0, ("q_proj",))
    arrays = factor_arrays(lora_factors(lora, names))
    with pytest.raises(MergeError, match=needle):
        dense_task_vector(change(arrays), base)


def test_a_lora_client_with_dropout_trains_the_same_update_every_time(text):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = model.state_dict()
    plan = TrainPlan(local_steps=5, lr=0.01, optimizer="adam", lora_rank=2, lora_dropout=0.3)
    a, b = (local_update("tiny-lm", base, text.clients[2], plan, seed=0, input_shape=text.input_shape,
                         num_classes=text.num_classes).task_vector for _ in range(2))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def save_causal_lm(directory, tied: bool):
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    from fedmerge.data.text_tasks import CHARACTERS

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(directory)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def causal_lm_directory(tmp_path_factory):
    """A tiny Llama saved with a character-level tokenizer: what `causal-lm:DIR` reads."""
    return save_causal_lm(tmp_path_factory.mktemp("causal-lm") / "tiny", tied=False)


def test_a_causal_lm_from_a_directory_reads_the_text_tasks_through_its_own_tokenizer(causal_lm_directory):
    from fedmerge.data.text_tasks import IGNORED, text_task_texts
    from fedmerge.io.state import load_state
    from fedmerge.models.language import tokenizer
    from fedmerge.train import PretrainSpec, pretrained_base

    model = f"causal-lm:{causal_lm_directory}"
    data = load_federated(DataSpec(dataset="text-tasks", num_clients=2, partition="iid", seed=0,
                                   encoder=str(causal_lm_directory)))
    tok = tokenizer(causal_lm_directory)
    row, target = data.test.x[0], data.test.targets[0]
    answer = tok.decode(target[target != IGNORED].tolist(), skip_special_tokens=True)
    whole = tok.decode(row.tolist(), skip_special_tokens=True).replace(" ", "")
    answer = answer.replace(" ", "")
    assert (whole[: -len(answer)], answer) in set(text_task_texts().pairs)  # the task's own text, re-tokenized
    base, cached = pretrained_base(PretrainSpec(), model, 0, data, None)  # the directory's own weights
    saved = load_state(causal_lm_directory / "model.safetensors")
    assert cached and all(torch.equal(base[k], saved[k]) for k in saved)
    plan = TrainPlan(local_steps=5, lr=0.01, optimizer="adam", lora_rank=2, lora_targets=("q_proj", "v_proj"))
    update = local_update(model, base, data.clients[0], plan, seed=0, input_shape=data.input_shape,
                          num_classes=data.num_classes)
    changed = {k for k, v in update.task_vector.items() if v.any()}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}


def test_a_cached_lora_client_sends_its_factors_again(text, tmp_path):
    model = build_model("tiny-lm", text.input_shape, text.num_classes, seed=0)
    base = model.state_dict()
    plan = TrainPlan(local_steps=5, lr=0.01, optimizer="adam", lora_rank=2, lora_send="factors")
    first, again = (local_update("tiny-lm", base, text.clients[0], plan, seed=0, input_shape=text.input_shape,
                                 num_classes=text.num_classes, cache_dir=tmp_path) for _ in range(2))
    assert not first.cached and again.cached and again.factors is not None
    assert set(again.factors) == set(first.factors)
    for key in first.factors:
        torch.testing.assert_close(again.factors[key], first.factors[key], rtol=0, atol=0)
    for key in first.task_vector:
        torch.testing.assert_close(again.task_vector[key], first.task_vector[key], rtol=0, atol=0)


def test_a_causal_lm_with_tied_embeddings_loads_and_its_lora_update_reaches_both_names(tmp_path):
    """Checkpoints of tied embeddings store the shared matrix once; the model names it twice."""
    from fedmerge.train import PretrainSpec, pretrained_base

    directory = save_causal_lm(tmp_path / "tied", tied=True)
    model = f"causal-lm:{directory}"
    data = load_federated(DataSpec(dataset="text-tasks", num_clients=2, partition="iid", seed=0,
                                   encoder=str(directory)))
    base, _ = pretrained_base(PretrainSpec(), model, 0, data, None)
    assert torch.equal(base["lm_head.weight"], base["model.embed_tokens.weight"])
    assert base["lm_head.weight"].data_ptr() != base["model.embed_tokens.weight"].data_ptr()  # savable
    plan = TrainPlan(local_steps=3, lr=0.01, optimizer="adam", lora_rank=2, lora_targets=("lm_head",))
    update = local_update(model, base, data.clients[0], plan, seed=0, input_shape=data.input_shape,
                          num_classes=data.num_classes)
    tau = update.task_vector
    assert tau["lm_head.weight"].any() and torch.equal(tau["lm_head.weight"], tau["model.embed_tokens.weight"])
    full = local_update(model, base, data.clients[0], TrainPlan(local_steps=3, lr=0.01, optimizer="adam"), seed=0,
                        input_shape=data.input_shape, num_classes=data.num_classes)
    assert torch.equal(full.task_vector["lm_head.weight"], full.task_vector["model.embed_tokens.weight"])
