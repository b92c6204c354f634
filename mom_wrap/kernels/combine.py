"""Triton kernels: combine each token's slot rows back into the token, and the combine's backward.

S slot rows y [S, D] (sorted, e.g. memory-major), N tokens of s slots each: idx [N, s] (int64) names the row
of y that holds token n's slot j, and is valid only where present[n, j] != 0. A slot that is not present
(a padding token's, or one dropped by capacity) may carry any in-range idx, whose row can belong to another
sequence and hold NaN/Inf there, so the kernels never read that row: every gather and scatter is masked by
present, not just multiplied by it.

``weighted_rows_sum``: out[n] = sum_j weight[n, j] * y[idx[n, j]] over the present j; out [N, D] in y's dtype.
Grid over (token blocks, feature blocks); each program loops over the s slots at run time (s is not a
constexpr, nor N or S: new lengths reuse the compiled kernel).

``combine_backward``: dy[idx[n, j]] = weight[n, j] * grad[n] (in y's dtype) and dweight[n, j] = <grad[n],
y[idx[n, j]]> for the present slots, dweight 0 elsewhere. idx restricted to the present slots is injective,
so the scatter has no write conflicts; rows of dy that no present slot names are zero (dy starts zeroed
unless every one of S = N * s rows is written). One program per token block loops over all of D, so each
dweight is reduced in registers in a fixed order (deterministic, no atomics), and loads each grad tile once
for all s slots; the partial dot products land in a [BN, BS] tile (BS = s rounded up to a power of 2).

Accumulation is fp32, fp64 when y is fp64: the launchers hand the kernels weight in the accumulation dtype
and the kernels take their accumulator's type from it.

Offsets pass 2**31 elements on long inputs (row * D from row 524,288 of 4096). As in ``segment_conv``, each
program moves its pointers to its first token n0 in 64-bit arithmetic and indexes its BN tokens from there
in int32 (the launchers check BN rows fit); the gathered / scattered rows of y and dy are addressed by the
int64 idx, so row * stride is 64-bit there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # tokens per program
BLOCK_D = 128  # features per program (forward) / per step of the D loop (backward: BLOCK_D_BWD)
BLOCK_D_BWD = 64

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@triton.jit
def _slot(idx, weight, present, tokens, tok_ok, j, SLOTS, HAS_PRESENT: tl.constexpr):
    """Slot j of the block's tokens: whether it is present [BN], its row of y (int64) and its weight; nothing
    is loaded for a slot that is not present."""
    ok = tok_ok
    if HAS_PRESENT:
        ok = ok & (tl.load(present + tokens * SLOTS + j, mask=tok_ok, other=0) != 0)
    row = tl.load(idx + tokens * SLOTS + j, mask=ok, other=0).to(tl.int64)
    w = tl.load(weight + tokens * SLOTS + j, mask=ok, other=0.)
    return ok, row, w


@triton.jit
def _combine_fwd_kernel(y, idx, weight, present, out, N, D, SY, SLOTS, HAS_PRESENT: tl.constexpr,
                              BN: tl.constexpr, BD: tl.constexpr):
    n0 = tl.program_id(0).to(tl.int64) * BN  # the block's first token; pointers move there in 64-bit
    tokens = tl.arange(0, BN)  # from n0: int32 offsets within the block
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    nt = (N - n0).to(tl.int32)  # tokens from n0 to the end
    tok_ok, col_ok = tokens < nt, cols < D
    idx += n0 * SLOTS
    weight += n0 * SLOTS
    out += n0 * D
    if HAS_PRESENT:
        present += n0 * SLOTS
    acc = tl.zeros((BN, BD), dtype=weight.dtype.element_ty)  # fp32, fp64 for fp64 data
    for j in range(SLOTS):
        ok, row, w = _slot(idx, weight, present, tokens, tok_ok, j, SLOTS, HAS_PRESENT)
        # a slot that is not present reads nothing: its row may hold another sequence's NaN/Inf
        yj = tl.load(y + (row * SY)[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.)
        acc += w[:, None] * yj.to(acc.dtype)
    tl.store(out + tokens[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty),
             mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_bwd_kernel(grad, y, idx, weight, present, dy, dweight, N, D, SG, SY, SLOTS,
                        HAS_PRESENT: tl.constexpr, NEED_DWEIGHT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                        BS: tl.constexpr):
    """dy[idx[n, j]] = weight[n, j] * grad[n]; dweight[n, j] = sum_d grad[n, d] * y[idx[n, j], d] (present
    slots only). One program per BN tokens, looping over all of D (BD at a time) and, for each grad tile,
    over the s slots."""
    n0 = tl.program_id(0).to(tl.int64) * BN  # the block's first token; pointers move there in 64-bit
    tokens = tl.arange(0, BN)  # from n0: int32 offsets within the block
    nt = (N - n0).to(tl.int32)
    tok_ok = tokens < nt
    grad += n0 * SG
    idx += n0 * SLOTS
    weight += n0 * SLOTS
    if NEED_DWEIGHT:
        dweight += n0 * SLOTS
    if HAS_PRESENT:
        present += n0 * SLOTS
    slots = tl.arange(0, BS)
    acc_w = tl.zeros((BN, BS), dtype=weight.dtype.element_ty)  # [token, slot]: fp32, fp64 for fp64 data
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        col_ok = cols < D
        g = tl.load(grad + tokens[:, None] * SG + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :],
                    other=0.).to(acc_w.dtype)
        for j in range(SLOTS):
            ok, row, w = _slot(idx, weight, present, tokens, tok_ok, j, SLOTS, HAS_PRESENT)
            m = ok[:, None] & col_ok[None, :]
            tl.store(dy + (row * D)[:, None] + cols[None, :], (w[:, None] * g).to(dy.dtype.element_ty), mask=m)
            if NEED_DWEIGHT:
                yj = tl.load(y + (row * SY)[:, None] + cols[None, :], mask=m, other=0.).to(acc_w.dtype)
                part = tl.where(ok, tl.sum(g * yj, axis=1), 0.)  # 0, not 0 * grad, where not present
                acc_w += tl.where((slots == j)[None, :], part[:, None], 0.)
    if NEED_DWEIGHT:
        tl.store(dweight + tokens[:, None] * SLOTS + slots[None, :], acc_w.to(dweight.dtype.element_ty),
                 mask=tok_ok[:, None] & (slots < SLOTS)[None, :])


def _check(y, idx, weight, present):
    """Validate the shared arguments; returns (y with unit column stride, idx, weight in the accumulation dtype,
    present as a contiguous tensor or None)."""
    if y.dim() != 2:
        raise ValueError(f"y: expected [S, D], got shape {tuple(y.shape)}")
    if y.dtype not in _FLOATS:
        raise ValueError(f"y: expected bf16, fp16, fp32 or fp64, got {y.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"idx: expected [N, s], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx: expected int64 (or int32), got {idx.dtype}")
    if weight.shape != idx.shape:
        raise ValueError(f"weight: expected shape {tuple(idx.shape)} (idx's), got {tuple(weight.shape)}")
    if weight.dtype != torch.float32 and not (weight.dtype == torch.float64 and y.dtype == torch.float64):
        raise ValueError(f"weight: expected fp32 (or fp64 with fp64 y), got {weight.dtype} with y {y.dtype}")
    if present is not None:
        if present.shape != idx.shape:
            raise ValueError(f"present: expected shape {tuple(idx.shape)} (idx's), got {tuple(present.shape)}")
        if not (present.dtype.is_floating_point or present.dtype == torch.bool):
            raise ValueError(f"present: expected a float (1.0 / 0.0) or bool tensor, got {present.dtype}")
    for name, t in (('idx', idx), ('weight', weight), ('present', present)):
        if t is not None and t.device != y.device:
            raise ValueError(f"{name}: on {t.device}, y on {y.device}")
    if y.stride(1) != 1 and y.shape[1] > 1:
        y = y.contiguous()
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    weight = weight.to(acc).contiguous()
    idx = idx.contiguous()
    if present is not None:
        present = present.contiguous()
        if present.dtype == torch.bool:
            present = present.view(torch.uint8)
    return y, idx, weight, present


def _check_int32(name, block_rows, row_stride):
    """A program's block of rows from its first row must be addressable in int32 offsets."""
    if block_rows * max(row_stride, 1) >= 2**31:
        raise ValueError(f"{name}: rows of stride {row_stride} are too wide for the kernels' int32 offsets")


def weighted_rows_sum(y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """out [N, D] (y's dtype): out[n] = sum_j weight[n, j] * y[idx[n, j]] over the j with present[n, j] != 0
    (every j when present is None). y [S, D] (rows may be strided, columns not), idx [N, s] int64 rows of y,
    weight [N, s] fp32 (or fp64 with fp64 y), present [N, s] float 1.0 / 0.0 (or bool) or None. The rows of
    slots that are not present are never read."""
    y, idx, weight, present = _check(y, idx, weight, present)
    (S, D), (N, s) = y.shape, idx.shape
    if N == 0 or S == 0 or D == 0 or s == 0:  # S == 0: no slot can be present
        return torch.zeros(N, D, device=y.device, dtype=y.dtype)
    out = torch.empty(N, D, device=y.device, dtype=y.dtype)  # the kernel writes every element
    _check_int32('out', BLOCK_N, D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _combine_fwd_kernel[grid](y, idx, weight, present, out, N, D, y.stride(0), s,
                                    HAS_PRESENT=present is not None, BN=BLOCK_N, BD=BLOCK_D)
    return out


def combine_backward(grad: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     present: torch.Tensor | None = None,
                     need_dweight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of ``weighted_rows_sum`` for grad [N, D] of its output: dy [S, D] in y's dtype (dy[idx[n, j]] =
    weight[n, j] * grad[n] for the present slots, other rows zero) and dweight [N, s] in weight's dtype
    (dweight[n, j] = <grad[n], y[idx[n, j]]>, accumulated in fp32 (fp64 for fp64 y), 0 where not present), or
    None when need_dweight is False. idx restricted to the present slots must be injective."""
    y, idx, weight_acc, present = _check(y, idx, weight, present)
    (S, D), (N, s) = y.shape, idx.shape
    if grad.dim() != 2 or grad.shape != (N, D):
        raise ValueError(f"grad: expected shape {(N, D)} (N of idx, D of y), got {tuple(grad.shape)}")
    if grad.dtype not in _FLOATS:
        raise ValueError(f"grad: expected bf16, fp16, fp32 or fp64, got {grad.dtype}")
    if grad.device != y.device:
        raise ValueError(f"grad: on {grad.device}, y on {y.device}")
    if grad.stride(1) != 1 and D > 1:
        grad = grad.contiguous()
    # every row written only when all N * s slots are present and fill y; else unnamed rows must read zero
    full = present is None and S == N * s
    dy = (torch.empty if full else torch.zeros)(S, D, device=y.device, dtype=y.dtype)
    dweight = torch.zeros(N, s, device=y.device, dtype=weight.dtype) if need_dweight else None
    if N == 0 or S == 0 or D == 0 or s == 0:
        return dy, dweight
    _check_int32('grad', BLOCK_N, grad.stride(0))
    BS = triton.next_power_of_2(s)
    _combine_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        grad, y, idx, weight_acc, present, dy, dweight, N, D, grad.stride(0), y.stride(0), s,
        HAS_PRESENT=present is not None, NEED_DWEIGHT=need_dweight, BN=BLOCK_N, BD=BLOCK_D_BWD, BS=BS)
    return dy, dweight
