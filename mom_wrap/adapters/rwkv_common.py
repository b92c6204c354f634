"""Pieces that fla's RWKV hosts (RWKV6Attention, RWKV7Attention) share: the token shift, their LoRAs as
write projections, and the group norm in PyTorch.

The token shift is a depthwise conv of width 2 whose constant weight picks the previous token (tap 0) and
drops the current one (tap 1), run through ``TokenLayout.conv``: it then restarts at every sequence of packed
input, skips left padding, and carries each sequence's last token in the cache (``read_conv_shapes``), as
fla's ``token_shift`` (cu_seqlens) and the hosts' ``conv_state`` do.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import WriteProjection
from mom_wrap.ops import acc

SHIFT = 'shift'  # name of the read-side token-shift conv (its cache entry)
SHIFT_BUFFER = 'mom_token_shift_weight'  # the constant conv weight, a non-persistent buffer of the host
LORA_ACTIVATIONS = {nn.Identity: None, nn.Tanh: 'tanh', nn.Sigmoid: 'sigmoid', nn.ReLU: 'relu', nn.SiLU: 'silu'}


def install_token_shift(host: nn.Module) -> None:
    """Give the host the token shift's conv weight [hidden, 1, 2]: tap 0 (the previous token) 1, tap 1 (the
    current one) 0. A buffer, so that it follows the layer's .to(); not persistent, so that state dicts stay
    the host's."""
    if SHIFT_BUFFER not in host._buffers:
        ref = next(host.parameters())
        weight = torch.zeros(host.hidden_size, 1, 2, device=ref.device, dtype=ref.dtype)
        weight[:, 0, 0] = 1
        host.register_buffer(SHIFT_BUFFER, weight, persistent=False)


def token_shift_shapes(host: nn.Module) -> dict[str, tuple[int, int]]:
    """read_conv_shapes of the token shift: width 2 holds the last two tokens; only the newest (the next
    token's previous one) is read."""
    return {SHIFT: (host.hidden_size, 2)}


def previous_token(host: nn.Module, x: torch.Tensor, layout, backend: str, conv_rows=None) -> torch.Tensor:
    """x [N, hidden] -> x_{t-1} [N, hidden]: zeros at each sequence start, or the cached last token."""
    return layout.conv(x, getattr(host, SHIFT_BUFFER), None, None, backend,
                       None if conv_rows is None else conv_rows[SHIFT])


def lora_projection(name: str, module: nn.Module, input_name: str) -> WriteProjection:
    """An nn.Linear, or fla's ``LoRA`` (Linear without bias -> activation -> Linear with its bias, in
    ``module.lora``) in two stages, as the write projection ``name`` reading the read-side tensor
    ``input_name``."""
    if isinstance(module, nn.Linear):
        return WriteProjection(name, module, input=input_name)
    first, act, second = module.lora
    if type(act) not in LORA_ACTIVATIONS:
        raise ValueError(f"{name}: unsupported LoRA activation {type(act).__name__}")
    return WriteProjection(name, first, input=input_name, second=second, activation=LORA_ACTIVATIONS[type(act)])


def group_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The host's group norm (fla's GroupNorm or torch's nn.GroupNorm) in PyTorch over x [N, D]: each of its
    groups of contiguous channels normalised (mean removed unless fla's ``is_rms_norm``), then the
    per-channel affine. Returns fp32 (or fp64)."""
    num_groups = norm.num_groups
    weight, bias = norm.weight, norm.bias
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(acc(x), num_groups, None if weight is None else acc(weight),
                            None if bias is None else acc(bias), norm.eps)
    xf = acc(x).unflatten(-1, (num_groups, -1))
    if not norm.is_rms_norm:
        xf = xf - xf.mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).flatten(-2)
    if weight is not None:
        y = y * acc(weight)
    if bias is not None:
        y = y + acc(bias)
    return y


def check_group_norm(norm: nn.Module) -> None:
    if getattr(norm, 'num_groups', None) is None:
        raise ValueError(f"g_norm: expected fla's GroupNorm or nn.GroupNorm, got {type(norm).__name__}")
