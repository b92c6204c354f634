"""PyTorch versions of the fla building blocks that several fla hosts share (the ``torch`` backend)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.ops import acc


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's in-kernel q/k normalisation: x / sqrt(sum x^2 + eps)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = acc(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * acc(weight)
    if bias is not None:
        y = y + acc(bias)
    return y


def rms_norm_gated(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, activation: str) -> torch.Tensor:
    """fla's FusedRMSNormGated: rms_norm(x) * weight (+ bias), times swish(g) or sigmoid(g)."""
    y = rms_norm(x, weight, bias, eps)
    gf = acc(g)
    gate = F.silu(gf) if activation in ('swish', 'silu') else torch.sigmoid(gf)
    return (y * gate).to(x.dtype)


def padded_segments(cu_seqlens: torch.Tensor, position: torch.Tensor,
                    *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference recurrences' layout: each of ``tensors`` [S, ...] (sorted slots) as [G, L, ...],
    zero-padded per segment (L: the longest), and each slot's segment [S], with which ``out[segment,
    position]`` takes per-step outputs back to slots. Only the reference path pads (and syncs, for L)."""
    G = cu_seqlens.numel() - 1
    segment = torch.searchsorted(cu_seqlens[1:], torch.arange(position.numel(), device=position.device), right=True)
    L = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if G else 0
    padded = []
    for x in tensors:
        out = x.new_zeros(G, L, *x.shape[1:])
        out[segment, position] = x
        padded.append(out)
    return segment, padded


def gated_norm_out(host, o: torch.Tensor, gate: torch.Tensor | None, backend: str) -> torch.Tensor:
    """The read side's last step of fla's delta-rule layers: o [N, H, V] -> [N, hidden] through ``o_norm``
    (gated by ``gate`` when the host has ``use_gate``; fla's fused kernel on the triton backend, the PyTorch
    version on the torch backend), then ``o_proj``."""
    norm = host.o_norm
    if host.use_gate:
        if backend == 'torch':
            o = rms_norm_gated(o, gate, norm.weight, norm.bias, norm.eps, norm.activation)
        else:
            o = norm(o, gate)
    else:
        o = rms_norm(o, norm.weight, getattr(norm, 'bias', None), norm.eps).to(o.dtype) \
            if backend == 'torch' else norm(o)
    return host.o_proj(o.flatten(1))


def q_conv_shapes(host) -> dict[str, tuple[int, int]]:
    """read_conv_shapes of fla layers whose read side has one short conv, on q (when ``use_short_conv``)."""
    return {'q': (host.key_dim, host.conv_size)} if host.use_short_conv else {}


def q_projection(host, x: torch.Tensor, layout, backend: str, conv_rows=None) -> torch.Tensor:
    """x [N, hidden] -> q [N, key_dim] of fla's layers with a q short conv: q_proj, then, with
    ``use_short_conv``, the conv (its activation included) over each sequence, starting from its cached state
    with ``conv_rows`` (see ``q_conv_shapes``)."""
    q = host.q_proj(x)
    if host.use_short_conv:
        conv = host.q_conv1d
        q = layout.conv(q, conv.weight, conv.bias, conv.activation, backend,
                        None if conv_rows is None else conv_rows['q'])
    return q


def check_value_heads(host) -> None:
    """Grouped value heads (fla's GVA): each q/k head serves ``num_v_heads / num_heads`` value heads. fla's layers
    check divisibility at construction only when there are more value heads than q/k heads; fewer pass, and their
    kernels refuse them at the first forward (fla 0.6: GatedDeltaNet's ValueError, KDA's AssertionError). The wrapper
    refuses both when it is made (ValueError naming num_v_heads)."""
    H, HV = host.num_heads, host.num_v_heads
    if HV < H or HV % H:
        raise ValueError(f"num_v_heads: must be a multiple of num_heads={H} (each q/k head serves a group of value "
                         f"heads), got num_v_heads={HV}")


def fla_models(family: str, variants: dict[str, dict], **options) -> dict[str, Callable[[], nn.Module]]:
    """Factories of small fla models of ``family`` (``fla.models.<family>Config`` / ``<family>ForCausalLM``), one per
    variant (name -> config options on top of ``options``): 2 layers, hidden 64, vocabulary 64, every parameter that
    fla's init leaves constant (zeros, ones) redrawn from a fixed seed, so that a model-level check sees each one."""
    def make(extra: dict) -> nn.Module:
        import fla.models as models
        config = getattr(models, f'{family}Config')(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                                    intermediate_size=128, fuse_cross_entropy=False,
                                                    **{**options, **extra})
        model = getattr(models, f'{family}ForCausalLM')(config)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    noise = torch.randn(p.shape, generator=g).to(p.dtype)
                    p.copy_(noise * p.shape[-1] ** -0.5 if p.dim() == 2 else p + 0.3 * noise)
        return model.eval()
    return {name: (lambda extra=extra: make(extra)) for name, extra in variants.items()}
