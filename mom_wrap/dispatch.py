"""Routing plan: which token slots each memory sees, as contiguous time-ordered segments.

A token with top-k routing (plus the shared memory) has ``s`` slots, each naming one memory and a weight.
The plan sorts all slots by (memory, sequence, time) with a stable sort, so that

* every (memory, sequence) pair becomes one contiguous, time-ordered segment: the host's varlen kernel
  runs all of them in one call with ``cu_seqlens`` over the non-empty segments (no padding to the longest),
* every memory's slots form one contiguous block: the per-memory projections run as one grouped GEMM.

The primitives, each small and tested on its own: ``segment_keys`` (which segment a slot belongs to),
``histogram`` (slots per segment), ``sort_slots`` (the stable permutation), ``gather`` / ``combine``
(into the sorted order and weighted back). ``plan_dispatch`` strings them together (on the triton backend
the same plan as a counting sort in four Triton kernels, ``kernels.plan``); the one
host-device sync of a layer forward, the segment lengths that the varlen kernels need on the host, waits until
they are first used (``HostCounts``, ``Dispatch.segments``).
``plan_decode`` is the plan of a one-token step: every slot its own segment, no sort and no sync.

Memory-major rather than sequence-major order: segments are the same either way, and memory-major also
gives the grouped GEMM its contiguous per-memory blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mom_wrap.lazy import cached_property
from mom_wrap.ops import acc


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
    """key [S] -> counts [num_bins] (int64, on the key's device).

    Not ``torch.bincount``: on CUDA it reads the largest key back to the host, a second sync."""
    return torch.zeros(num_bins, dtype=torch.long, device=key.device).index_add_(0, key, torch.ones_like(key))


def sort_slots(key: torch.Tensor) -> torch.Tensor:
    """key [S] -> permutation [S]: stable, so time order inside a segment is kept."""
    return torch.argsort(key, stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x [R, ...] -> x[perm], perm a permutation of the R rows and ``inverse`` its inverse: a row gather whose
    backward is a row gather too (through ``inverse``), where autograd's backward of ``index_select`` adds
    into zeros with atomics (slow in bf16: the recurrence in parts spent milliseconds there)."""
    return _PermuteRows.apply(x, perm, inverse)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to ``device`` through pinned memory, asynchronously: a plain ``.to(device)`` of
    pageable memory blocks the host until the stream drains, a sync of its own."""
    if torch.device(device).type != 'cuda' or torch.compiler.is_compiling():  # (compile traces no pin_memory)
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCounts:
    """Counts [n] int64 on the device on their way to the host. On CUDA the copy goes into pinned memory
    asynchronously, behind an event; ``get`` waits for that event: the plan's one host-device sync, taken
    where host values are first needed. The device meanwhile runs the work queued before that point, so the
    host's wait costs no idle device time (a blocking copy at planning time left the device idle while the
    host queued the rest of the forward)."""

    def __init__(self, counts: torch.Tensor):
        self._event = None
        if counts.is_cuda and not torch.compiler.is_compiling():
            self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self._host.copy_(counts, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = counts.cpu()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


@dataclass
class Segments:
    """The plan's host-side layout: what the varlen kernels take. G: non-empty segments, E: memories."""

    cu_seqlens: torch.Tensor      # [G+1] int64 on the device
    cu_seqlens_cpu: torch.Tensor  # [G+1] int64 on the host
    segment_memory: torch.Tensor  # [G] memory of each segment (device)
    segment_sequence: torch.Tensor  # [G] sequence of each segment (device)
    max_seqlen: int
    memory_offsets_cpu: torch.Tensor | None  # [E] end of each memory's block on the host; None: not memory-major

    @staticmethod
    def from_counts(counts: torch.Tensor, num_memories: int, num_sequences: int, device) -> Segments:
        """counts [E * Q] slots per (memory, sequence) on the host -> the layout over the non-empty ones."""
        E, Q = num_memories, num_sequences
        # in numpy, one upload: this runs between the plan's sync and the recurrence, while the device may idle
        c = counts.numpy()
        nonempty = np.flatnonzero(c)
        lengths = c[nonempty]
        cu = np.zeros(nonempty.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        n = nonempty.size
        cu_seqlens, memory, sequence = upload(torch.from_numpy(np.concatenate([cu, nonempty // Q, nonempty % Q])),
                                              device).split([n + 1, n, n])
        return Segments(cu_seqlens=cu_seqlens, cu_seqlens_cpu=torch.from_numpy(cu), segment_memory=memory,
                        segment_sequence=sequence, max_seqlen=int(lengths.max()) if n else 0,
                        memory_offsets_cpu=torch.from_numpy(c.reshape(E, Q).sum(1).cumsum(0)))

    @property
    def chunk_cache(self) -> dict[int, torch.Tensor]:
        """chunk size -> the chunk indices made so far (``chunk_indices``; ``Dispatch.segment_groups`` adds the
        ones it uploads with its own)."""
        return self.__dict__.setdefault('_chunk_indices', {})

    def chunk_indices(self, chunk_size: int) -> torch.Tensor:
        """fla's ``chunk_indices`` of these segments [NT, 2] on the device (``chunk_indices``), made once per
        chunk size and uploaded asynchronously (fla would make them with PyTorch ops on the CPU and upload them
        blocking)."""
        cache = self.chunk_cache
        if chunk_size not in cache:
            cache[chunk_size] = upload(chunk_indices(self.cu_seqlens_cpu, chunk_size), self.cu_seqlens.device)
        return cache[chunk_size]


def chunk_indices(cu_seqlens_cpu: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[NT, 2] int64 on the host: (segment, chunk within it) of every chunk of ``chunk_size`` rows of the segments
    of cu_seqlens_cpu [G+1]: what fla's chunked kernels take as ``chunk_indices`` (fla's
    ``prepare_chunk_indices``, in numpy: a few times less host time than fla's PyTorch ops on the CPU)."""
    cu = cu_seqlens_cpu.numpy()
    chunks = (np.diff(cu) + chunk_size - 1) // chunk_size
    out = np.empty((int(chunks.sum()), 2), dtype=np.int64)
    out[:, 0] = np.repeat(np.arange(chunks.size), chunks)
    out[:, 1] = np.arange(out.shape[0]) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    return torch.from_numpy(out)


class _FromSegments:
    """A ``Dispatch`` attribute read from its host layout, ``Dispatch.segments`` (made on first use)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, dispatch, owner=None):
        return self if dispatch is None else getattr(dispatch.segments, self.name)


@dataclass
class Dispatch:
    """The routing plan of one layer forward. S: routed slots, G: non-empty segments, E: memories.

    The device-side plan (slot order, positions, memory blocks) is complete when made; the host-side layout
    (``Segments``: cu_seqlens, segment memories, max_seqlen) is made on first use, from the counts on their
    way to the host (``HostCounts``): the projections and convolutions of the write side need none of it and
    are queued before the host waits."""

    token: torch.Tensor           # [S] flat token index of each sorted slot
    slot: torch.Tensor            # [S] flat slot index (token * s + j) of each sorted slot
    memory: torch.Tensor          # [S] memory index of each sorted slot
    position: torch.Tensor        # [S] position of the slot inside its segment (0 = segment start)
    restore: torch.Tensor         # [N, s] row in the sorted order of each token's slot (S: none)
    token_weight: torch.Tensor    # [N, s] fp32 combine weight of each token's slot (0 for padding)
    memory_offsets: torch.Tensor | None  # [E] int32 end of each memory's block; None: not memory-major
    host_layout: Callable[[], Segments]  # makes the host-side layout (``segments``), once, when first read
    segment_valid: torch.Tensor | None = None  # [G] False: a padding token's segment (decode plans only)
    token_major: bool = False     # slots in token order, s per token (decode plans): restore is the identity
    padded: bool = False          # some token may have no slots (padding): gathers through restore mask them
    kernels: bool = False         # the gathers' backward and the combine on mom_wrap's Triton kernels (CUDA)
    memory_counts: torch.Tensor | None = None  # [E] int64 slots per memory (sorted plans; for the balancing loss)

    @cached_property
    def segments(self) -> Segments:
        return self.host_layout()

    # the host layout's fields, read through ``segments`` (see ``Segments``)
    cu_seqlens = _FromSegments()
    cu_seqlens_cpu = _FromSegments()
    segment_memory = _FromSegments()
    segment_sequence = _FromSegments()
    max_seqlen = _FromSegments()
    memory_offsets_cpu = _FromSegments()

    @property
    def num_slots(self) -> int:
        return self.token.numel()

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_cpu.numel() - 1

    def time_parts(self, parts: int, align: int = 64) -> list[TimePart]:
        """The plan as up to ``parts`` plans over consecutive time ranges of every segment, for the recurrence
        in parts (``mom_wrap.recurrence``): segment g's rows, in blocks of ``align`` (the host kernels' chunk),
        are dealt out in time order, C_g // parts blocks to each part and one more to each of the first
        C_g % parts (C_g: its blocks), so that every part gets about 1 / parts of every segment, a segment's
        pieces lie in parts 0, 1, .. in turn, and each part's segments are among the previous part's (whose
        final states it starts from). [] where fewer than two parts have rows: the plan runs whole. Reads the
        host layout (the plan's sync, if not taken yet)."""
        if parts <= 1 or self.token_major or self.num_slots == 0:
            return []
        # the host's arithmetic in numpy (a few microseconds; PyTorch's CPU ops cost tens each)
        cu = self.cu_seqlens_cpu.numpy()
        lengths = np.diff(cu)
        blocks = (lengths + align - 1) // align
        share = blocks[None, :] // parts + (np.arange(parts)[:, None] < (blocks % parts)[None, :])  # [parts, G]
        start = np.minimum(np.concatenate([np.zeros((1, lengths.size), np.int64), share.cumsum(0) * align]), lengths)
        piece = np.diff(start, axis=0)  # [parts, G] rows of each segment in each part
        used = [i for i in range(parts) if piece[i].any()]
        if len(used) < 2:
            return []
        host, previous = [], None
        for i in used:  # per part: its segments and cu_seqlens, its rows' plan rows and positions, carried states
            segs = np.flatnonzero(piece[i])
            n = piece[i][segs]
            cu_part = np.concatenate([[0], n.cumsum()])
            first = np.repeat(cu[:-1][segs] + start[i][segs], n)  # each row's piece start, as a plan row
            position = np.arange(cu_part[-1]) - np.repeat(cu_part[:-1], n)
            carry = np.zeros(0, np.int64) if previous is None else np.searchsorted(previous, segs)
            host.append([segs, cu_part, first + position, position, carry])
            previous = segs
        flat = upload(torch.from_numpy(np.concatenate([t for part in host for t in part])), self.token.device)
        dev = iter(flat.split([t.size for part in host for t in part]))  # the same tensors on the device
        out = []
        for part in host:
            out.append(self._time_part(torch.from_numpy(part[1]), *[next(dev) for _ in part], first=not out))
        return out

    def segment_groups(self, parts: int, chunk_size: int, slack: float = 1.25) -> list[SegmentGroup]:
        """The plan's segments as up to ``parts`` groups of whole, consecutive segments, cut at the segment
        boundaries nearest to every ``num_slots * i / parts`` rows: for a host kernel's backward in a call per
        group (``HostAdapter.recurrence_in_groups``). Each group's rows are a contiguous range of the sorted
        slots (views, no copies) and its segments need no states from another group. [] where fewer than two
        groups have rows, or where the largest has more than ``slack * num_slots / parts`` rows (a segment of
        its own that long: then the parts over time, ``time_parts``, split it, and this split would not).
        Reads the host layout (the plan's sync, if not taken yet); one upload for all groups."""
        if parts <= 1 or self.token_major or self.num_slots == 0:
            return []
        cu = self.cu_seqlens_cpu.numpy()
        S = int(cu[-1])
        targets = S * np.arange(1, parts) / parts
        after = np.searchsorted(cu, targets)  # the first boundary at or past each target
        nearer = cu[after] - targets > targets - cu[after - 1]  # the one before it is nearer
        bounds = np.unique(np.concatenate([[0], after - nearer, [cu.size - 1]]))
        rows = cu[bounds]
        if bounds.size < 3 or np.diff(rows).max() > slack * S / parts:
            return []
        # each group's chunk indices: its rows of the plan's, segments counted from its first
        chunks = chunk_indices(self.cu_seqlens_cpu, chunk_size).numpy()
        first_chunk = np.searchsorted(chunks[:, 0], bounds)  # (chunks are in segment order)
        host = []
        for g0, g1, c0, c1 in zip(bounds[:-1], bounds[1:], first_chunk[:-1], first_chunk[1:]):
            host += [cu[g0:g1 + 1] - cu[g0], (chunks[c0:c1] - [g0, 0]).reshape(-1)]
        cache = self.segments.chunk_cache
        whole = chunk_size not in cache  # the plan's own (the forward's call) in the same upload
        flat = upload(torch.from_numpy(np.concatenate(host + ([chunks.reshape(-1)] if whole else []))),
                      self.token.device)
        dev = flat.split([t.size for t in host] + ([chunks.size] if whole else []))
        if whole:
            cache[chunk_size] = dev[-1].view(-1, 2)
        return [SegmentGroup(int(r0), int(r1), torch.from_numpy(host[2 * i]), dev[2 * i], dev[2 * i + 1].view(-1, 2))
                for i, (r0, r1) in enumerate(zip(rows[:-1], rows[1:]))]

    def _time_part(self, cu_part: torch.Tensor, segs: torch.Tensor, cu_part_dev: torch.Tensor, rows: torch.Tensor,
                   position: torch.Tensor, carry: torch.Tensor, first: bool) -> TimePart:
        """One part of ``time_parts``, from its cu_seqlens ``cu_part`` (host) and on the device its segments'
        indices in the plan, cu_seqlens, rows (as plan rows), their positions and its segments' carries."""
        S, rows_part = self.num_slots, rows.numel()
        inverse = torch.full((S + 1,), rows_part, dtype=torch.long, device=rows.device)  # (row S: no slot)
        inverse[rows] = torch.arange(rows_part, device=rows.device)
        restore = inverse[self.restore.clamp(max=S)]  # (rows from S on: padding slots, in no part)
        layout = Segments(cu_seqlens=cu_part_dev, cu_seqlens_cpu=cu_part, segment_memory=self.segment_memory[segs],
                          segment_sequence=self.segment_sequence[segs], max_seqlen=int(cu_part.diff().max()),
                          memory_offsets_cpu=None)
        plan = Dispatch(token=self.token[rows], slot=self.slot[rows], memory=self.memory[rows], position=position,
                        restore=restore, token_weight=self.token_weight * (restore < rows_part), memory_offsets=None,
                        host_layout=lambda: layout, padded=True, kernels=self.kernels)
        return TimePart(plan, rows, None if first else carry)

    @cached_property
    def slot_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token's slots: its sorted row (clamped into range) [N, s] and whether it has one
        (1.0, 0.0 for padding) [N, s]; made once, used by every gather and the combine of a forward."""
        S = self.num_slots
        return self.restore.clamp(max=max(S - 1, 0)), (self.restore < S).float()


@dataclass
class TimePart:
    """One call of the recurrence in parts (``Dispatch.time_parts``)."""

    dispatch: Dispatch           # the part's own plan: its rows in order, its segments (pieces of the plan's),
    #                              positions from each piece's start
    rows: torch.Tensor           # [S_i] the plan's sorted row of each of its rows
    carry: torch.Tensor | None   # [G_i] each of its segments' index among the previous part's (None: the first part)


@dataclass
class SegmentGroup:
    """Consecutive whole segments of a plan (``Dispatch.segment_groups``): sorted rows [start, stop)."""

    start: int
    stop: int
    cu_seqlens_cpu: torch.Tensor  # [G_i + 1] int64 on the host, from 0
    cu_seqlens: torch.Tensor      # the same on the device
    chunk_indices: torch.Tensor   # [NT_i, 2] fla's chunk indices of its segments, on the device


def plan_dispatch(memory: torch.Tensor, weight: torch.Tensor, sequence: torch.Tensor,
                  valid: torch.Tensor | None, num_sequences: int, num_memories: int,
                  kernels: bool = False, bounds: torch.Tensor | None = None) -> Dispatch:
    """Build the plan.

    memory [N, s] int64 (distinct memories per token), weight [N, s] fp32, sequence [N] int64 (which sequence
    each flat token is in), valid [N] bool or None (padding tokens get no slot). Flat tokens must be in
    (sequence, time) order. kernels: the plan as a counting sort in mom_wrap's Triton kernels
    (``kernels.plan``; bounds [Q+1]: each sequence's first flat token, and N, made from ``sequence`` when not
    given), and the gathers' backward and the combine on its kernels on CUDA (the triton backend).

    The one host-device sync of a layer forward: the segment lengths, which the varlen kernels take on the
    host. Without padding every token has its s slots, so the plan's sizes are known and the sync waits
    until the host layout is first used (``Dispatch.segments``); with padding the number of real slots sizes
    the plan, and the host waits here.
    """
    N, s = memory.shape
    E, Q = num_memories, num_sequences
    if kernels:
        from mom_wrap.kernels.plan import plan_triton
        if bounds is None:
            bounds = torch.searchsorted(sequence, torch.arange(Q + 1, device=sequence.device))
        counts, restore, perm, token, memory_sorted, position, memory_counts, memory_offsets = plan_triton(
            memory, sequence, valid, bounds, Q, E)
    else:
        key = segment_keys(memory, sequence, valid, Q, E)
        counts = histogram(key, E * Q + 1)
    host_counts = HostCounts(counts)
    num_slots = N * s if valid is None else int(host_counts.get()[:-1].sum())

    if kernels:
        if num_slots < N * s:  # (rows past the valid slots: the padding slots)
            perm, token, memory_sorted, position = (t[:num_slots] for t in (perm, token, memory_sorted, position))
    else:
        perm = sort_slots(key)
        restore = inverse_permutation(perm).view(N, s)
        perm = perm[:num_slots]
        key_sorted = key[perm]
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(num_slots, device=key.device) - starts[key_sorted]
        token, memory_sorted = perm // s, key_sorted // Q
        memory_counts = counts[:-1].view(E, Q).sum(1)
        memory_offsets = memory_counts.cumsum(0).to(torch.int32)
    token_weight = weight if valid is None else weight * valid[:, None]
    return Dispatch(
        token=token,
        slot=perm,
        memory=memory_sorted,
        position=position,
        restore=restore,
        token_weight=token_weight,
        memory_offsets=memory_offsets,
        host_layout=lambda: Segments.from_counts(host_counts.get()[:-1], E, Q, memory.device),
        padded=valid is not None,
        kernels=kernels,
        memory_counts=memory_counts,
    )


def plan_decode(memory: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None) -> Dispatch:
    """The plan of a one-token-per-sequence step, without sorting and without any host sync.

    memory, weight [N, s]: every slot is its own segment of length 1 (G = S = N*s, token-major), so the
    segment layout is known on the host in advance and the step can be captured in a CUDA graph.
    Padding tokens keep their slots (weight 0); the caller keeps their states unchanged.
    """
    N, s = memory.shape
    dev = memory.device
    slots = torch.arange(N * s, device=dev)
    token = slots // s
    segments = Segments(cu_seqlens=torch.arange(N * s + 1, device=dev), cu_seqlens_cpu=torch.arange(N * s + 1),
                        segment_memory=memory.reshape(-1), segment_sequence=token, max_seqlen=1,
                        memory_offsets_cpu=None)
    return Dispatch(
        token=token, slot=slots, memory=memory.reshape(-1), position=torch.zeros_like(slots),
        restore=slots.view(N, s), token_weight=weight if valid is None else weight * valid[:, None],
        memory_offsets=None, host_layout=lambda: segments,
        segment_valid=None if valid is None else valid[token], token_major=True)


def _slot_row(y: torch.Tensor, idx: torch.Tensor, present: torch.Tensor | None, j: int) -> torch.Tensor:
    """y's row of each token's slot j, fp32 [N, ...]; with ``present`` [N, s] (1/0), zeros for a token without
    that slot (padding), whose clamped index reads another token's row: weight 0 x that row would let a NaN or
    Inf of another sequence through (into this token's output, or in the backward its gradient)."""
    row = acc(y.index_select(0, idx[:, j]))
    if present is None:
        return row
    return torch.where(present[:, j].view((-1,) + (1,) * (y.dim() - 1)) > 0, row, 0)


def _sum_slots(y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
               present: torch.Tensor | None = None, kernels: bool = False) -> torch.Tensor:
    """sum_j weight[n, j] * y[idx[n, j]] -> [N, ...], accumulated in fp32. ``kernels``: one Triton kernel
    (``kernels.combine.weighted_rows_sum``). Otherwise a loop over the s slots of a token (top-k + 1), not over
    memories; each step is one row gather (``index_select``: whole rows, several times faster on CUDA than
    advanced indexing, which addresses every element on its own). ``present``: see ``_slot_row`` (None: every
    token has all its slots)."""
    if kernels:
        from mom_wrap.kernels.combine import weighted_rows_sum
        return weighted_rows_sum(y.reshape(y.shape[0], -1), idx, weight, present).view(idx.shape[0], *y.shape[1:])
    shape = (-1,) + (1,) * (y.dim() - 1)
    total = _slot_row(y, idx, present, 0) * weight[:, 0].view(shape)
    for j in range(1, idx.shape[1]):
        total += _slot_row(y, idx, present, j) * weight[:, j].view(shape)
    return total.to(y.dtype)


def _kernels(t: torch.Tensor, dispatch: Dispatch) -> bool:
    """Whether the gathers' backward and the combine run mom_wrap's Triton kernels (``kernels.combine``): for
    the triton backend's plans on CUDA, outside torch.compile (which traces the PyTorch ops instead)."""
    return dispatch.kernels and t.is_cuda and not torch.compiler.is_compiling()


class _Gather(torch.autograd.Function):
    """x[token] whose backward sums each token's slots with row gathers (no atomic index_put)."""

    @staticmethod
    def forward(ctx, x, token, idx, present, padded, kernels):
        ctx.save_for_backward(idx, present)
        ctx.padded, ctx.kernels = padded, kernels
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        idx, present = ctx.saved_tensors
        return _sum_slots(grad, idx, present, present if ctx.padded else None, ctx.kernels), \
            None, None, None, None, None


class _Combine(torch.autograd.Function):
    """sum over a token's slots of weight * y[slot]; backward is a gather (dy) and a row dot (dweight)."""

    @staticmethod
    def forward(ctx, y, weight, idx, present, token, slot, padded, kernels):
        ctx.save_for_backward(y, weight, idx, present, token, slot)
        ctx.padded, ctx.kernels = padded, kernels
        return _sum_slots(y, idx, weight, present if padded else None, kernels)

    @staticmethod
    def backward(ctx, grad):
        y, weight, idx, present, token, slot = ctx.saved_tensors
        if ctx.kernels:  # one pass over the tokens: dy scattered to the slot rows, dweight as row dots
            from mom_wrap.kernels.combine import combine_backward
            dy, dweight = combine_backward(grad.reshape(grad.shape[0], -1), y.reshape(y.shape[0], -1), idx,
                                           weight, present if ctx.padded else None, ctx.needs_input_grad[1])
            return dy.view_as(y), dweight, None, None, None, None, None, None
        shape = (-1,) + (1,) * (y.dim() - 1)
        dy = (acc(grad.index_select(0, token)) * weight.reshape(-1)[slot].view(shape)).to(y.dtype)
        dweight = None
        if ctx.needs_input_grad[1]:
            g = acc(grad).flatten(1)
            rows = present if ctx.padded else None
            dweight = torch.stack([(g * _slot_row(y, idx, rows, j).flatten(1)).sum(1)
                                   for j in range(idx.shape[1])], 1)
            dweight = (dweight * present).to(weight.dtype)
        return dy, dweight, None, None, None, None, None, None


def gather(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """x [N, ...] per flat token -> [S, ...] per sorted slot."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no backward to prepare for
        return x.index_select(0, dispatch.token)
    return _Gather.apply(x, dispatch.token, *dispatch.slot_rows, dispatch.padded, _kernels(x, dispatch))


def combine(y: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """y [S, ...] per sorted slot -> [N, ...] per token: sum over the token's slots of weight * y.

    Row gathers through the inverse permutation (not an atomic scatter-add), so the sum is deterministic
    and accumulates in fp32; the backward is gathers too. Tokens without slots (padding) get zeros.
    """
    if y.shape[0] == 0:
        return y.new_zeros(dispatch.restore.shape[0], *y.shape[1:])
    if dispatch.token_major:  # a decode plan: slots are [N, s] in token order, one batched weighted sum
        N, s = dispatch.restore.shape
        ya = acc(y).view(N, s, -1)
        total = torch.bmm(dispatch.token_weight.to(ya.dtype).unsqueeze(1), ya)
        return total.view(N, *y.shape[1:]).to(y.dtype)
    return _Combine.apply(y, dispatch.token_weight, *dispatch.slot_rows, dispatch.token, dispatch.slot,
                          dispatch.padded, _kernels(y, dispatch))
