"""Synthetic text tasks for language models, made here (nothing downloads): addition, reversal,
sorting, copying and counting, as prompt → answer strings over a small character vocabulary.

Each example is one sequence ``BOS prompt = answer EOS``, padded to :data:`SEQ_LEN` tokens. A model
reads every token but the last and is trained to predict the answer and its EOS only. An example
counts as correct when each of those tokens is the model's top prediction given the tokens before it,
which is exactly when greedy decoding from the prompt writes the answer and stops: exact match,
computed in one forward pass. The task of an example is its label, so label-skew partitioners deal
tasks to clients: ``partition = "pathological"`` with ``classes-per-client = 1`` gives one task per
client, ``dirichlet`` skewed mixtures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmerge.errors import ConfigError
from fedmerge.models.language import BOS, CHARACTERS, EOS, PAD, SEQ_LEN, VOCAB_SIZE  # noqa: F401  (tiny-lm's vocabulary)

EXAMPLES_PER_TASK = 600
IGNORED = -100  # a target position the loss and the score skip (cross-entropy's ignore_index)

_TOKEN = {c: i + 3 for i, c in enumerate(CHARACTERS)}
_LETTERS = "abcdefgh"


def _letters(rng: np.random.Generator, low: int, high: int) -> str:
    return "".join(rng.choice(list(_LETTERS), size=int(rng.integers(low, high + 1))))


def _addition(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    return f"A{a}+{b}=", str(a + b)


def _reversal(rng: np.random.Generator) -> tuple[str, str]:
    word = _letters(rng, 3, 6)
    return f"R{word}=", word[::-1]


def _sorting(rng: np.random.Generator) -> tuple[str, str]:
    word = _letters(rng, 3, 6)
    return f"S{word}=", "".join(sorted(word))


def _copying(rng: np.random.Generator) -> tuple[str, str]:
    word = _letters(rng, 3, 6)
    return f"C{word}=", word


def _counting(rng: np.random.Generator) -> tuple[str, str]:
    word, letter = _letters(rng, 3, 8), str(rng.choice(list(_LETTERS)))
    return f"N{letter}:{word}=", str(word.count(letter))


TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "addition": _addition, "reversal": _reversal, "sorting": _sorting, "copying": _copying, "counting": _counting,
}


Encoder = Callable[[str, str], tuple[list[int], int]]
"""``encode(prompt, answer)``: the tokens of the whole example, ending with EOS, and the position
of the answer's first token."""


def encode(prompt: str, answer: str) -> tuple[list[int], int]:
    """The character vocabulary's tokens of ``BOS prompt answer EOS`` and where the answer starts."""
    tokens = [BOS, *(_TOKEN[c] for c in prompt), *(_TOKEN[c] for c in answer), EOS]
    if len(tokens) > SEQ_LEN:
        raise ValueError(f"{prompt}{answer}: {len(tokens)} tokens, more than {SEQ_LEN}")
    return tokens, 1 + len(prompt)


def tokenizer_encoder(tokenizer: Any) -> tuple[Encoder, int]:
    """An :data:`Encoder` by a Hugging Face tokenizer (the prompt with its special tokens, then the
    answer and the EOS token), and its padding token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the model's tokenizer has no EOS token to end answers with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode_with(prompt: str, answer: str) -> tuple[list[int], int]:
        head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [*head, *tokenizer(answer, add_special_tokens=False)["input_ids"], eos], len(head)

    return encode_with, pad


def decode(tokens: Tensor | list[int]) -> str:
    """The characters of ``tokens``, without BOS, EOS and padding."""
    return "".join(CHARACTERS[t - 3] for t in (tokens.tolist() if isinstance(tokens, Tensor) else tokens) if t >= 3)


@dataclass(frozen=True)
class TokenSplit:
    """Examples of the text tasks: ``x`` the model's inputs (N × (SEQ_LEN − 1) tokens), ``targets``
    the next token at each input position where it is part of the answer (else ``IGNORED``), ``y``
    each example's task (what partitioners split by)."""

    x: Tensor
    targets: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | Tensor) -> TokenSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenSplit(self.x[index], self.targets[index], self.y[index])

    def label_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[index], self.targets[index]

    def fingerprint(self) -> str:
        """A digest of every token, target and label: what a cached client update was trained on."""
        digest = hashlib.sha256()
        for tensor in (self.x, self.targets, self.y):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class TextExamples:
    """Examples as text: (prompt, answer) pairs and each one's label (its task)."""

    pairs: tuple[tuple[str, str], ...]
    labels: tuple[int, ...]

    def tokens(self, encoder: Encoder = encode, pad: int = PAD) -> TokenSplit:
        """The examples as a model reads them: each encoded, padded to the longest, with targets on the
        answer's tokens and the EOS only."""
        encoded = [encoder(prompt, answer) for prompt, answer in self.pairs]
        length = max(len(tokens) for tokens, _ in encoded)
        rows, targets = [], []
        for tokens, start in encoded:
            padded = tokens + [pad] * (length - len(tokens))
            target = [IGNORED] * (length - 1)
            for position in range(start - 1, len(tokens) - 1):  # predicts the answer's tokens and EOS
                target[position] = padded[position + 1]
            rows.append(padded[:-1])
            targets.append(target)
        return TokenSplit(torch.tensor(rows), torch.tensor(targets), torch.tensor(self.labels))


def text_task_texts(tasks: tuple[str, ...] = tuple(TASKS), per_task: int = EXAMPLES_PER_TASK,
                    seed: int = 0) -> TextExamples:
    """``per_task`` distinct examples of each task (fewer where a task has fewer distinct ones),
    the same for the same seed; the label of each is its task's position in ``tasks``."""
    rng = np.random.default_rng(seed)
    pairs, labels = [], []
    for label, name in enumerate(tasks):
        seen: set[tuple[str, str]] = set()
        for _ in range(per_task * 20):
            if len(seen) == per_task:
                break
            example = TASKS[name](rng)
            if example not in seen:
                seen.add(example)
                pairs.append(example)
                labels.append(label)
    return TextExamples(tuple(pairs), tuple(labels))


def text_task_examples(tasks: tuple[str, ...] = tuple(TASKS), per_task: int = EXAMPLES_PER_TASK,
                       seed: int = 0) -> TokenSplit:
    """:func:`text_task_texts` in the character vocabulary (what ``tiny-lm`` reads), padded to
    :data:`SEQ_LEN` tokens."""
    split = text_task_texts(tasks, per_task, seed).tokens()
    width = SEQ_LEN - 1 - split.x.shape[1]
    return TokenSplit(torch.nn.functional.pad(split.x, (0, width), value=PAD),
                      torch.nn.functional.pad(split.targets, (0, width), value=IGNORED), split.y)
