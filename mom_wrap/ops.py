"""Per-memory tensor ops on the sorted slot layout: grouped linear and segmented short convolution.

Both take one stacked weight for all memories and never loop over memories in Python.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
            a = torch.zeros(4, 8, device=x.device, dtype=x.dtype, requires_grad=True)
            b = torch.zeros(2, 8, 8, device=x.device, dtype=x.dtype, requires_grad=True)
            out = _grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([2, 4], device=x.device, dtype=torch.int32))
            out.backward(torch.ones_like(out))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, memory: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """Row r of x goes through the weight of memory[r].

    x [S, in] sorted by memory (memory-major), weight [E, out, in], memory [S], offsets [E] int32 (end of
    each memory's block) -> [S, out].
    One grouped GEMM where torch has one for this device and dtype; otherwise all memories' products for
    every row and a select: E times the FLOPs, still one kernel and exact, used for small test shapes
    and dtypes the grouped kernels lack.
    """
    if _grouped_mm_ok(x, weight):
        return _grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    E, out, _ = weight.shape
    y = (x @ weight.reshape(E * out, -1).t()).view(-1, E, out)
    return y.gather(1, memory.view(-1, 1, 1).expand(-1, 1, out)).squeeze(1)


def segment_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None,
                 position: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Depthwise causal short convolution that restarts at every segment, with a weight per memory.

    x [S, D]: rows of each segment contiguous and in time order; weight [E, D, W] (the host's
    ShortConvolution weight [D, 1, W] per memory, tap W-1 on the current token); bias [E, D] or None;
    memory [S] or None (None: E == 1); position [S]: row's position in its segment. Taps that would reach
    before the segment's start read zeros, so nothing leaks from one segment into the next.
    """
    W = weight.shape[-1]
    taps = weight.permute(2, 0, 1)  # [W, E, D]
    taps = taps[:, memory] if memory is not None else taps  # [W, S, D] or [W, 1, D]
    y = x * taps[W - 1]
    for j in range(1, W):  # the kernel width (4), not memories
        shifted = F.pad(x[:-j], (0, 0, j, 0)) if x.shape[0] > j else torch.zeros_like(x)
        y = y + torch.where((position >= j)[:, None], shifted, 0) * taps[W - 1 - j]
    if bias is not None:
        y = y + (bias[memory] if memory is not None else bias)
    if activation in ('silu', 'swish'):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation: unsupported short-conv activation {activation!r}")
    return y
