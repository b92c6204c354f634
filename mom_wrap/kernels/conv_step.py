"""Triton kernel: one decode step of the short conv, reading and updating the cached conv states in place.

Same math as ``mom_wrap.ops.conv_step`` (the PyTorch reference it is tested against): for each row g,
window = (state[r][:, 1:], x[g]) with r = index[g] (or g), y[g] = act(sum_j window[:, j] * weight[m][:, j]
+ bias[m]) with m = memory[g] (or 0), and state[r] <- window unless valid[g] is False. One launch replaces
the gather of the states, the window, the product, the activation and the scatter back.
Inference only (no autograd): the cached decode path calls it under ``torch.no_grad``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128


@triton.jit
def _conv_step_kernel(x, pool, index, w, b, memory, valid, y, D, SX, SR, SD, SW, W: tl.constexpr, BW: tl.constexpr,
                      HAS_INDEX: tl.constexpr, HAS_MEMORY: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_VALID: tl.constexpr, SILU: tl.constexpr, BD: tl.constexpr):
    # int64 row offsets (r * SR passes 2**31 in a pool over 2**31 elements); offsets within a row (cols * SD +
    # taps * SW) stay int32, as the launcher checks: int64 ones there took 6% more time (H200, G = 1024)
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    taps = tl.arange(0, BW)
    col_ok = cols < D
    r = g
    if HAS_INDEX:
        r = tl.load(index + g).to(tl.int64)
    m = g * 0
    if HAS_MEMORY:
        m = tl.load(memory + g).to(tl.int64)
    row = pool + r * SR + cols[:, None] * SD
    # the new window: the state shifted left by one tap, this row's input in the last tap
    shifted = tl.load(row + (taps + 1)[None, :] * SW, mask=col_ok[:, None] & (taps + 1 < W)[None, :], other=0.)
    xg = tl.load(x + g * SX + cols, mask=col_ok, other=0.).to(shifted.dtype)
    window = tl.where((taps == W - 1)[None, :], xg[:, None], shifted)
    wt = tl.load(w + m * D * W + cols[:, None] * W + taps[None, :], mask=col_ok[:, None] & (taps < W)[None, :],
                 other=0.)
    acc = tl.sum(window.to(tl.float32) * wt.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b + m * D + cols, mask=col_ok, other=0.).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + g * D + cols, acc.to(y.dtype.element_ty), mask=col_ok)
    store = col_ok[:, None] & (taps < W)[None, :]
    if HAS_VALID:  # a padding token's row keeps its state
        keep = tl.load(valid + g + cols * 0) != 0  # [BD]: one flag, loaded per column
        store = store & keep[:, None]
    # every load of this row's state happened above, so writing it in place is safe (rows are distinct)
    tl.store(row + taps[None, :] * SW, window, mask=store)


def conv_step_triton(x: torch.Tensor, pool: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor | None, memory: torch.Tensor | None, valid: torch.Tensor | None,
                     silu: bool) -> torch.Tensor:
    """x [G, D] (rows may be strided), pool [R, D, W] updated in place, index [G] distinct rows of the pool
    or None (row g), weight [E, D, W], bias [E, D] or None, memory [G] or None (E == 1), valid [G] bool or
    None -> y [G, D] in x's dtype."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("conv_step_triton is inference-only; use mom_wrap.ops.conv_step under autograd")
    G, D = x.shape
    W = weight.shape[-1]
    if (D - 1) * pool.stride(1) + (W - 1) * pool.stride(2) >= 2**31:  # a pool viewed with its dims permuted
        raise ValueError(f"pool: a row's elements lie too far apart for int32 offsets (strides {pool.stride()})")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    bias, index, memory = (t.contiguous() if t is not None else None for t in (bias, index, memory))
    if valid is not None:
        valid = valid.view(torch.uint8)  # bytes: bool pointers are not portable across Triton backends
    y = torch.empty(G, D, device=x.device, dtype=x.dtype)
    if G:
        _conv_step_kernel[(G, triton.cdiv(D, BLOCK_D))](
            x, pool, index, weight, bias, memory, valid, y, D, x.stride(0), pool.stride(0), pool.stride(1),
            pool.stride(2), W=W, BW=triton.next_power_of_2(W), HAS_INDEX=index is not None,
            HAS_MEMORY=memory is not None, HAS_BIAS=bias is not None, HAS_VALID=valid is not None, SILU=silu,
            BD=BLOCK_D)
    return y
