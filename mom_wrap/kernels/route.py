"""Triton kernels: the router's selection (softmax, top-k with ties to the lower memory, renormalised weights, the
shared memory's slot) in one launch, and its backward in one more.

Same contract as the PyTorch ops of ``mom_wrap.router.Router.route`` (the reference these kernels are tested
against): logits [N, M] fp32 -> probs [N, M] fp32, weights [N, s] fp32 and indices [N, s] int64, s = k (+ 1 with
the shared memory: index M, weight 1). The PyTorch form is about ten operations forward (softmax, a stable sort,
slices, a sum, a division, two pads) and as many backward; each costs the host tens of microseconds to issue,
which a layer bound by host time pays in full (``benchmarks/host_profile.py``).

Selection: k rounds of a row maximum; among equal probabilities the lowest memory index wins (the stable sort's
rule, on every device). Backward, with Z = sum of the k selected probabilities and w_j = p[i_j] / Z:
    dp[i_j] += (dw_j - sum_l dw_l w_l) / Z        (the shared slot's constant weight passes nothing)
    dlogits  = p * (dp - sum_m p_m dp_m)         (softmax)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # tokens per program


@triton.jit
def _select(p, cols, j, K: tl.constexpr, BM: tl.constexpr):
    """Round j's choice per row: the largest of p not chosen in rounds < j, lowest index among equals (p [BN, BM],
    unused columns < 0). Returns (index [BN], value [BN], p with the choice masked out)."""
    best = tl.max(p, axis=1)
    idx = tl.min(tl.where(p == best[:, None], cols[None, :], BM), axis=1)
    return idx, best, tl.where(cols[None, :] == idx[:, None], -1.0, p)


@triton.jit
def _route_fwd_kernel(logits, probs, weights, indices, N, M, K: tl.constexpr, S: tl.constexpr, SHARED: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BM)
    row_ok, col_ok = rows < N, cols < M
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits + rows[:, None] * M + cols[None, :], mask=m, other=0.)
    x = tl.where(col_ok[None, :], x, float('-inf'))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs + rows[:, None] * M + cols[None, :], p, mask=m)
    rest = tl.where(col_ok[None, :], p, -1.0)
    total = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(K):  # the k choices' sum first, then each choice / sum
        idx, best, rest = _select(rest, cols, j, K, BM)
        total += best
    total = tl.where(row_ok, total, 1.0)  # (rows past N: no 0 / 0)
    rest = tl.where(col_ok[None, :], p, -1.0)
    for j in tl.static_range(K):
        idx, best, rest = _select(rest, cols, j, K, BM)
        tl.store(indices + rows * S + j, idx.to(tl.int64), mask=row_ok)
        tl.store(weights + rows * S + j, best / total, mask=row_ok)
    if SHARED:
        tl.store(indices + rows * S + K, tl.zeros((BN,), dtype=tl.int64) + M, mask=row_ok)
        tl.store(weights + rows * S + K, tl.full((BN,), 1.0, tl.float32), mask=row_ok)


@triton.jit
def _route_bwd_kernel(probs, weights, indices, dprobs, dweights, dlogits, N, M, K: tl.constexpr, S: tl.constexpr,
                      HAS_DPROBS: tl.constexpr, HAS_DWEIGHTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BM)
    row_ok, col_ok = rows < N, cols < M
    m = row_ok[:, None] & col_ok[None, :]
    p = tl.load(probs + rows[:, None] * M + cols[None, :], mask=m, other=0.)
    if HAS_DPROBS:
        dp = tl.load(dprobs + rows[:, None] * M + cols[None, :], mask=m, other=0.)
    else:
        dp = tl.zeros((BN, BM), dtype=tl.float32)
    if HAS_DWEIGHTS:
        total = tl.zeros((BN,), dtype=tl.float32)
        dot = tl.zeros((BN,), dtype=tl.float32)
        for j in tl.static_range(K):
            idx = tl.load(indices + rows * S + j, mask=row_ok, other=0)
            total += tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.), axis=1)
            dot += tl.load(dweights + rows * S + j, mask=row_ok, other=0.) * \
                tl.load(weights + rows * S + j, mask=row_ok, other=0.)
        total = tl.where(row_ok, total, 1.0)  # (rows past N: no 0 / 0)
        for j in tl.static_range(K):
            idx = tl.load(indices + rows * S + j, mask=row_ok, other=0)
            dw = tl.load(dweights + rows * S + j, mask=row_ok, other=0.)
            dp += tl.where(cols[None, :] == idx[:, None], ((dw - dot) / total)[:, None], 0.)
    dx = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(dlogits + rows[:, None] * M + cols[None, :], dx, mask=m)


class RouteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk: int, shared: bool):
        N, M = logits.shape
        S = topk + int(shared)
        logits = logits.contiguous()
        probs = torch.empty_like(logits)
        weights = logits.new_empty(N, S)
        indices = torch.empty(N, S, dtype=torch.long, device=logits.device)
        if N:
            _route_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](logits, probs, weights, indices, N, M, K=topk, S=S,
                                                          SHARED=shared, BM=triton.next_power_of_2(M), BN=BLOCK_N)
        ctx.save_for_backward(probs, weights, indices)
        ctx.topk = topk
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices

    @staticmethod
    def backward(ctx, dprobs, dweights, _):
        probs, weights, indices = ctx.saved_tensors
        N, M = probs.shape
        dlogits = torch.empty_like(probs)
        if N:
            _route_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
                probs, weights, indices, None if dprobs is None else dprobs.contiguous(),
                None if dweights is None else dweights.contiguous(), dlogits, N, M, K=ctx.topk, S=weights.shape[1],
                HAS_DPROBS=dprobs is not None, HAS_DWEIGHTS=dweights is not None, BM=triton.next_power_of_2(M),
                BN=BLOCK_N)
        return dlogits, None, None


def route_triton(logits: torch.Tensor, topk: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, M] fp32 -> probs [N, M], weights [N, s], indices [N, s] (see the module docstring)."""
    return RouteTriton.apply(logits, topk, shared)
