"""Triton kernels on rows of a state pool: scatter whole rows in place (``dst[index[g]] = src[g]`` unless
valid[g] is False), and ``pool_tile``, the tile of a pool row that the in-place decode steps read and write.

torch's ``index_copy_`` / ``index_put_`` address every element on its own and run at a fraction of the
memory bandwidth on rows of a recurrent state (1 MiB each for the paper's layer); this copies each row in
wide contiguous blocks. Inference only: ``mom_wrap.pool.PoolRows.write`` calls it without autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _scatter_rows_kernel(dst, index, src, valid, F, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    if HAS_VALID:  # a padding token's row keeps its state
        ok = ok & (tl.load(valid + g + cols * 0) != 0)
    r = tl.load(index + g).to(tl.int64)
    x = tl.load(src + g * F + cols, mask=ok)
    tl.store(dst + r * F + cols, x, mask=ok)


@triton.jit
def pool_tile(pool, index, valid, r, h, SP, SPH, SPV, SPK, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, HAS_VALID: tl.constexpr):
    """Program (r, h, V block)'s [BV, BK] tile of state pool[index[r], h] ([V, K] by the strides SPV, SPK):
    its pointers, load/store mask, per-V-entry keep flag (False: a padding token's row, which keeps its state
    and whose index need not name a pool row), the K and V offsets and their bounds."""
    ck = tl.arange(0, BK)
    cv = tl.program_id(2) * BV + tl.arange(0, BV)
    k_ok, v_ok = ck < K, cv < V
    ms = v_ok[:, None] & k_ok[None, :]
    keep = v_ok
    if HAS_VALID:
        keep = tl.load(valid + r + cv * 0) != 0  # one flag, loaded per V entry
        ms = ms & keep[:, None]
    p = tl.load(index + r).to(tl.int64)
    # int64 row offset (p * SP passes 2**31 in a pool over 2**31 elements); within a row int32 (the launchers
    # check it)
    row = pool + p * SP + h * SPH + cv[:, None] * SPV + ck[None, :] * SPK
    return row, ms, keep, ck, cv, k_ok, v_ok


def scatter_rows_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """dst [R, ...] contiguous, index [G] distinct rows, src [G, ...] (same row size), valid [G] bool or None."""
    if not dst.is_contiguous():
        raise ValueError("dst: scatter_rows_ needs a contiguous pool")
    G = index.numel()
    F = dst[0].numel() if dst.shape[0] else 0
    if src.shape[0] != G or (G and src[0].numel() != F):
        raise ValueError(f"src: expected {G} rows of {F} elements, got shape {tuple(src.shape)}")
    if G == 0 or F == 0:
        return
    index = index.contiguous()
    src = src.to(dst.dtype).contiguous()  # torch's rounding, if a cast is needed at all (a no-op for states)
    if valid is not None:
        valid = valid.view(torch.uint8)
    _scatter_rows_kernel[(G, triton.cdiv(F, BLOCK))](dst, index, src, valid, F, HAS_VALID=valid is not None,
                                                    BLOCK=BLOCK)
