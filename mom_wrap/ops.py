"""Per-memory tensor ops on the sorted slot layout: grouped linear and segmented short convolution.

Both take one stacked weight for all memories and never loop over memories in Python.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_wrap.pool import PoolRows

ACTIVATIONS = (None, 'silu', 'swish')


def acc(t: torch.Tensor) -> torch.Tensor:
    """t in its accumulation dtype: fp32, or fp64 for fp64 inputs (the exactness tests run in fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


_grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
# (device type, dtype) -> whether torch's grouped GEMM ran there; probed once, then remembered.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    # grouped GEMM kernels need 16-byte aligned rows in both operands.
    if (x.shape[1] * x.element_size()) % 16 or (weight.shape[1] * weight.element_size()) % 16:
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_WORKS:
        try:
            with torch.enable_grad():  # the first call may come inside no_grad (generation)
                a = torch.zeros(4, 8, device=x.device, dtype=x.dtype, requires_grad=True)
                b = torch.zeros(2, 8, 8, device=x.device, dtype=x.dtype, requires_grad=True)
                offs = torch.tensor([2, 4], device=x.device, dtype=torch.int32)
                out = _grouped_mm(a, b.transpose(1, 2), offs=offs)
                out.backward(torch.ones_like(out))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch's grouped GEMM backward
    rejects expanded (stride-0) gradients such as the one ``.sum().backward()`` sends."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, memory: torch.Tensor,
                   offsets: torch.Tensor | None) -> torch.Tensor:
    """Each row of x goes through the weights of its memories.

    x [R, in], weight [E, out, in], memory [R * j]: the j memories of each row (j = 1: one slot per row),
    offsets [E] int32 (end of each memory's block when j = 1 and rows are sorted memory-major, else None)
    -> [R * j, out], row r's j outputs consecutive.
    One grouped GEMM where torch has one for this device and dtype; otherwise all memories' products for
    every row and a select: E times the FLOPs but each weight read once, which is what a decode step wants
    (a few tokens, each projected once for all its memories), and exact for dtypes the grouped kernels lack.
    """
    if torch.is_autocast_enabled(x.device.type):  # as autocast treats F.linear: both in its dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if offsets is not None and _grouped_mm_ok(x, weight):
        return _ContiguousGrad.apply(_grouped_mm(x, weight.transpose(1, 2), offs=offsets))
    E, out, _ = weight.shape
    y = (x @ weight.reshape(E * out, -1).t()).view(-1, E, out)
    return y.gather(1, memory.view(x.shape[0], -1, 1).expand(-1, -1, out)).reshape(-1, out)


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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unsupported short-conv activation {activation!r}")
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unsupported short-conv activation {activation!r}")
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
