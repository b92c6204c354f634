"""Routing plan: which token slots each memory sees, as contiguous time-ordered segments.

A token with top-k routing (plus the shared memory) has ``s`` slots, each naming one memory and a weight.
The plan sorts all slots by (memory, sequence, time) with a stable sort, so that

* every (memory, sequence) pair becomes one contiguous, time-ordered segment: the host's varlen kernel
  runs all of them in one call with ``cu_seqlens`` over the non-empty segments (no padding to the longest),
* every memory's slots form one contiguous block: the per-memory projections run as one grouped GEMM.

The primitives, each small and tested on its own: ``segment_keys`` (which segment a slot belongs to),
``histogram`` (slots per segment), ``sort_slots`` (the stable permutation), ``gather`` / ``combine``
(into the sorted order and weighted back). ``plan_dispatch`` strings them together and makes the one
host-device sync of a layer forward: the segment lengths, which the varlen kernels need on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def segment_keys(memory: torch.Tensor, sequence: torch.Tensor, valid: torch.Tensor | None,
                 num_sequences: int, num_memories: int) -> torch.Tensor:
    """memory [N, s], sequence [N], valid [N] bool or None -> key [N*s] int64.

    key = memory * num_sequences + sequence, memory-major; slots of invalid (padding) tokens get the
    sentinel ``num_memories * num_sequences`` so that they sort last and count in a bin of their own.
    """
    key = memory * num_sequences + sequence[:, None]
    if valid is not None:
        key = torch.where(valid[:, None], key, num_memories * num_sequences)
    return key.reshape(-1)


def histogram(key: torch.Tensor, num_bins: int) -> torch.Tensor:
    """key [S] -> counts [num_bins] (int64, on the key's device)."""
    return torch.bincount(key, minlength=num_bins)


def sort_slots(key: torch.Tensor) -> torch.Tensor:
    """key [S] -> permutation [S]: stable, so time order inside a segment is kept."""
    return torch.argsort(key, stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@dataclass
class Dispatch:
    """The routing plan of one layer forward. S: routed slots, G: non-empty segments, E: memories."""

    token: torch.Tensor           # [S] flat token index of each sorted slot
    memory: torch.Tensor          # [S] memory index of each sorted slot
    position: torch.Tensor        # [S] position of the slot inside its segment (0 = segment start)
    restore: torch.Tensor         # [N, s] row in the sorted order of each token's slot (S: none)
    token_weight: torch.Tensor    # [N, s] fp32 combine weight of each token's slot (0 for padding)
    memory_counts: torch.Tensor   # [E] slots per memory (device)
    memory_offsets: torch.Tensor  # [E] int32 end of each memory's block in the sorted order
    cu_seqlens: torch.Tensor      # [G+1] int64 on the device
    cu_seqlens_cpu: torch.Tensor  # [G+1] int64 on the host
    segment_memory: torch.Tensor  # [G] memory of each segment (host)
    segment_sequence: torch.Tensor  # [G] sequence of each segment (host)
    max_seqlen: int

    @property
    def num_slots(self) -> int:
        return self.token.numel()

    @property
    def num_segments(self) -> int:
        return self.segment_memory.numel()


def plan_dispatch(memory: torch.Tensor, weight: torch.Tensor, sequence: torch.Tensor,
                  valid: torch.Tensor | None, num_sequences: int, num_memories: int) -> Dispatch:
    """Build the plan.

    memory [N, s] int64, weight [N, s] fp32, sequence [N] int64 (which sequence each flat token is in),
    valid [N] bool or None (padding tokens get no slot). Flat tokens must be in (sequence, time) order.
    """
    N, s = memory.shape
    E, Q = num_memories, num_sequences
    key = segment_keys(memory, sequence, valid, Q, E)
    counts = histogram(key, E * Q + 1)
    # The one host-device sync of a layer forward: the varlen kernels take segment lengths on the host.
    counts_cpu = counts.cpu()
    seg_counts_cpu = counts_cpu[:-1]
    num_slots = int(seg_counts_cpu.sum())

    perm = sort_slots(key)
    restore = inverse_permutation(perm).view(N, s)
    perm = perm[:num_slots]
    key_sorted = key[perm]
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(num_slots, device=key.device) - starts[key_sorted]

    nonempty = seg_counts_cpu.nonzero().squeeze(1)
    lengths = seg_counts_cpu[nonempty]
    cu_seqlens_cpu = torch.zeros(nonempty.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=cu_seqlens_cpu[1:])
    if key.device.type == 'cuda':
        cu_seqlens = cu_seqlens_cpu.pin_memory().to(key.device, non_blocking=True)
    else:
        cu_seqlens = cu_seqlens_cpu.clone()

    memory_counts = counts[:-1].view(E, Q).sum(1)
    token_weight = weight if valid is None else weight * valid[:, None]
    return Dispatch(
        token=perm // s,
        memory=key_sorted // Q,
        position=position,
        restore=restore,
        token_weight=token_weight,
        memory_counts=memory_counts,
        memory_offsets=memory_counts.cumsum(0).to(torch.int32),
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
        segment_memory=nonempty // Q,
        segment_sequence=nonempty % Q,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
    )


def gather(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """x [N, ...] per flat token -> [S, ...] per sorted slot."""
    return x[dispatch.token]


def combine(y: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """y [S, ...] per sorted slot -> [N, ...] per token: sum over the token's slots of weight * y.

    A gather through the inverse permutation (not an atomic scatter-add), so the sum is deterministic;
    it accumulates in fp32. Tokens without slots (padding) get zeros.
    """
    y_ext = torch.cat([y, y.new_zeros(1, *y.shape[1:])])
    idx = dispatch.restore.clamp(max=y.shape[0])
    w = dispatch.token_weight.view(*idx.shape, *([1] * (y.dim() - 1)))
    return (y_ext[idx].float() * w).sum(1).to(y.dtype)
