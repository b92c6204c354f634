"""Auxiliary losses over the MoM layers of a model."""
from __future__ import annotations

import torch
import torch.nn as nn


def load_balancing_loss(module: nn.Module) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss, averaged over every MixtureOfMemories layer in ``module``.

    Per layer: M * sum_e f_e * P_e, with f_e the share of top-k slots given to memory e and P_e the mean
    router probability of memory e, both over the last forward's non-padding tokens (the shared memory is
    not routed and does not count). Equals 1 under perfectly uniform routing. Differentiable through P_e.
    """
    from mom_wrap.wrapper import MixtureOfMemories

    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, MixtureOfMemories)]
    if not layers:
        raise ValueError("module: contains no MixtureOfMemories layer")
    terms = [m.balance_loss for m in layers if m.balance_loss is not None]
    if not terms:
        raise ValueError("module: no MixtureOfMemories layer has run a forward yet")
    return torch.stack(terms).mean()
