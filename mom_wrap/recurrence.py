"""The host's recurrence over a plan's segments: in one call, or in a few calls over consecutive memories.

Why in parts: the host's chunked kernels keep transients that grow with the rows of one call, most of all in
the backward (for fla's gated delta rule the recomputed chunk states and their gradients, [chunks, H, V, K]
each: about 1.5 GiB for the 49,152 slots of 8 x 2048 tokens at top-2 + shared, hidden 1024). Run over
(top-k + shared) x N slots in one call, those transients set the layer's peak memory; in two calls each
backward holds about half of them. The cost: the calls run one after another, so at long sequences the
chunk-sequential part of the kernels (one program per segment and head walks its chunks in order) runs once
per call, and each call costs the host its launch overhead again (fla's chunked gated delta rule: about 2 ms
of host time per call and direction, which a layer of 8 x 2048 tokens cannot hide). Measured (H100, bf16, the
paper's layer, commit 1553846): 2 parts lower the peak from 2414 to 1667 MiB at 8 x 2048 and from 4809 to
3308 MiB at 2 x 16384, for 12.8 -> 18.0 ms and 21.2 -> 27.4 ms; hence one call by default
(``MixtureOfMemories(recurrence_parts=1)``), and parts where memory, not time, is short.
Segments never span two parts, so the outputs are exactly those of one call.
"""
from __future__ import annotations

import torch

from mom_wrap.adapters.base import HostAdapter
from mom_wrap.dispatch import Dispatch


def run_recurrence(adapter: HostAdapter, read: dict[str, torch.Tensor], write: dict[str, torch.Tensor],
                   dispatch: Dispatch, backend: str, parts: int = 1) -> torch.Tensor:
    """o [S, ...] per sorted slot: ``adapter.recurrence`` over ``dispatch``, in up to ``parts`` calls
    (``Dispatch.split``). read: per-token tensors [N, ...]; write: per-slot tensors [S, ...] (sliced per part;
    other entries passed whole)."""
    pieces = dispatch.split(parts)
    if len(pieces) == 1:
        return adapter.recurrence(read, write, dispatch, backend)[0]
    S, outputs, start = dispatch.num_slots, [], 0
    for piece in pieces:
        rows = slice(start, start + piece.num_slots)
        sliced = {n: t[rows] if t.dim() and t.shape[0] == S else t for n, t in write.items()}
        outputs.append(adapter.recurrence(read, sliced, piece, backend)[0])
        start = rows.stop
    return torch.cat(outputs)
