"""Per-memory tensor ops on the sorted slot layout: grouped linear and segmented short convolution.

Both take one stacked weight for all memories and never loop over memories in Python.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mom_wrap.pool import PoolRows

ACTIVATIONS = (None, 'silu', 'swish')


def check_activation(activation: str | None) -> None:
    """A short conv's activation: one of ACTIVATIONS, or a ValueError naming it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unsupported short-conv activation {activation!r}")


def acc(t: torch.Tensor) -> torch.Tensor:
    """t in its accumulation dtype: fp32, or fp64 for fp64 inputs (the exactness tests run in fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


_grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
# (device type, dtype) -> whether torch's grouped GEMM runs there, forward and backward, without a host sync;
# probed once, then remembered.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
# Rows up to which a token-major input (a decode step) is projected through every memory and then selected:
# below about the GPU's FLOP-to-byte ratio the E-fold product costs no more than reading the E weights once.
DENSE_MAX_ROWS = 256


def _aligned(t: torch.Tensor) -> bool:
    """t [R, C] dense along its rows, each row starting 16 bytes after a multiple of 16: what grouped GEMM
    kernels take."""
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1] and (t.stride(0) * t.element_size()) % 16 == 0


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM can run x [R, in] against weight [E, out, in], forward and backward.

    The real constraint, probed rather than assumed: the kernels want 16-byte aligned rows of both operands
    along the contraction (``in``); any output width ``out`` works, since the forward pads its output rows and
    ``_AlignedGrad`` pads the gradient's (torch's backward rejects unaligned ones). The probe also fails a
    grouped GEMM that would read its offsets back to the host (torch's loop fallback for some devices and
    dtypes does): that would be a second sync per forward, and our block fallback needs none.
    """
    if _grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch.compile traces grouped_mm through its meta kernel, which takes bf16 only
    if (x.shape[1] * x.element_size()) % 16 or not _aligned(x):  # weight [E, out, in]: rows of `in` too
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _probe_grouped_mm(x.device, x.dtype)
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    cuda = device.type == 'cuda'
    sync_mode = torch.cuda.get_sync_debug_mode() if cuda else None
    try:
        if cuda:  # a grouped GEMM that syncs raises here
            torch.cuda.set_sync_debug_mode('error')
        with torch.enable_grad():  # the first call may come inside no_grad (generation)
            a = torch.ones(4, 8, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, 6, 8, device=device, dtype=dtype, requires_grad=True)  # out = 6: unaligned rows
            offs = torch.arange(2, 5, 2, device=device, dtype=torch.int32)  # [2, 4], made on the device
            out = _AlignedGrad.apply(_grouped_mm(a, b.transpose(1, 2), offs=offs))
            out.backward(torch.ones(4, 6, device=device, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(sync_mode)


class _AlignedGrad(torch.autograd.Function):
    """Identity whose backward hands torch's grouped GEMM backward a gradient it accepts: dense, with
    16-byte aligned rows. Autograd's gradients are contiguous ``[R, out]`` (unaligned rows for an odd
    ``out``), or expanded with stride 0 after ``.sum().backward()``; both are copied into padded rows."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if _aligned(grad):
            return grad
        R, out = grad.shape
        align = 16 // grad.element_size()
        padded = grad.new_empty(R, out + (-out) % align)[:, :out]
        padded.copy_(grad)
        return padded


class _MemoryBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias, memory):
        ctx.save_for_backward(memory)
        ctx.dtypes, ctx.E = (y.dtype, bias.dtype), bias.shape[0]
        return y + bias.index_select(0, memory)

    @staticmethod
    def backward(ctx, grad):
        memory, = ctx.saved_tensors
        dbias = None
        if ctx.needs_input_grad[1]:  # one [E, S] x [S, out] GEMM, accumulated in fp32
            dbias = (F.one_hot(memory.long(), ctx.E).to(acc(grad).dtype).t() @ acc(grad)).to(ctx.dtypes[1])
        return grad.to(ctx.dtypes[0]), dbias, None


def add_memory_bias(y: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """y + bias[memory]: y [R, out], bias [E, out], memory [R].

    The bias gradient sums R rows onto E memories. Autograd's backward of ``bias[memory]`` is an index_put
    that sorts the R indices first: at 8 x 2048 tokens it took 16 ms of a 34 ms MoM(GLA) training step on
    an H100. Here it is one small GEMM with the one-hot of ``memory`` (no atomics, deterministic)."""
    return _MemoryBias.apply(y, bias, memory)


def zeros_in_graph(like: torch.Tensor, tensors) -> torch.Tensor:
    """Zeros shaped like ``like``, in the autograd graph of every tensor of ``tensors`` that requires grad
    (each then gets a zero gradient from a backward through them, as it would from real work)."""
    anchors = [t for t in tensors if t.requires_grad]
    if not torch.is_grad_enabled() or not anchors:
        return torch.zeros_like(like)
    zero = torch.stack([t.reshape(-1)[:0].sum().to(like.dtype) for t in anchors]).sum()
    return torch.zeros_like(like) + zero


def _select_rows(y: torch.Tensor, memory: torch.Tensor, rows: int) -> torch.Tensor:
    """y [R, E, out] (every memory's output for each row) -> [R * j, out]: row r's j memories."""
    out = y.shape[-1]
    return y.gather(1, memory.view(rows, -1, 1).expand(-1, -1, out)).reshape(-1, out)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, memory: torch.Tensor, ends: torch.Tensor | None = None,
                   ends_cpu: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Each row of x goes through the weights of its memories.

    x [R, in], weight [E, out, in], memory [R * j]: the j memories of each row (j = 1: one slot per row),
    -> [R * j, out], row r's j outputs consecutive.

    Memory-major rows (j = 1, sorted by memory; ``ends`` [E] int32 on x's device and ``ends_cpu`` [E] on the
    host, or a function returning it, called only where it is needed: the end of each memory's block): one
    grouped GEMM where torch has a sync-free one for this input; otherwise one product per memory block (E
    launches, no extra FLOPs). Rows in any order (``ends`` None: a decode step, a few tokens, each with its j
    memories): up to ``DENSE_MAX_ROWS`` rows, every memory's product for every row, then a select (E times the
    FLOPs, but each weight read once, which is what bounds a decode step); more rows are sorted by memory on the
    device (no host sync) for the grouped GEMM.
    """
    if torch.is_autocast_enabled(x.device.type):  # as autocast treats F.linear: both in its dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    rows = x.shape[0]
    if ends is None:
        if memory.numel() > DENSE_MAX_ROWS and _grouped_mm_ok(x, weight):
            return _sorted_grouped_linear(x, weight, memory, rows)
        E, out, _ = weight.shape
        return _select_rows((x @ weight.reshape(E * out, -1).t()).view(rows, E, out), memory, rows)
    if _grouped_mm_ok(x, weight):
        return _AlignedGrad.apply(_grouped_mm(x, weight.transpose(1, 2), offs=ends))
    if callable(ends_cpu):  # read only here: the grouped GEMM path never waits for the host copy
        ends_cpu = ends_cpu()
    if ends_cpu is None:
        raise ValueError("ends_cpu: the block fallback needs the memory blocks' ends on the host")
    bounds = [0] + ends_cpu.tolist()
    parts = [x[lo:hi] @ weight[e].t() for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def _sorted_grouped_linear(x: torch.Tensor, weight: torch.Tensor, memory: torch.Tensor, rows: int) -> torch.Tensor:
    """grouped_linear of rows in any order: sort the R * j slots by memory on the device, one grouped GEMM,
    and back to slot order. Sizes stay static and nothing is read back to the host."""
    E = weight.shape[0]
    order = torch.argsort(memory, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, memory, torch.ones_like(memory))
    ends = counts.cumsum(0).to(torch.int32)
    y = _AlignedGrad.apply(_grouped_mm(x.index_select(0, order // (memory.numel() // rows)), weight.transpose(1, 2),
                                       offs=ends))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    return y.index_select(0, inverse)


def _tap(weight: torch.Tensor, memory: torch.Tensor | None, j: int, start: int = 0) -> torch.Tensor:
    """fp32 tap j (0: the current token, j: j tokens back) for rows start: -> [S - start, D], or [1, D]
    (broadcast) when there is one memory."""
    tap = acc(weight[:, :, weight.shape[-1] - 1 - j])  # [E, D]
    return tap[memory[start:]] if memory is not None else tap


def _conv_pre(x, weight, bias, memory, position):
    """The convolution before its activation, accumulated in fp32: [S, D] fp32."""
    y = acc(x) * _tap(weight, memory, 0)
    for j in range(1, weight.shape[-1]):  # the kernel width (4), not memories
        # row r reads row r-j only inside its segment; rows r < j have position < j and read nothing
        y[j:] += torch.where((position[j:] >= j)[:, None], acc(x[:-j]), 0.0) * _tap(weight, memory, j, j)
    if bias is not None:
        y += acc(bias[memory] if memory is not None else bias)
    return y


class _SegmentConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, memory, position, activation):
        y = _conv_pre(x, weight, bias, memory, position)
        ctx.save_for_backward(x, weight, bias, memory, position)
        ctx.activation = activation
        return (F.silu(y) if activation else y).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, memory, position = ctx.saved_tensors
        dy = acc(grad)
        if ctx.activation:  # recompute the pre-activation rather than keep it: one more conv, S x D less memory
            y = _conv_pre(x, weight, bias, memory, position)
            sig = torch.sigmoid(y)
            dy = dy * sig * (1 + y * (1 - sig))
            del y, sig
        E, D, W = weight.shape
        # weight grads reduce rows per memory: a one-hot GEMM in fp32 (rows are sorted memory-major)
        onehot = F.one_hot(memory, E).to(dy.dtype).t() if memory is not None else None

        def per_memory_sum(t):
            return onehot @ t if onehot is not None else t.sum(0, keepdim=True)

        dx = dy * _tap(weight, memory, 0)
        dweight = torch.zeros(E, D, W, device=x.device, dtype=dy.dtype)
        dweight[:, :, W - 1] = per_memory_sum(dy * acc(x))
        for j in range(1, W):
            t = torch.where((position[j:] >= j)[:, None], dy[j:], 0.0)  # rows r >= j reading row r - j
            dx[:-j] += t * _tap(weight, memory, j, j)
            dweight[:, :, W - 1 - j] = per_memory_sum(F.pad(t * acc(x[:-j]), (0, 0, j, 0)))
        dbias = per_memory_sum(dy).view_as(bias) if bias is not None and ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype), \
            None, None, None


def segment_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None,
                 position: torch.Tensor, activation: str | None, backend: str = 'torch') -> torch.Tensor:
    """Depthwise causal short convolution that restarts at every segment, with a weight per memory.

    x [S, D]: rows of each segment contiguous and in time order; weight [E, D, W] (the host's
    ShortConvolution weight [D, 1, W] per memory, tap W-1 on the current token); bias [E, D] or None;
    memory [S] or None (None: E == 1); position [S]: row's position in its segment. Taps that would reach
    before the segment's start read zeros, so nothing leaks from one segment into the next.
    Accumulates in fp32. ``backend="torch"``: PyTorch ops (the reference; weight gradients reduced per
    memory by a one-hot GEMM); ``"triton"``: ``mom_wrap.kernels.segment_conv``.
    """
    check_activation(activation)
    if backend == 'triton':
        from mom_wrap.kernels.segment_conv import segment_conv_triton
        return segment_conv_triton(x, weight, bias, memory, position, activation is not None)
    return _SegmentConv.apply(x, weight, bias, memory, position, activation is not None)


def segment_conv_with_state(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            segment_memory: torch.Tensor | None, cu_seqlens: torch.Tensor, state: torch.Tensor,
                            activation: str | None, backend: str = 'torch') -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_conv`` that starts every segment from a carried conv state and returns the next one.

    x [S, D] (G segments, contiguous, time-ordered; a segment may be empty), cu_seqlens [G+1] on x's
    device, state [G, D, W]: the last W inputs before each segment, newest last (fla's conv-cache layout),
    segment_memory [G] or None. Returns y [S, D] and the new state [G, D, W].

    Each segment is extended in front by its W state rows and convolved by ``segment_conv``; sizes are
    static (S + G*W rows), so nothing is read back to the host and the step can be graph-captured.
    """
    S, (G, D, W) = x.shape[0], state.shape
    dev = x.device
    rows = torch.arange(S, device=dev)
    seg = torch.searchsorted(cu_seqlens[1:], rows, right=True)
    start = cu_seqlens[:-1] + W * torch.arange(G, device=dev)  # extended start of each segment
    hist_rows = (start[:, None] + torch.arange(W, device=dev)).reshape(-1)  # [G*W]
    x_rows = rows + W * (seg + 1)  # [S]
    # one gather builds the extended input: source rows are x, then the state rows
    source = torch.cat([x, state.transpose(1, 2).reshape(G * W, D).to(x.dtype)])
    src_of_ext = torch.empty(S + G * W, dtype=torch.long, device=dev)
    src_of_ext[x_rows] = rows
    src_of_ext[hist_rows] = S + torch.arange(G * W, device=dev)
    x_ext = source[src_of_ext]
    pos_ext = torch.empty_like(src_of_ext)
    pos_ext[x_rows] = rows - cu_seqlens[seg] + W
    pos_ext[hist_rows] = torch.arange(W, device=dev).repeat(G)
    mem_ext = None
    if segment_memory is not None:
        seg_ext = torch.empty_like(src_of_ext)
        seg_ext[x_rows] = seg
        seg_ext[hist_rows] = torch.arange(G, device=dev).repeat_interleave(W)
        mem_ext = segment_memory[seg_ext]
    y = segment_conv(x_ext, weight, bias, mem_ext, pos_ext, activation, backend)[x_rows]
    end = cu_seqlens[1:] + W * torch.arange(1, G + 1, device=dev)
    new_state = x_ext[(end[:, None] - W + torch.arange(W, device=dev)).reshape(-1)].view(G, W, D).transpose(1, 2)
    return y, new_state


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              memory: torch.Tensor | None, activation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_conv_with_state`` for segments of exactly one row (a decode step), in a few fused ops.

    x [G, D], state [G, D, W] (newest last), weight [E, D, W], bias [E, D] or None, memory [G] or None
    -> y [G, D], new state [G, D, W] (the state shifted by one, x appended).
    """
    window = torch.cat([state[:, :, 1:], x[:, :, None].to(state.dtype)], dim=-1)
    w = weight[memory] if memory is not None else weight
    y = (acc(window) * acc(w)).sum(-1)
    if bias is not None:
        y = y + acc(bias[memory] if memory is not None else bias)
    if activation in ('silu', 'swish'):
        y = F.silu(y)
    return y.to(x.dtype), window


def cached_conv(x: torch.Tensor, rows: PoolRows, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str | None, backend: str, segment_memory: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Short conv of G segments that each start from a cached conv state, the rows of a pool; the new
    states are written back through ``rows``.

    x [S, D]; rows: G rows of a [*, D, W] pool; weight [E, D, W]; segment_memory [G] or None (E == 1);
    cu_seqlens [G+1] (device), or None when every segment is one row (a decode step: S == G). A decode step
    without autograd on the triton backend is one kernel that updates the pool in place.
    """
    check_activation(activation)
    if cu_seqlens is None:
        if backend == 'triton' and not torch.is_grad_enabled():
            from mom_wrap.kernels.conv_step import conv_step_triton
            return conv_step_triton(x, rows.flat, rows.index, weight, bias, segment_memory, rows.valid,
                                    activation is not None)
        y, new_state = conv_step(x, rows.read(), weight, bias, segment_memory, activation)
    else:
        y, new_state = segment_conv_with_state(x, weight, bias, segment_memory, cu_seqlens, rows.read(), activation,
                                               backend)
    rows.write(new_state)
    return y
