"""The write side of every memory as stacked parameters, applied to the sorted slots without a Python
loop over memories.

The host's projections are stored side by side in one parameter ``weight`` ``[E, sum(out), in]``, the
operand of the one grouped GEMM as it is (no concatenation per forward, nothing cached that an in-place edit
could leave stale); ``proj[name]`` is the view ``[E, out, in]`` of projection ``name``. ``proj_bias[name]``
holds its bias when the host's linear has one and, when the host follows it with a short conv,
``conv[name]`` ``[E, D, W]`` (and ``conv_bias``) the conv. Index ``E - 1`` is the shared memory when there
is one.
Stacking keeps every memory's weights in parameters that receive a gradient on every step, even when a
memory gets no token.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mom_wrap.adapters.base import WriteProjection
from mom_wrap.dispatch import Dispatch, gather
from mom_wrap.ops import cached_conv, grouped_linear, segment_conv
from mom_wrap.pool import PoolRows


def _stack(module: nn.Module, attr: str, num: int, init: str) -> torch.Tensor:
    """The host module's parameter ``attr`` repeated ``num`` times, or ``num`` fresh initialisations
    made the way the module initialises itself (its own ``reset_parameters``)."""
    if init == 'copy':
        return getattr(module, attr).detach().clone().unsqueeze(0).repeat(num, *([1] * getattr(module, attr).dim()))
    fresh = []
    for _ in range(num):
        m = copy.deepcopy(module)
        m.reset_parameters()
        fresh.append(getattr(m, attr).detach())
    return torch.stack(fresh)


class MemoryBank(nn.Module):
    def __init__(self, projections: list[WriteProjection], num_memories: int, init: str):
        super().__init__()
        self.names = [p.name for p in projections]
        self.out_features = [p.linear.out_features for p in projections]
        self.weight = nn.Parameter(torch.cat([_stack(p.linear, 'weight', num_memories, init) for p in projections],
                                             dim=1))
        self.proj_bias = nn.ParameterDict()
        self.conv = nn.ParameterDict()
        self.conv_bias = nn.ParameterDict()
        self.conv_activation: dict[str, str | None] = {}
        for p in projections:
            if p.linear.bias is not None:
                self.proj_bias[p.name] = nn.Parameter(_stack(p.linear, 'bias', num_memories, init))
            if p.conv is not None:
                # ShortConvolution weight [D, 1, W] -> [E, D, W]
                self.conv[p.name] = nn.Parameter(_stack(p.conv, 'weight', num_memories, init).squeeze(2))
                if p.conv.bias is not None:
                    self.conv_bias[p.name] = nn.Parameter(_stack(p.conv, 'bias', num_memories, init))
                self.conv_activation[p.name] = getattr(p.conv, 'activation', None)

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """t [E, sum(out), ...] (``weight``, its gradient, an optimizer state) -> name -> [E, out, ...] views."""
        return dict(zip(self.names, t.split(self.out_features, dim=1)))

    @property
    def proj(self) -> dict[str, torch.Tensor]:
        """name -> the projection's weights [E, out, in], a view of ``weight`` (edits in place reach it)."""
        return self.split(self.weight)

    def conv_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (channels, width) of every per-memory short conv."""
        return {name: tuple(w.shape[1:]) for name, w in self.conv.items()}

    def forward(self, x: torch.Tensor, dispatch: Dispatch, backend: str = 'torch',
                conv_rows: dict[str, PoolRows] | None = None) -> dict[str, torch.Tensor]:
        """x [N, in] per flat token -> name -> [S, out] per sorted slot (projection, then segment conv).

        With ``conv_rows`` (name -> the cached conv states of ``dispatch``'s G segments, rows of the pool
        [N, E, D, W]) every segment's conv starts from its cached state and writes the new one back.
        """
        weight = self.weight
        if dispatch.token_major:  # a decode step: each token projected once for all its memories
            y = grouped_linear(x, weight, dispatch.memory)
        else:
            y = grouped_linear(gather(x, dispatch), weight, dispatch.memory, dispatch.memory_offsets,
                               dispatch.memory_offsets_cpu)
        if len(self.proj_bias):
            E = weight.shape[0]
            bias = torch.cat([self.proj_bias[n] if n in self.proj_bias else weight.new_zeros(E, f)
                              for n, f in zip(self.names, self.out_features)], dim=1)
            y = y + bias[dispatch.memory]
        out = {}
        for name, part in zip(self.names, y.split(self.out_features, dim=1)):  # a handful of named parts
            if name in self.conv:
                w, b, act = self.conv[name], self.conv_bias[name] if name in self.conv_bias else None, \
                    self.conv_activation[name]
                if conv_rows is None:
                    part = segment_conv(part, w, b, dispatch.memory, dispatch.position, act, backend)
                else:
                    part = cached_conv(part, conv_rows[name], w, b, act, backend, dispatch.segment_memory,
                                       None if dispatch.token_major else dispatch.cu_seqlens)
            out[name] = part
        return out
