"""The write side of every memory as stacked parameters, applied to the sorted slots without a Python
loop over memories.

For each host projection ``name`` the bank holds ``proj[name]`` ``[E, out, in]`` (and ``proj_bias`` when
the host's linear has a bias) and, when the host follows it with a short conv, ``conv[name]``
``[E, D, W]`` (and ``conv_bias``). Index ``E - 1`` is the shared memory when there is one.
Stacking keeps every memory's weights in parameters that receive a gradient on every step, even when a
memory gets no token.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mom_wrap.adapters.base import WriteProjection
from mom_wrap.dispatch import Dispatch, gather
from mom_wrap.ops import conv_step, grouped_linear, segment_conv, segment_conv_with_state


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
        self.proj = nn.ParameterDict()
        self.proj_bias = nn.ParameterDict()
        self.conv = nn.ParameterDict()
        self.conv_bias = nn.ParameterDict()
        self.conv_activation: dict[str, str | None] = {}
        for p in projections:
            self.proj[p.name] = nn.Parameter(_stack(p.linear, 'weight', num_memories, init))
            if p.linear.bias is not None:
                self.proj_bias[p.name] = nn.Parameter(_stack(p.linear, 'bias', num_memories, init))
            if p.conv is not None:
                # ShortConvolution weight [D, 1, W] -> [E, D, W]
                self.conv[p.name] = nn.Parameter(_stack(p.conv, 'weight', num_memories, init).squeeze(2))
                if p.conv.bias is not None:
                    self.conv_bias[p.name] = nn.Parameter(_stack(p.conv, 'bias', num_memories, init))
                self.conv_activation[p.name] = getattr(p.conv, 'activation', None)

    def _fused_weight(self) -> torch.Tensor:
        """All projections' weights as one [E, sum(out), in] tensor for the one grouped GEMM.

        Without autograd (inference, decode) the concatenation is kept until a weight changes (its storage
        or its in-place version counter, which optimizer steps and load_state_dict bump): a decode step then
        reads the weights once instead of copying them first."""
        weights = [self.proj[n] for n in self.names]
        if torch.is_grad_enabled():
            return torch.cat(weights, dim=1)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        if getattr(self, '_fused_key', None) != key:
            self._fused, self._fused_key = torch.cat(weights, dim=1), key
        return self._fused

    def conv_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (channels, width) of every per-memory short conv."""
        return {name: tuple(w.shape[1:]) for name, w in self.conv.items()}

    def forward(self, x: torch.Tensor, dispatch: Dispatch, backend: str = 'torch',
                conv_state: dict[str, torch.Tensor] | None = None):
        """x [N, in] per flat token -> name -> [S, out] per sorted slot (projection, then segment conv).

        With ``conv_state`` (name -> [G, D, W], one per segment of ``dispatch``) every segment's conv starts
        from it, and the new per-segment conv states come back as a second dict (else None).
        """
        xs = gather(x, dispatch)
        weight = self._fused_weight()
        y = grouped_linear(xs, weight, dispatch.memory, dispatch.memory_offsets)
        if len(self.proj_bias):
            E = weight.shape[0]
            bias = torch.cat([self.proj_bias[n] if n in self.proj_bias else weight.new_zeros(E, f)
                              for n, f in zip(self.names, self.out_features)], dim=1)
            y = y + bias[dispatch.memory]
        out, new_state = {}, ({} if conv_state is not None else None)
        for name, part in zip(self.names, y.split(self.out_features, dim=1)):  # a handful of named parts
            if name in self.conv:
                w, b, act = self.conv[name], self.conv_bias[name] if name in self.conv_bias else None, \
                    self.conv_activation[name]
                if conv_state is None:
                    part = segment_conv(part, w, b, dispatch.memory, dispatch.position, act, backend)
                elif dispatch.num_segments == dispatch.num_slots:  # one row per segment: a decode step
                    part, new_state[name] = conv_step(part, conv_state[name], w, b, dispatch.segment_memory, act)
                else:
                    part, new_state[name] = segment_conv_with_state(
                        part, w, b, dispatch.segment_memory, dispatch.cu_seqlens, conv_state[name], act, backend)
            out[name] = part
        return out, new_state
