"""The load-balancing loss of a model's MixtureOfMemories layers: its weight, its scale, its value for logging.

Each layer adds ``balance_loss_weight * balance_loss_scale * d(term)`` to the backward of its output
(``mom_wrap.losses``). ``set_balance_loss_weight(model, w)`` sets the weight; ``set_balance_loss_scale(model,
scale)`` sets the scale to the factor the training loop multiplies its task loss by (1/accumulation steps, a loss
scaler's scale: a number, or a 0-dim tensor such as a GradScaler's scale, read without a host sync), as Megatron
sets its ``MoEAuxLossAutoScaler``'s; ``mom_wrap.training.BalanceLossScaleCallback`` sets it from a transformers
``Trainer``. ``load_balancing_loss(module)`` reads the terms of the last forward for logging; it is detached, so
adding it to a loss changes nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mom_wrap.wrapper import MixtureOfMemories


def _mom_layers(module: nn.Module) -> list[nn.Module]:
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
