"""The router's load-balancing loss: how it is computed, applied and read.

Each MoM layer computes its Switch/Mixtral term ``M * sum_e f_e * P_e`` in its forward and attaches the
term's gradient, times the layer's ``balance_loss_weight``, to the backward of its own output
(``AttachAuxLoss``, as large MoE trainers do). Nothing has to be added to the task loss, and the gradient
is right wherever the output's backward runs:

* activation checkpointing, reentrant (HF's default: the first forward runs without grad and the
  recompute inside backward attaches the term) or not (the recompute's copy is discarded with its graph);
* several forwards before one backward (each output carries its own term);
* any number of layers (each adds ``weight * its term``: the weights add up over layers, as in Megatron).

The weight multiplies the gradient as it is: with a loss scaler or a loss divided over accumulation steps,
scale the weight the same way (``set_balance_loss_weight``). ``load_balancing_loss(module)`` reads the
terms of the last forward for logging; it is detached, so adding it to a loss changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mom_wrap.dispatch import histogram


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None,
                 memory_counts: torch.Tensor | None = None) -> torch.Tensor:
    """M * sum_e f_e * P_e over the non-padding tokens.

    probs [N, M] fp32 router probabilities, indices [N, k] the routed memories (no shared memory), valid [N]
    bool or None. f_e: share of the N*k slots given to memory e; P_e: mean probability of memory e. Equals
    1 under uniform routing; differentiable through P_e; 0 when every token is padding. memory_counts: the
    slots of the non-padding tokens per memory [>= M] where a routing plan has counted them already
    (``Dispatch.memory_counts``; its first M entries are the routed memories'), else counted here from indices.
    """
    N, M = probs.shape
    k = indices.shape[1]
    if valid is None:
        n = float(N)  # a Python number: no host-to-device copy (graph capture forbids one)
        mean_prob = probs.mean(0)
    else:
        vf = valid.float()
        n = vf.sum().clamp(min=1)
        mean_prob = (probs * vf[:, None]).sum(0) / n
    if memory_counts is None:
        if valid is not None:
            indices = torch.where(valid[:, None], indices, M)  # padding slots count in a bin of their own
        memory_counts = histogram(indices.reshape(-1), M + 1)
    share = memory_counts[:M].float() / (n * k)
    return M * (share * mean_prob).sum()


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends the gradient ``weight`` into ``aux`` (a scalar):
    the backward of ``output`` then includes that of ``weight * aux``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, weight: float):
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


def _mom_layers(module: nn.Module) -> list[nn.Module]:
    from mom_wrap.wrapper import MixtureOfMemories

    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, MixtureOfMemories)]
    if not layers:
        raise ValueError("module: contains no MixtureOfMemories layer")
    return layers


def load_balancing_loss(module: nn.Module) -> torch.Tensor:
    """The load-balancing term of the last forward, averaged over every MixtureOfMemories layer in
    ``module``: for logging (detached; each layer applies its gradient itself, see the module docstring)."""
    terms = [m.balance_loss for m in _mom_layers(module)]
    terms = [t for t in terms if t is not None]
    if not terms:
        raise ValueError("module: no MixtureOfMemories layer has run a forward yet")
    return torch.stack(terms).mean()


def set_balance_loss_weight(module: nn.Module, weight: float) -> None:
    """Set ``balance_loss_weight`` of every MixtureOfMemories layer in ``module`` (0 turns the loss off)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight: expected a float, got {type(weight).__name__}")
    for m in _mom_layers(module):
        m.balance_loss_weight = float(weight)
