"""Triton kernels: the routing plan (``mom_wrap.dispatch.plan_dispatch``) as a counting sort in four launches.

The plan sorts every token's slots by (memory, sequence, time), stably. Its PyTorch form (keys, a histogram, a
stable argsort, the inverse permutation, gathers and cumulative sums: about 25 operations) is the layer's
largest share of host time after the host's own kernels (``benchmarks/host_profile.py``). The sort needs no
comparison sort: flat tokens are in (sequence, time) order, so among the slots of one memory, token order already
is (sequence, time) order, and a slot's sorted row is

    row = offset[e] + rank_e(n)      offset[e]: slots of the memories before e; rank_e(n): slots of memory e among
                                     the tokens before n (a prefix count)
    position = rank_e(n) - rank_e(start of n's sequence)

Padding tokens' slots (``valid`` False) go after all others, in slot order (the stable sort's place for the
sentinel key): row = (valid slots) + (padding tokens before n) * s + j.

The prefix counts are a scan over tokens of one-hot counts [N, E + 1] (the last column counts padding tokens):
``_block_counts`` sums each block of tokens, ``_prefix_counts`` scans the blocks before its own and within it
(the totals in one more row), ``_place_slots`` writes every slot's row, position and the sorted order's
tensors, ``_segment_counts`` the counts per (memory, sequence) from the prefix counts at the sequences'
bounds. Same outputs as the PyTorch plan, held to it (and to a loop reference) under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 256  # tokens per program
BLOCK_B = 64  # earlier blocks' counts read at once by _prefix_counts
BLOCK_Q = 64  # sequences per program of _segment_counts


@triton.jit
def _token_counts(memory, valid, rows, row_ok, E, SLOTS: tl.constexpr, EP: tl.constexpr, HAS_VALID: tl.constexpr):
    """[BN, EP] int32: per token, its slots in each memory e < E, and in column E 1 for a padding token."""
    cols = tl.arange(0, EP)
    counts = tl.zeros((rows.shape[0], EP), dtype=tl.int32)
    for j in tl.static_range(SLOTS):
        m = tl.load(memory + rows * SLOTS + j, mask=row_ok, other=-1)
        counts += (m[:, None] == cols[None, :]).to(tl.int32)
    if HAS_VALID:
        v = (tl.load(valid + rows, mask=row_ok, other=0) != 0) | ~row_ok
        counts = tl.where(v[:, None], counts, 0) + ((cols[None, :] == E) & ~v[:, None]).to(tl.int32)
    return counts


@triton.jit
def _block_counts_kernel(memory, valid, block_counts, N, E, SLOTS: tl.constexpr, EP: tl.constexpr,
                         HAS_VALID: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BN + tl.arange(0, BN)
    counts = _token_counts(memory, valid, rows, rows < N, E, SLOTS, EP, HAS_VALID)
    tl.store(block_counts + pid * EP + tl.arange(0, EP), tl.sum(counts, axis=0))


@triton.jit
def _prefix_counts_kernel(memory, valid, block_counts, cum, N, E, SLOTS: tl.constexpr, EP: tl.constexpr,
                          HAS_VALID: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr):
    """cum[n] = counts of the tokens before n [EP]; cum[N] = the totals (the last program writes it)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, EP)
    offset = tl.zeros((EP,), dtype=tl.int32)
    for b0 in range(0, pid, BB):  # the blocks before this one
        b = b0 + tl.arange(0, BB)
        part = tl.load(block_counts + b[:, None] * EP + cols[None, :], mask=(b < pid)[:, None], other=0)
        offset += tl.sum(part, axis=0)
    rows = pid.to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < N
    counts = _token_counts(memory, valid, rows, row_ok, E, SLOTS, EP, HAS_VALID)
    inclusive = tl.cumsum(counts, axis=0)
    tl.store(cum + rows[:, None] * EP + cols[None, :], inclusive - counts + offset[None, :], mask=row_ok[:, None])
    if pid == tl.num_programs(0) - 1:
        tl.store(cum + N * EP + cols, offset + tl.sum(counts, axis=0))


@triton.jit
def _place_slots_kernel(memory, valid, sequence, bounds, cum, restore, perm, token, memory_sorted, position, N, E,
                        SLOTS: tl.constexpr, EP: tl.constexpr, HAS_VALID: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < N
    cols = tl.arange(0, EP)
    totals = tl.load(cum + N * EP + cols)
    routed = tl.where(cols < E, totals, 0)
    offsets = tl.cumsum(routed, axis=0) - routed  # [EP]: slots of the memories before each
    num_valid = tl.sum(routed, axis=0)
    start = tl.load(bounds + tl.load(sequence + rows, mask=row_ok, other=0), mask=row_ok, other=0)
    pad_rank = tl.load(cum + rows * EP + E, mask=row_ok, other=0)  # padding tokens before n
    pad = tl.zeros((BN,), dtype=tl.int1)
    if HAS_VALID:
        pad = tl.load(valid + rows, mask=row_ok, other=1) == 0
    for j in tl.static_range(SLOTS):
        e = tl.load(memory + rows * SLOTS + j, mask=row_ok, other=0)
        rank = tl.load(cum + rows * EP + e, mask=row_ok, other=0)
        first = tl.load(cum + start * EP + e, mask=row_ok, other=0)
        offset = tl.sum(tl.where(cols[None, :] == e[:, None], offsets[None, :], 0), axis=1)
        row = tl.where(pad, num_valid + pad_rank * SLOTS + j, offset + rank).to(tl.int64)
        tl.store(restore + rows * SLOTS + j, row, mask=row_ok)
        tl.store(perm + row, rows * SLOTS + j, mask=row_ok)
        tl.store(token + row, rows, mask=row_ok)
        tl.store(memory_sorted + row, e, mask=row_ok & ~pad)
        tl.store(position + row, (rank - first).to(tl.int64), mask=row_ok & ~pad)


@triton.jit
def _segment_counts_kernel(bounds, cum, counts, memory_counts, memory_offsets, N, Q, E, SLOTS: tl.constexpr,
                           EP: tl.constexpr, BQ: tl.constexpr):
    """counts[e * Q + q] (slots of memory e in sequence q), counts[E * Q] (padding slots); program 0 also the
    per-memory counts and their running ends (int32)."""
    q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    q_ok = q < Q
    cols = tl.arange(0, EP)
    lo = tl.load(bounds + q, mask=q_ok, other=0)
    hi = tl.load(bounds + q + 1, mask=q_ok, other=0)
    m = q_ok[:, None] & (cols < E)[None, :]
    c = tl.load(cum + hi[:, None] * EP + cols[None, :], mask=m, other=0) - \
        tl.load(cum + lo[:, None] * EP + cols[None, :], mask=m, other=0)
    tl.store(counts + cols[None, :] * Q + q[:, None], c.to(tl.int64), mask=m)
    if tl.program_id(0) == 0:
        totals = tl.load(cum + N * EP + cols)
        routed = tl.where(cols < E, totals, 0)
        tl.store(memory_counts + cols, routed.to(tl.int64), mask=cols < E)
        tl.store(memory_offsets + cols, tl.cumsum(routed, axis=0), mask=cols < E)
        tl.store(counts + E * Q + cols * 0, (totals * SLOTS).to(tl.int64), mask=cols == E)


def plan_triton(memory: torch.Tensor, sequence: torch.Tensor, valid: torch.Tensor | None, bounds: torch.Tensor,
                num_sequences: int, num_memories: int):
    """memory [N, s] int64 (distinct per token), sequence [N] int64 (flat tokens in (sequence, time) order),
    valid [N] bool or None, bounds [Q+1] int64: each sequence's first flat token (and N). Returns counts
    [E*Q + 1] (per (memory, sequence), memory-major, then padding slots), restore [N, s], and in sorted order
    perm, token, memory, position [N*s] (rows past the valid slots: padding slots, memory / position unset),
    memory_counts [E] int64, memory_offsets [E] int32."""
    N, s = memory.shape
    E, Q = num_memories, num_sequences
    dev = memory.device
    EP = triton.next_power_of_2(E + 1)
    memory = memory.contiguous()
    sequence = sequence.contiguous()
    bounds = bounds.contiguous()
    valid_u8 = None if valid is None else valid.contiguous().view(torch.uint8)
    blocks = max(triton.cdiv(N, BLOCK_N), 1)
    block_counts = torch.empty(blocks, EP, dtype=torch.int32, device=dev)
    cum = torch.empty(N + 1, EP, dtype=torch.int32, device=dev)
    common = dict(SLOTS=s, EP=EP, BN=BLOCK_N)
    _block_counts_kernel[(blocks,)](memory, valid_u8, block_counts, N, E, HAS_VALID=valid is not None, **common)
    _prefix_counts_kernel[(blocks,)](memory, valid_u8, block_counts, cum, N, E, HAS_VALID=valid is not None,
                                     BB=BLOCK_B, **common)
    restore = torch.empty(N, s, dtype=torch.long, device=dev)
    perm, token, memory_sorted, position = (torch.empty(N * s, dtype=torch.long, device=dev) for _ in range(4))
    _place_slots_kernel[(blocks,)](memory, valid_u8, sequence, bounds, cum, restore, perm, token, memory_sorted,
                                   position, N, E, HAS_VALID=valid is not None, **common)
    counts = torch.empty(E * Q + 1, dtype=torch.long, device=dev)
    memory_counts = torch.empty(E, dtype=torch.long, device=dev)
    memory_offsets = torch.empty(E, dtype=torch.int32, device=dev)
    _segment_counts_kernel[(max(triton.cdiv(Q, BLOCK_Q), 1),)](bounds, cum, counts, memory_counts, memory_offsets,
                                                               N, Q, E, SLOTS=s, EP=EP, BQ=BLOCK_Q)
    return counts, restore, perm, token, memory_sorted, position, memory_counts, memory_offsets
