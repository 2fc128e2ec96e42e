"""Local training that runs exactly K optimizer steps (not epochs)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from collections.abc import Iterator
from typing import Annotated

import torch
from pydantic import model_validator
from torch import nn

from fedmerge.errors import FederationError
from fedmerge.data.splits import Examples, Split, iterate_batches
from fedmerge.spec import (Float, LearningRate, Names, NonNegative, NonNegativeInt, Positive, PositiveInt, Spec, Str,
                           WeightDecay, check, one_of)
from fedmerge.models.registry import forward

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
LORA_SENDS = ("dense", "factors")


class TrainPlan(Spec):
    """How one client trains: K = ``local_steps`` optimizer steps (not epochs) of mini-batch training.

    ``warmup_steps``: linear warm-up from lr/warmup to lr over the first steps; ``lr_schedule``: after
    warm-up, "constant" or "cosine" decay to 0 at the last step; ``grad_clip``: clip the gradient's
    global L2 norm to this (0: no clipping). ``lora_rank`` > 0 trains LoRA adapters of that rank
    (scaled by ``lora_alpha`` / rank, with ``lora_dropout``) on the linear layers named by
    ``lora_targets`` (names or name endings; all when empty) instead of every weight; ``lora_send``:
    the reply carries the dense update or its factors (:mod:`fedmerge.train.lora`)."""

    local_steps: PositiveInt
    lr: LearningRate = 0.1
    batch_size: PositiveInt = 32
    optimizer: Annotated[Str, one_of(OPTIMIZERS)] = "sgd"
    weight_decay: WeightDecay = 0.0
    warmup_steps: NonNegativeInt = 0
    lr_schedule: Annotated[Str, one_of(LR_SCHEDULES)] = "constant"
    grad_clip: NonNegative = 0.0
    lora_rank: NonNegativeInt = 0
    lora_alpha: Positive = 8.0
    lora_dropout: Annotated[Float, check(lambda v: 0 <= v < 1, "must lie in [0, 1)")] = 0.0
    lora_targets: Names = ()
    lora_send: Annotated[Str, one_of(LORA_SENDS)] = "dense"

    @model_validator(mode="after")
    def _warmup_ends(self) -> TrainPlan:
        if 0 < self.local_steps <= self.warmup_steps:
            raise ValueError(f"!warmup-steps={self.warmup_steps} must be smaller than local-steps={self.local_steps}: "
                             "the learning rate would never reach lr")
        return self

    @property
    def scheduled(self) -> bool:
        return self.warmup_steps > 0 or self.lr_schedule != "constant"

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): warm-up, then constant or cosine
        (as ``mlfoundations/task_vectors``' ``cosine_lr``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            done, total = step - self.warmup_steps, max(1, self.local_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * done / total)) * self.lr
        return self.lr


_single_thread_lock = threading.Lock()
_single_thread_users = 0
_threads_before = 1


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: small models train faster, and results do not depend on the core count.

    torch's thread count is one setting for the whole process, and blocks may overlap in several
    threads (a client the in-process engine gave up on still finishing its step while the next one
    trains): the first block to enter sets it, the last to leave restores it."""
    global _single_thread_users, _threads_before
    with _single_thread_lock:
        if _single_thread_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _single_thread_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_threads_before)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("fedmerge_train_deadline", default=None)
_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("fedmerge_train_cancel", default=None)


class OutOfTime(FederationError):
    """Training stopped early: its deadline passed or its run was cancelled."""


@contextlib.contextmanager
def time_limit(deadline: float | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
    """Training inside the block stops with :class:`OutOfTime` at the first optimizer step after
    ``deadline`` (a ``time.time()`` instant) or after ``cancel`` is set: a client whose reply would
    come too late gives up instead of working on for nobody. Nested blocks keep the outer limits."""
    outer = _deadline.get()
    if deadline is not None and outer is not None:
        deadline = min(outer, deadline)
    deadline_token = _deadline.set(deadline if deadline is not None else outer)
    cancel_token = _cancel.set(cancel if cancel is not None else _cancel.get())
    try:
        yield
    finally:
        _cancel.reset(cancel_token)
        _deadline.reset(deadline_token)


def _check_time(step: int, total: int) -> None:
    cancel, deadline = _cancel.get(), _deadline.get()
    if cancel is not None and cancel.is_set():
        raise OutOfTime(f"stopped after {step} of {total} steps: the run was cancelled")
    if deadline is not None and time.time() > deadline:
        raise OutOfTime(f"stopped after {step} of {total} steps: the server's reply deadline passed")


def _optimizer(model: nn.Module, plan: TrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches: consecutive reshuffled passes over ``n`` examples."""
    batch_size = min(batch_size, n)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def train(model: nn.Module, data: Examples, plan: TrainPlan, seed: int) -> None:
    """Fine-tune ``model`` in place for exactly ``plan.local_steps`` optimizer steps.

    ``data`` is a :class:`Split` or a split with ``batch`` (CLIP tasks, whose frozen head is passed to
    the model); batches go to the model's device. Within :func:`time_limit`, stops with
    :class:`OutOfTime` once the limit passes."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, plan)
    loss_fn = nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    model.train()
    if isinstance(data, Split):  # tensors in memory: index them directly
        steps = ((data.x[i], data.y[i]) for i in batches(len(data), plan.batch_size, plan.local_steps, generator))
    else:
        steps = iterate_batches(data, list(batches(len(data), plan.batch_size, plan.local_steps, generator)))
    for step, (x, y) in enumerate(steps):
        _check_time(step, plan.local_steps)
        if plan.scheduled:
            for group in optimizer.param_groups:
                group["lr"] = plan.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(model, x.to(device), data), y.to(device)).backward()
        if plan.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        optimizer.step()
