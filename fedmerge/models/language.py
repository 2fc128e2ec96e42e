"""Causal language models: ``tiny-lm``, a small Llama-shaped decoder built from a transformers config
for the synthetic text tasks (pre-trained here, like the digits models), and ``causal-lm:SOURCE``,
any Hugging Face causal LM (a Hub id in the local cache or a directory) whose published weights are θ0.

Both are wrapped in :class:`CausalLM`, whose forward returns logits as N × vocabulary × positions:
the layout in which cross-entropy takes one target per position, so training and scoring treat
text as they treat classes (:mod:`fedmerge.evaluation.scores`: exact match per example).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.io.hub import resolve, transformers_module

# tiny-lm's vocabulary: padding, BOS, EOS, then one token per character the text tasks are written in
# (fedmerge.data.text_tasks), and the longest sequence it reads.
PAD, BOS, EOS = 0, 1, 2
CHARACTERS = "0123456789abcdefgh+=:ARSCN"
VOCAB_SIZE = 3 + len(CHARACTERS)
SEQ_LEN = 16

TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4}


class CausalLM(nn.Module):
    """A Hugging Face causal LM as fedmerge's models are used: ``forward(tokens)`` gives logits
    N × V × L (the next token's at each position); the state dict is the wrapped model's."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(input_ids=tokens).logits.transpose(1, 2)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # the wrapped model's names, as its checkpoints have them
        return self.lm.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.lm.load_state_dict(state, strict=strict, assign=assign)


def _token_input(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 1:
        raise ConfigError(f"model {name} reads token sequences; this dataset has inputs of shape {input_shape} "
                          "(use dataset = \"text-tasks\")")
    return input_shape[0]


def tiny_lm(input_shape: tuple[int, ...], num_classes: int) -> CausalLM:
    """A 2-layer, 64-wide Llama-shaped decoder over the text tasks' vocabulary (about 0.1M weights)."""
    length = _token_input(input_shape, "tiny-lm")
    tf = transformers_module()
    config = tf.LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max(length, SEQ_LEN), pad_token_id=PAD,
                            bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, **TINY_LM)
    return CausalLM(tf.LlamaForCausalLM(config))


def causal_lm(input_shape: tuple[int, ...], num_classes: int, source: str | os.PathLike) -> CausalLM:
    """The architecture of the causal LM at ``source`` (a Hub id in the cache or a directory),
    initialised from the seed; its published weights are θ0 (:func:`causal_lm_state`)."""
    _token_input(input_shape, f"causal-lm:{source}")
    tf = transformers_module()
    try:
        config = tf.AutoConfig.from_pretrained(resolve(source), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"causal-lm:{source}: unreadable config ({type(exc).__name__}: {exc})") from None
    return CausalLM(tf.AutoModelForCausalLM.from_config(config))


def tokenizer(source: str | os.PathLike) -> Any:
    """The tokenizer of the model at ``source`` (a Hub id in the cache or a directory)."""
    tf = transformers_module()
    try:
        return tf.AutoTokenizer.from_pretrained(resolve(source), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"{source}: its tokenizer cannot be loaded ({type(exc).__name__}: {exc})") from None


def causal_lm_state(source: str | os.PathLike) -> dict[str, Tensor]:
    """θ0 of ``causal-lm:SOURCE``: the model's published weights in float32 (what clients train in),
    every name of its state dict included: a checkpoint of tied embeddings stores the shared tensor
    once, the model names it twice (each gets its own copy: state files hold no shared tensors)."""
    tf = transformers_module()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(resolve(source), local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(f"causal-lm:{source}: its weights cannot be loaded ({type(exc).__name__}: {exc})") from None
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        state[key] = value.detach().clone() if value.data_ptr() in seen else value.detach()
        seen.add(value.data_ptr())
    return state
