"""Triton kernels: depthwise causal short conv over packed segments, one weight per memory.

Same contract as ``mom_wrap.ops.segment_conv`` (the PyTorch reference these kernels are tested against):
x [S, D] with each segment's rows contiguous and time-ordered, weight [E, D, W] (tap W-1 on the current
row), optional bias [E, D], memory [S] (row -> weight), position [S] (row's index in its segment; taps
before the segment's start read zeros), optional SiLU. fp32 accumulation, output in x's dtype.

The kernels read the weight as [E, W, D], each tap contiguous along D. Backward in three passes:
``_conv_bwd_pre`` turns dy into the gradient before the activation (recomputing the pre-activation rather
than keeping it), ``_conv_bwd_dx`` gathers dx from the W rows each row feeds, and ``_conv_bwd_dw`` reduces
the weight/bias gradients per memory over long runs of rows in registers: rows are sorted memory-major, so
a run spans one memory (rarely two) and adds one partial sum per memory atomically, so few adds meet on
each weight.

Offsets pass 2**31 elements on long inputs: x is mostly a column slice of the fused projection, its row
stride SX the fused width (4620, say), so row * SX does from row 464,824 on (row * D, for y, dy, dpre and
dx, from row 524,288 of 4096). Each program therefore moves its pointers to its first row r0 in 64-bit
arithmetic and indexes rows from there in int32. That costs a few scalar operations, where int64 offsets
over whole tiles took 15-35% more time in the backward kernels (H200, Triton 3.6: more registers, fewer
programs per SM). The launcher keeps the in-program offsets in int32: (rows of a program + W) * max(SX, D)
< 2**31 (``_rows_in_int32``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64
BLOCK_D = 64
ROWS_PER_PROGRAM = 1024  # rows one program of the weight-gradient reduction sums before its atomic add


@triton.jit
def _memory_of(memory, rows, row_ok, HAS_MEMORY: tl.constexpr):
    if HAS_MEMORY:
        mem = tl.load(memory + rows, mask=row_ok, other=0)
    else:
        mem = tl.zeros_like(rows).to(tl.int64)
    return mem


@triton.jit
def _conv_pre(x, wt, b, mem, pos, rows, cols, row_ok, col_ok, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr):
    """Pre-activation of rows [BT] x cols [BD], fp32; rows count from the row x points to (int32 offsets).
    wt [E, W, D]: each tap contiguous along D."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    m = row_ok[:, None] & col_ok[None, :]
    for j in tl.static_range(W):
        ok = row_ok & (pos >= j)
        xj = tl.load(x + (rows - j)[:, None] * SX + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.)
        wj = tl.load(wt + mem[:, None] * W * D + (W - 1 - j) * D + cols[None, :], mask=m, other=0.)
        acc += xj.to(tl.float32) * wj.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + mem[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(x, wt, b, memory, position, y, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_MEMORY: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BT  # the block's first row; pointers move there in 64-bit
    rows = tl.arange(0, BT)  # from r0: int32 offsets within the block
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    n = (S - r0).to(tl.int32)  # rows from r0 to the end (S is int32)
    row_ok, col_ok = rows < n, cols < D
    x += r0 * SX
    y += r0 * D
    position += r0
    if HAS_MEMORY:
        memory += r0
    pos = tl.load(position + rows, mask=row_ok, other=0)
    mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
    acc = _conv_pre(x, wt, b, mem, pos, rows, cols, row_ok, col_ok, D, SX, W, HAS_BIAS, BT, BD)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + rows[:, None] * D + cols[None, :], acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_bwd_pre_kernel(x, wt, b, memory, position, dy, dpre, S, D, SX, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_MEMORY: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BT  # the block's first row; pointers move there in 64-bit
    rows = tl.arange(0, BT)  # from r0: int32 offsets within the block
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    n = (S - r0).to(tl.int32)  # rows from r0 to the end (S is int32)
    row_ok, col_ok = rows < n, cols < D
    x += r0 * SX
    dy += r0 * D
    dpre += r0 * D
    position += r0
    if HAS_MEMORY:
        memory += r0
    m = row_ok[:, None] & col_ok[None, :]
    g = tl.load(dy + rows[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
    if SILU:
        pos = tl.load(position + rows, mask=row_ok, other=0)
        mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
        acc = _conv_pre(x, wt, b, mem, pos, rows, cols, row_ok, col_ok, D, SX, W, HAS_BIAS, BT, BD)
        sig = tl.sigmoid(acc)
        g = g * sig * (1 + acc * (1 - sig))
    tl.store(dpre + rows[:, None] * D + cols[None, :], g, mask=m)


@triton.jit
def _conv_bwd_dx_kernel(wt, memory, position, dpre, dx, S, D, SDX, W: tl.constexpr, HAS_MEMORY: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr):
    """dx[r] = sum_j dpre[r + j] * tap W-1-j, over the rows r + j of r's segment. dx's rows SDX apart (a column
    block of the fused projection's gradient, ``split_convs``)."""
    r0 = tl.program_id(0).to(tl.int64) * BT  # the block's first row; pointers move there in 64-bit
    rows = tl.arange(0, BT)  # from r0: int32 offsets within the block
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    n = (S - r0).to(tl.int32)  # rows from r0 to the end (S is int32)
    row_ok, col_ok = rows < n, cols < D
    dpre += r0 * D
    dx += r0 * SDX
    position += r0
    if HAS_MEMORY:
        memory += r0
    m = row_ok[:, None] & col_ok[None, :]
    mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(W):
        src = rows + j
        src_ok = src < n
        feeds = src_ok & (tl.load(position + src, mask=src_ok, other=0) >= j)
        gj = tl.load(dpre + src[:, None] * D + cols[None, :], mask=feeds[:, None] & col_ok[None, :], other=0.)
        wj = tl.load(wt + mem[:, None] * W * D + (W - 1 - j) * D + cols[None, :], mask=m, other=0.)
        acc += gj * wj.to(tl.float32)
    tl.store(dx + rows[:, None] * SDX + cols[None, :], acc.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_dw_kernel(x, memory, position, dpre, dwt, db, S, D, SX, ROWS, W: tl.constexpr, BW: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_MEMORY: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dw[e, :, W-1-j] = sum over the rows r of memory e of dpre[r] * x[r - j] (same segment); db[e] = sum of
    dpre[r]. Each program reduces ROWS rows in registers and adds one partial sum per memory among them:
    with rows sorted memory-major that is one memory (rarely two), so few atomic adds land on each weight.
    ROWS is a runtime value (a multiple of BT): it depends on S for short inputs, and as a constexpr it compiled
    the kernel again for every new length (26 times in a soak run after warm-up)."""
    r0 = tl.program_id(0).to(tl.int64) * ROWS  # as in the tile kernels: 64-bit to r0, int32 from there
    x += r0 * SX
    dpre += r0 * D
    position += r0
    if HAS_MEMORY:
        memory += r0
    n = (S - r0).to(tl.int32)  # rows from r0 to the end
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    taps = tl.arange(0, BW)
    m_lo = 0
    m_hi = 0
    if HAS_MEMORY:  # the memories among this program's rows
        m_lo = 2147483647
        m_hi = -1
        for t in range(0, ROWS, BT):
            rows = t + tl.arange(0, BT)
            mem = tl.load(memory + rows, mask=rows < n, other=0).to(tl.int32)  # loop-carried: keep one type
            m_lo = tl.minimum(m_lo, tl.min(tl.where(rows < n, mem, 2147483647), axis=0))
            m_hi = tl.maximum(m_hi, tl.max(tl.where(rows < n, mem, -1), axis=0))
    for e in range(m_lo, m_hi + 1):
        acc_w = tl.zeros((BD, BW), dtype=tl.float32)  # [cols, tap]
        acc_b = tl.zeros((BD,), dtype=tl.float32)
        for t in range(0, ROWS, BT):
            rows = t + tl.arange(0, BT)
            row_ok = rows < n
            mem = _memory_of(memory, rows, row_ok, HAS_MEMORY)
            mine = row_ok & (mem == e)
            g = tl.load(dpre + rows[:, None] * D + cols[None, :], mask=mine[:, None] & col_ok[None, :], other=0.)
            pos = tl.load(position + rows, mask=row_ok, other=0)
            for j in tl.static_range(W):
                reads = mine & (pos >= j)
                xj = tl.load(x + (rows - j)[:, None] * SX + cols[None, :], mask=reads[:, None] & col_ok[None, :],
                             other=0.).to(tl.float32)
                part = tl.sum(g * xj, axis=0)  # [BD]
                acc_w += tl.where((taps == W - 1 - j)[None, :], part[:, None], 0.)
            if HAS_BIAS:
                acc_b += tl.sum(g, axis=0)
        tl.atomic_add(dwt + e * D * BW + cols[:, None] * BW + taps[None, :], acc_w,
                      mask=col_ok[:, None] & (taps < W)[None, :])
        if HAS_BIAS:
            tl.atomic_add(db + e * D + cols, acc_b, mask=col_ok)


def _rows_in_int32(x):
    """How many rows from one program's first row x and the [S, D] buffers can span in int32 offsets."""
    return (2**31 - 1) // max(x.stride(0), x.shape[1], 1)


def _launch_args(x, weight_shape, memory):
    S, D = x.shape
    W = weight_shape[-1]
    grid = (triton.cdiv(S, BLOCK_T), triton.cdiv(D, BLOCK_D))
    return grid, dict(S=S, D=D, W=W, HAS_MEMORY=memory is not None, BT=BLOCK_T, BD=BLOCK_D)


def conv_forward(x, weight, bias, memory, position, silu: bool):
    """y [S, D] = the segment conv of x [S, D] (rows may be strided, columns not), and what ``conv_backward``
    takes: (x, wt, bias, memory, position) as the kernels read them."""
    W = weight.shape[-1]
    # rows may be strided (a column slice of the fused projection), columns not; rows so far apart that a
    # block's offsets leave int32 (2**31 / (BLOCK_T + W) elements, never seen in practice) are copied closer
    if x.stride(1) != 1 or _rows_in_int32(x) < BLOCK_T + W:
        x = x.contiguous()
        if _rows_in_int32(x) < BLOCK_T + W:
            raise ValueError(f"x: rows of {x.shape[1]} elements are too wide for the kernels' int32 offsets")
    wt = weight.transpose(1, 2).contiguous()  # [E, W, D]: the kernels read each tap along D, coalesced
    position = position.contiguous()
    bias = bias.contiguous() if bias is not None else None
    memory = memory.contiguous() if memory is not None else None
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.shape[0]:
        grid, meta = _launch_args(x, weight.shape, memory)
        _conv_fwd_kernel[grid](x, wt, bias, memory, position, y, SX=x.stride(0), HAS_BIAS=bias is not None,
                               SILU=silu, **meta)
    return y, (x, wt, bias, memory, position)


def conv_backward(saved, dy, dx, silu: bool, weight_shape, weight_dtype):
    """The gradients of ``conv_forward``: dx written into ``dx`` [S, D] (rows may be strided: a column block of a
    larger gradient, columns not); returns (dweight [E, D, W] in weight_dtype, dbias or None)."""
    x, wt, bias, memory, position = saved
    E, D, W = weight_shape
    BW = triton.next_power_of_2(W)
    dwt = torch.zeros(E, D, BW, device=x.device, dtype=torch.float32)
    db = torch.zeros(bias.shape, device=x.device, dtype=torch.float32) if bias is not None else None
    S = x.shape[0]
    if S:
        if dx.stride(1) != 1 or _rows_in_int32(dx) < BLOCK_T + W:
            raise ValueError("dx: the kernels write rows of contiguous columns, within int32 offsets")
        grid, meta = _launch_args(x, weight_shape, memory)
        dpre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        _conv_bwd_pre_kernel[grid](x, wt, bias, memory, position, dy.contiguous(), dpre, SX=x.stride(0),
                                   HAS_BIAS=bias is not None, SILU=silu, **meta)
        _conv_bwd_dx_kernel[grid](wt, memory, position, dpre, dx, SDX=dx.stride(0), **meta)
        # a multiple of BLOCK_T, and in-program offsets in int32 (the forward made sure one block fits)
        rows = min(ROWS_PER_PROGRAM, grid[0] * BLOCK_T, (_rows_in_int32(x) - W) // BLOCK_T * BLOCK_T)
        _conv_bwd_dw_kernel[(triton.cdiv(S, rows), grid[1])](
            x, memory, position, dpre, dwt, db, SX=x.stride(0), BW=BW, HAS_BIAS=bias is not None, ROWS=rows,
            **meta)
    return dwt[:, :, :W].to(weight_dtype), None if db is None else db.to(bias.dtype)


class SegmentConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, memory, position, silu):
        y, saved = conv_forward(x, weight, bias, memory, position, silu)
        ctx.save_for_backward(*saved)
        ctx.silu, ctx.weight_shape, ctx.weight_dtype = silu, weight.shape, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x = saved[0]
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw, db = conv_backward(saved, dy, dx, ctx.silu, ctx.weight_shape, ctx.weight_dtype)
        return dx, dw, db, None, None, None


def segment_conv_triton(x, weight, bias, memory, position, silu: bool):
    return SegmentConvTriton.apply(x, weight, bias, memory, position, silu)


class SplitConvsTriton(torch.autograd.Function):
    """y [S, sum(widths)] (the write side's fused projection) -> its column blocks, each through its short conv
    where ``convs`` has one ((silu, has_bias) per block, or None), the others as contiguous copies. The backward
    writes every block's gradient straight into one [S, sum(widths)] gradient: the convs' dx in place, the
    others copied in. (``y.split`` then one conv per block made autograd concatenate the blocks' gradients,
    a pass over the whole [S, sum(widths)] gradient, and the blocks stayed strided views that the host's kernels
    copied.) ``params``: each conv's weight [E, D, W] and then, if it has one, its bias [E, D], in block order."""

    @staticmethod
    def forward(ctx, y, widths, convs, memory, position, *params):
        outs, saved, shapes = [], [], []
        it = iter(params)
        for part, conv in zip(y.split(widths, dim=1), convs):
            if conv is None:
                outs.append(part.contiguous())
                continue
            silu, has_bias = conv
            weight = next(it)
            bias = next(it) if has_bias else None
            out, kept = conv_forward(part, weight, bias, memory, position, silu)
            outs.append(out)
            saved += kept
            shapes.append((weight.shape, weight.dtype))
        ctx.save_for_backward(*saved)
        ctx.widths, ctx.convs, ctx.shapes, ctx.y_meta = widths, convs, shapes, (y.shape, y.dtype, y.device)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.y_meta
        dy = torch.empty(shape, dtype=dtype, device=device)
        saved, shapes, param_grads = list(ctx.saved_tensors), iter(ctx.shapes), []
        for block, grad, conv in zip(dy.split(ctx.widths, dim=1), grads, ctx.convs):
            if conv is None:
                block.copy_(grad) if grad is not None else block.zero_()
                continue
            kept, saved = saved[:5], saved[5:]
            weight_shape, weight_dtype = next(shapes)
            if grad is None:
                grad = torch.zeros(block.shape, dtype=dtype, device=device)
            dw, db = conv_backward(kept, grad, block, conv[0], weight_shape, weight_dtype)
            param_grads += [dw] + ([db] if conv[1] else [])
        return (dy, None, None, None, None, *param_grads)


def split_convs_triton(y, widths, convs, memory, position, params):
    return SplitConvsTriton.apply(y, widths, convs, memory, position, *params)
