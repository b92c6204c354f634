"""The router's load-balancing loss: how it is computed, applied and read.

Each MoM layer computes its Switch/Mixtral term ``M * sum_e f_e * P_e`` in its forward and attaches the
term's gradient, times the layer's ``balance_loss_weight``, to the backward of its own output
(``AttachAuxLoss``, as large MoE trainers do). Nothing has to be added to the task loss, and the gradient
is right wherever the output's backward runs:

* activation checkpointing, reentrant (HF's default: the first forward runs without grad and the
  recompute inside backward attaches the term) or not (the recompute's copy is discarded with its graph);
* several forwards before one backward (each output carries its own term);
* any number of layers (each adds ``weight * its term``: the weights add up over layers, as in Megatron).

The task loss's gradient comes scaled by whatever the training loop multiplies the loss by (1/accumulation
steps, a loss scaler's scale); the injected one is ``weight * scale * d(term)``, where ``scale`` is each
layer's ``balance_loss_scale`` as the backward runs (1 by default): right for a forward recomputed inside the
backward and for several forwards before one backward too. This module holds the layer's primitives; setting
the weight and the scale of a model's layers and reading their terms: ``mom_wrap.balance``.
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
    """Identity on ``output`` whose backward also sends the gradient ``weight * scale`` into ``aux`` (a scalar):
    the backward of ``output`` then includes that of ``weight * scale * aux``. ``weight`` is taken when the
    forward runs; ``scale`` is ``layer.balance_loss_scale`` when the backward runs (``set_balance_loss_scale``),
    so a loop may set it at any time before its backward."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, weight: float, layer: nn.Module):
        ctx.weight = weight
        ctx.layer = layer
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        scale = ctx.layer.balance_loss_scale
        if isinstance(scale, torch.Tensor):  # a kernel, no host sync (a CPU scale's copy does not wait either)
            scale = scale.to(device, dtype, non_blocking=True)
            grad_aux = torch.full(shape, ctx.weight, dtype=dtype, device=device) * scale
        else:
            grad_aux = torch.full(shape, ctx.weight * scale, dtype=dtype, device=device)
        return grad, grad_aux, None, None
