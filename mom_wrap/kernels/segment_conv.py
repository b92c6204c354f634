"""Triton kernels: depthwise causal short conv over packed segments, one weight per memory.

Same contract as ``mom_wrap.ops.segment_conv`` (the PyTorch reference these kernels are tested against):
x [S, D] with each segment's rows contiguous and time-ordered, weight [E, D, W] (tap W-1 on the current
row), optional bias [E, D], memory [S] (row -> weight), position [S] (row's index in its segment; taps
before the segment's start read zeros), optional SiLU. fp32 accumulation, output in x's dtype.

Backward in two passes: ``_conv_bwd_pre`` turns dy into the gradient before the activation (recomputing
the pre-activation rather than keeping it), ``_conv_bwd`` gathers dx from the W rows each row feeds and
reduces weight/bias gradients per memory: rows are sorted memory-major, so a block of rows spans a few
memories (usually one) and adds one partial sum per memory atomically.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64
BLOCK_D = 64


@triton.jit
def _memory_of(memory, rows, row_ok, HAS_MEMORY: tl.constexpr):
    if HAS_MEMORY:
        mem = tl.load(memory + rows, mask=row_ok, other=0)
    else:
        mem = tl.zeros_like(rows).to(tl.int64)
    return mem


@triton.jit
def _conv_pre(x, w, b, mem, pos, rows, cols, row_ok, col_ok, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr):
    """Pre-activation of rows [BT] x cols [BD], fp32."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(W):
        ok = row_ok & (pos >= j)
        xj = tl.load(x + (rows - j)[:, None] * SX + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.)
        wj = tl.load(w + mem[:, None] * D * W + cols[None, :] * W + (W - 1 - j), mask=row_ok[:, None] & col_ok[None, :],
                     other=0.)
        acc += xj.to(tl.float32) * wj.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + mem[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.).to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(x, w, b, memory, position, y, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_MEMORY: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok, col_ok = rows < S, cols < D
    pos = tl.load(position + rows, mask=row_ok, other=0)
    mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
    acc = _conv_pre(x, w, b, mem, pos, rows, cols, row_ok, col_ok, S, D, SX, W, HAS_BIAS, BT, BD)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + rows[:, None] * D + cols[None, :], acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_bwd_pre_kernel(x, w, b, memory, position, dy, dpre, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_MEMORY: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok, col_ok = rows < S, cols < D
    m = row_ok[:, None] & col_ok[None, :]
    g = tl.load(dy + rows[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
    if SILU:
        pos = tl.load(position + rows, mask=row_ok, other=0)
        mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
        acc = _conv_pre(x, w, b, mem, pos, rows, cols, row_ok, col_ok, S, D, SX, W, HAS_BIAS, BT, BD)
        sig = tl.sigmoid(acc)
        g = g * sig * (1 + acc * (1 - sig))
    tl.store(dpre + rows[:, None] * D + cols[None, :], g, mask=m)


@triton.jit
def _conv_bwd_kernel(x, w, memory, position, dpre, dx, dw, db, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_MEMORY: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok, col_ok = rows < S, cols < D
    m = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(position + rows, mask=row_ok, other=0)
    mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
    g = tl.load(dpre + rows[:, None] * D + cols[None, :], mask=m, other=0.)
    # the memories this block of rows spans (rows are sorted memory-major)
    m_lo = tl.min(tl.where(row_ok, mem, 2147483647), axis=0)
    m_hi = tl.max(tl.where(row_ok, mem, -1), axis=0)
    acc_dx = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(W):
        # dx: row r feeds row r + j through tap W-1-j, when r + j is in the same segment
        src = rows + j
        src_ok = src < S
        src_pos = tl.load(position + src, mask=src_ok, other=0)
        feeds = src_ok & (src_pos >= j)
        gj = tl.load(dpre + src[:, None] * D + cols[None, :], mask=feeds[:, None] & col_ok[None, :], other=0.)
        wj = tl.load(w + mem[:, None] * D * W + cols[None, :] * W + (W - 1 - j), mask=m, other=0.).to(tl.float32)
        acc_dx += gj * wj
        # dw[:, :, W-1-j]: sum over the rows of each memory of dpre[r] * x[r - j]
        reads = row_ok & (pos >= j)
        xj = tl.load(x + (rows - j)[:, None] * SX + cols[None, :], mask=reads[:, None] & col_ok[None, :],
                     other=0.).to(tl.float32)
        prod = g * xj
        for e in range(m_lo, m_hi + 1):
            part = tl.sum(tl.where((mem == e)[:, None], prod, 0.), axis=0)
            tl.atomic_add(dw + e * D * W + cols * W + (W - 1 - j), part, mask=col_ok)
    if HAS_BIAS:
        for e in range(m_lo, m_hi + 1):
            part = tl.sum(tl.where((mem == e)[:, None], g, 0.), axis=0)
            tl.atomic_add(db + e * D + cols, part, mask=col_ok)
    tl.store(dx + rows[:, None] * D + cols[None, :], acc_dx.to(dx.dtype.element_ty), mask=m)


def _launch_args(x, weight, bias, memory, position):
    S, D = x.shape
    W = weight.shape[-1]
    grid = (triton.cdiv(S, BLOCK_T), triton.cdiv(D, BLOCK_D))
    return grid, dict(S=S, D=D, SX=x.stride(0), W=W, HAS_BIAS=bias is not None, HAS_MEMORY=memory is not None,
                      BT=BLOCK_T, BD=BLOCK_D)


class SegmentConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, memory, position, silu):
        if x.stride(1) != 1:  # rows may be strided (a column slice of the fused projection), columns not
            x = x.contiguous()
        weight, position = weight.contiguous(), position.contiguous()
        bias = bias.contiguous() if bias is not None else None
        memory = memory.contiguous() if memory is not None else None
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        if x.shape[0]:
            grid, meta = _launch_args(x, weight, bias, memory, position)
            _conv_fwd_kernel[grid](x, weight, bias, memory, position, y, SILU=silu, **meta)
        ctx.save_for_backward(x, weight, bias, memory, position)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, memory, position = ctx.saved_tensors
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
        db = torch.zeros(bias.shape, device=x.device, dtype=torch.float32) if bias is not None else None
        if x.shape[0]:
            grid, meta = _launch_args(x, weight, bias, memory, position)
            dpre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
            _conv_bwd_pre_kernel[grid](x, weight, bias, memory, position, dy.contiguous(), dpre, SILU=ctx.silu, **meta)
            _conv_bwd_kernel[grid](x, weight, memory, position, dpre, dx, dw, db, **meta)
        return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype), None, None, None


def segment_conv_triton(x, weight, bias, memory, position, silu: bool):
    return SegmentConvTriton.apply(x, weight, bias, memory, position, silu)
