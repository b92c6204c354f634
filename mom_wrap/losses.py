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
layer's ``balance_loss_scale`` as the backward runs (1 by default). ``set_balance_loss_scale(model, scale)``
sets it to the loop's factor (a number, or a 0-dim tensor such as a GradScaler's scale: read without a host
sync), as Megatron sets its ``MoEAuxLossAutoScaler``'s; ``mom_wrap.training.BalanceLossScaleCallback`` sets it
from a transformers ``Trainer``. Read at backward time, it is also right for a forward recomputed inside the
backward and for several forwards before one backward. ``load_balancing_loss(module)`` reads the terms of the
last forward for logging; it is detached, so adding it to a loss changes nothing.
"""
from __future__ import annotations

import math

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


def _checked_scale(scale) -> float | torch.Tensor:
    """``scale`` as the layers keep it: a float, or a detached one-element floating tensor."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise TypeError(f"scale: expected a number or a one-element floating tensor, got a {scale.dtype} "
                            f"tensor of shape {tuple(scale.shape)}")
        scale = scale.detach().reshape(())
        if scale.device.type != 'cpu':  # its value stays unchecked: reading it would wait for the device
            return scale
        value = float(scale)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a number or a one-element floating tensor, got {type(scale).__name__}")
    else:
        value = scale = float(scale)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"scale: must be finite and >= 0, got {value}")
    return scale


def set_balance_loss_scale(module: nn.Module, scale: float | torch.Tensor) -> None:
    """Set ``balance_loss_scale`` of every MixtureOfMemories layer in ``module``: the factor the training loop
    multiplies its task loss by before the backward, so that the balancing gradient is scaled alike.

    Each layer then adds ``balance_loss_weight * scale * d(term)`` to its backward, ``scale`` read when that
    backward runs: set it before the backward (a forward recomputed inside it, under activation checkpointing,
    and every forward before one backward get the same). For a loop that divides its loss over ``n``
    accumulation steps and scales it with a ``torch.amp.GradScaler``::

        set_balance_loss_scale(model, scaler.scale(torch.ones((), device=device)) / n)  # each step: no sync
        scaler.scale(loss / n).backward()

    ``scale``: a number >= 0 (1, the default, leaves the gradient of ``weight * term``; 0 turns the loss off),
    or a one-element floating tensor, used where it is (a GradScaler's scale on the GPU: no host sync; its value
    is checked only on the CPU). ``mom_wrap.training.BalanceLossScaleCallback`` sets it for HF's ``Trainer``.
    Under ``torch.compile`` a traced layer (the ``'torch'`` backend; the others run eagerly) takes the scale
    when its forward runs instead: there, set it before the forward (as the callback does).
    """
    scale = _checked_scale(scale)
    for m in _mom_layers(module):
        m.balance_loss_scale = scale
