"""The host's recurrence over a plan's segments: in one call, or in parts, for less peak memory.

Why in parts: the host's chunked kernels keep transients that grow with the rows of one call, most of all in
the backward (for fla's gated delta rule the recomputed chunk states and their gradients, [chunks, H, V, K]
each: about 1.5 GiB for the 49,152 slots of 8 x 2048 tokens at top-2 + shared, hidden 1024). Run over
(top-k + shared) x N slots in one call, those transients set the layer's peak memory; in two calls each
backward holds about half of them.

Two ways, the first the adapter's where it has one:

* **The backward in groups** (``HostAdapter.recurrence_in_groups``; GatedDeltaNet): one forward call, and the
  backward in a call per group of whole, consecutive segments (``Dispatch.segment_groups``): segments start from
  zero states in training, so a group's backward reads only its own rows, views of what the forward saved.
  The cost: one more backward call of the host (its launch path's host time) and the copies of the groups'
  gradients into one. Needs the host's forward and backward as separate functions
  (``adapters/gated_delta_in_groups.py``) and segments short enough to split evenly.
* **Over time** (here; every host): every part holds about 1 / parts of every segment (``Dispatch.time_parts``),
  and each part starts from the final states of the part before (the host's ``initial_state`` /
  ``output_final_state``, gradients flowing through both). The chunk-sequential kernels (one program per
  segment and head walks its chunks in order) then walk each segment once in all, as in one call; parts over
  whole memories (this module's first version) walked the longest segment (the shared memory's) in one part
  and the routed ones' in another, half as long again at long sequences. What each extra part costs: the
  host's launch overhead of one more call in each direction, and copies of the write side's per-slot tensors
  into part order and of the output back. Exact: the states carried between parts are the host's fp32
  states, so the outputs are those of one call up to the kernels' own rounding.

Measured (H100, bf16, the paper's GatedDeltaNet layer, ``bench_layer.py --recurrence-parts 1 2 --time-parts 2``,
commit d3f2dcb; benchmarks/README.md): 2 parts lower the peak from 2421 to 1882 MiB at 8 x 2048 tokens in groups
(1696 over time) and from 4808 to 3753 MiB at 2 x 16384 (3287 over time); fla's MomAttention: 2002 and 3961.
The time: 13.3 -> 18.3 ms at 8 x 2048 in groups (25.6 over time), where the layer is bound by host time, and
20.7 -> 21.6 ms at 2 x 16384 (29.9 over time). Hence one call by default.
"""
from __future__ import annotations

import torch

from mom_wrap.adapters.base import HostAdapter
from mom_wrap.dispatch import Dispatch, inverse_permutation, permute_rows

ALIGN = 64  # rows per block of a part's piece of a segment: fla's chunk size, so pieces start on chunk starts


def run_recurrence(adapter: HostAdapter, read: dict[str, torch.Tensor], write: dict[str, torch.Tensor],
                   dispatch: Dispatch, backend: str, parts: int = 1) -> torch.Tensor:
    """o [S, ...] per sorted slot: the recurrence over ``dispatch`` in up to ``parts`` calls: the adapter's
    backward in groups of segments where it has one (``adapter.recurrence_in_groups``), else
    ``adapter.recurrence`` over consecutive time ranges of the segments (``Dispatch.time_parts``). read:
    per-token tensors [N, ...]; write: per-slot tensors [S, ...] (taken into each part's rows; other entries
    passed whole)."""
    o = adapter.recurrence_in_groups(read, write, dispatch, backend, parts)
    if o is not None:  # the adapter's one forward call, its backward in groups of whole segments
        return o
    pieces = dispatch.time_parts(parts, ALIGN)
    if not pieces:
        return adapter.recurrence(read, write, dispatch, backend)[0]
    # every per-slot tensor in part order at once, then cut: gathers both ways (no atomic adds in the backward)
    order = torch.cat([p.rows for p in pieces])
    inverse, sizes = inverse_permutation(order), [p.rows.numel() for p in pieces]
    S = dispatch.num_slots
    taken = {n: permute_rows(t, order, inverse).split(sizes) for n, t in write.items() if t.dim() and t.shape[0] == S}
    outputs, state = [], None
    for i, piece in enumerate(pieces):
        initial = None if piece.carry is None else state.index_select(0, piece.carry)
        o, state = adapter.recurrence(read, {n: taken[n][i] if n in taken else t for n, t in write.items()},
                                      piece.dispatch, backend, initial_state=initial,
                                      output_final_state=i + 1 < len(pieces))
        outputs.append(o)
    return permute_rows(torch.cat(outputs), inverse, order)
