"""Low-rank adaptation (LoRA) through PEFT: a client trains rank-r factors A (r × in) and B (out × r)
beside chosen linear layers of a frozen θ0, and its task vector is the dense update
(α/r)·B·A of each adapted weight, zero elsewhere. Every merging rule takes it like any other task
vector, so Task Arithmetic over LoRA clients is still one-shot FedAvg of their updates.

A client may send the factors instead (``lora-send = "factors"``): (α/r)·B and A per adapted
weight, far fewer bytes than the dense update; the server makes them dense with
:func:`dense_task_vector` before merging, to the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError, MergeError

FACTOR_A, FACTOR_B = "::lora_A", "::lora_B"  # suffixes of a factor's name in a reply, after its weight's


def peft_module() -> Any:
    """``peft``, or one clear line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA clients (lora-rank > 0) need PEFT: pip install 'fedmerge[lm]'") from None
    return peft


def with_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str],
              seed: int = 0) -> nn.Module:
    """``model`` with LoRA adapters of ``rank`` on its linear layers (those named, or whose names end
    with ``.NAME``, for a NAME in ``targets``; every linear layer when empty), everything else frozen.
    The adapters' random A is drawn from ``seed``: the same client trains the same update."""
    peft = peft_module()
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    wanted = list(targets)
    chosen = [n for n in linear if not wanted or any(n == t or n.endswith("." + t) for t in wanted)]
    if not chosen:
        raise ConfigError(f"lora-targets={targets!r} names none of the model's linear layers "
                          f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear})) or 'it has none'})")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Each of ``model``'s tensors (by id) with its names in the state dict: two for a tied weight."""
    names: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(key)
    return names


def lora_factors(lora_model: nn.Module, names: Mapping[int, Sequence[str]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per adapted weight (named as in θ0's state dict: ``names`` maps each parameter's id to its
    names there, two for a tied weight, which gets the update under both), the factors ((α/r)·B, A)
    of its update."""
    factors = {}
    for module in lora_model.modules():
        layer: Any = module  # a PEFT LoRA layer: lora_A, lora_B and scaling per adapter, its base_layer
        if not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer"):
            continue
        for adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight.detach()
            b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]
            for name in names[id(layer.base_layer.weight)]:
                factors[name] = (b, a)
    return factors


def dense_update(factors: Mapping[str, tuple[Tensor, Tensor]], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The dense task vector: (α/r)·B·A for each adapted weight, zero for every other floating tensor."""
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        if key in factors:
            b, a = factors[key]
            out[key] = (b.float() @ a.float()).to(value.dtype)
        else:
            out[key] = torch.zeros_like(value)
    return out


def factor_arrays(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """The factors as a reply carries them: ``NAME::lora_B`` ((α/r)·B) and ``NAME::lora_A``."""
    out = {}
    for key, (b, a) in factors.items():
        out[key + FACTOR_B], out[key + FACTOR_A] = b.contiguous(), a.contiguous()
    return out


def has_factors(arrays: Mapping[str, Any]) -> bool:
    return any(k.endswith((FACTOR_A, FACTOR_B)) for k in arrays)


def dense_task_vector(arrays: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A reply's factors made dense (see :func:`dense_update`); a factor of a weight θ0 lacks, one
    without its partner, or factors whose product has not the weight's shape is a ``MergeError``."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for key in arrays:
        if key.endswith(FACTOR_B):
            name = key[: -len(FACTOR_B)]
            if name + FACTOR_A not in arrays:
                raise MergeError(f"LoRA factor {key!r} comes without {name + FACTOR_A!r}")
            factors[name] = (arrays[key], arrays[name + FACTOR_A])
        elif key.endswith(FACTOR_A):
            if key[: -len(FACTOR_A)] + FACTOR_B not in arrays:
                raise MergeError(f"LoRA factor {key!r} comes without its lora_B")
        else:
            raise MergeError(f"a reply of LoRA factors also holds {key!r}")
    for name, (b, a) in factors.items():
        if name not in base:
            raise MergeError(f"LoRA factors for {name!r}, a weight the base model does not have")
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(
                base[name].shape):
            raise MergeError(f"LoRA factors for {name!r} of shapes {tuple(b.shape)} and {tuple(a.shape)} do not "
                             f"make its {tuple(base[name].shape)}")
    return dense_update(factors, base)
