"""The Mamba2 (SSD) layer's split into write side, read side and recurrence, shared by the adapters of its two
implementations: mamba-ssm's ``Mamba2`` (``adapters/mamba2.py``) and fla's port of it (``adapters/mamba2_fla.py``).
They compute the same thing and name their sizes differently; each adapter names its host's attributes
(``Mamba2Common.dims``) and adds its own calling convention, refusals, examples and kernels.

The layer, per token (in_proj fused as [z0 | x0 | z | x | B | C | dt]; z0, x0 only when d_ssm < d_inner, mamba-ssm's
``d_mlp``):
    x, B, C = silu(conv1d(x | B | C))                 depthwise causal conv of width W, with its bias
    dt = softplus(dt + dt_bias), clamped to dt_limit;  A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T;  y_t = S_t C_t + D x_t     per head (S [P, N]; B, C [G, N] shared
                                                                              by a group's heads)
    y = rmsnorm(y * silu(z)) (grouped by G; norm_before_gate: rmsnorm(y) * silu(z); no rmsnorm: y * silu(z));
    with d_mlp: y = [silu(z0) * x0 | y];  out = out_proj(y)

Write side per memory: the x, B and dt rows of in_proj (with their bias) and the x and B channels of conv1d (weight
and bias): everything the state is written through. D's skip term uses each memory's own x, so it is part of each
memory's output.
Read side once per token: the z0, x0, z and C rows of in_proj (``mom_read_proj``), the C channels of conv1d
(``mom_c_conv``, cached as the read conv 'C'), A_log, dt_bias, D, the gated norm and out_proj. The wrapper replaces
the host's in_proj and conv1d by these two.
State per segment: [H, P, N] (the layout both hosts cache).

Kernels (triton backend): our ``chunk_scalar_decay`` (``mom_wrap/kernels/scalar_decay.py``, per-segment initial and
final states) through ``chunk_ssd`` (``mom_wrap/kernels/ssd.py``: dt x, dt A and D x inside its autograd function)
and, for a decode step without autograd, ``scalar_decay_step`` on the state pool's rows in place
(``decode_in_place``); the host's own gated norm module. Torch backend: ``scalar_decay_reference`` and
``gated_rms_norm`` below, in fp32 as the hosts compute (fp64 stays fp64).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

READ_PROJ, C_CONV = 'mom_read_proj', 'mom_c_conv'  # the read side's modules, which replace in_proj / conv1d
SIZES = ('d_ssm', 'H', 'P', 'G', 'N', 'W')  # the sizes each adapter names its host's attributes of (dims)


def gated_rms_norm(y, z, weight, bias, eps: float, group_size: int | None, norm_before_gate: bool) -> torch.Tensor:
    """The gated RMSNorm of both hosts (``RMSNormGated``) of y [N, D] with the gate z [N, D], over groups of
    ``group_size`` channels (None: all D): rmsnorm(y) * w (+ b), times silu(z) after the norm or before it. In fp32 as
    their kernels compute, but fp64 stays fp64 (their ``rms_norm_ref`` take the weight to fp32)."""
    y, z = acc(y), acc(z)
    if not norm_before_gate:
        y = y * F.silu(z)
    groups = y.unflatten(-1, (-1, group_size or y.shape[-1]))
    out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    out = out + bias if bias is not None else out
    return out * F.silu(z) if norm_before_gate else out


def gate_or_norm(y: torch.Tensor, z: torch.Tensor, norm: nn.Module | None, backend: str) -> torch.Tensor:
    """The read side's last step of both Mamba families: y [N, D] through the host's gated RMSNorm module ``norm``
    with the gate z [N, D] (on the torch backend ``gated_rms_norm`` with the module's settings), or without a norm
    y * silu(z); in y's dtype."""
    if norm is None:
        return (acc(y) * F.silu(acc(z))).to(y.dtype)
    if backend == 'torch':
        return gated_rms_norm(y, z, norm.weight, norm.bias, norm.eps, norm.group_size,
                              norm.norm_before_gate).to(y.dtype)
    return norm(y, z)


def linear_rows(linear: nn.Linear, *ranges: tuple[int, int]) -> nn.Linear:
    """A new nn.Linear holding the rows [start, stop) of ``linear`` of each of ``ranges``, one after the other
    (weight and bias)."""
    w, b = linear.weight, linear.bias
    weight = torch.cat([w[start:stop] for start, stop in ranges])
    out = nn.Linear(w.shape[1], weight.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if b is not None:
            out.bias.copy_(torch.cat([b[start:stop] for start, stop in ranges]))
    return out


def _channels(conv: nn.Conv1d, start: int, stop: int) -> nn.Conv1d:
    """A new depthwise causal conv holding channels [start, stop) of ``conv``, its SiLU named on it."""
    w = conv.weight
    out = nn.Conv1d(stop - start, stop - start, w.shape[-1], groups=stop - start, padding=w.shape[-1] - 1,
                    bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w[start:stop])
        if conv.bias is not None:
            out.bias.copy_(conv.bias[start:stop])
    out.activation = 'silu'
    return out


class Mamba2Common(HostAdapter):
    """The Mamba2 algorithm over a host whose attributes ``dims`` names; not registered itself (no ``host_class``).

    Both hosts name alike: in_proj, conv1d, A_log, dt_bias, D, D_has_hdim, dt_limit, rmsnorm, norm (eps, group_size,
    norm_before_gate, weight, bias), out_proj and ``activation`` (the conv's)."""

    write_modules = ('in_proj', 'conv1d')
    silent_projection = 'x'  # init="preserve": x = silu(conv) = 0 makes v = dt x and D x zero
    # size -> the host's attribute: d_ssm (the scanned width, H * P), H heads of P channels, G groups of B and C of
    # N state channels each, W the conv's width
    dims: ClassVar[dict[str, str]]
    activation_option: ClassVar[str]  # the host constructor's argument that sets ``activation``

    def __init__(self, host: nn.Module):
        super().__init__(host)
        if host.activation not in ('silu', 'swish'):
            raise ValueError(f"{self.activation_option}: Mamba2's conv activation must be silu, got "
                             f"{host.activation!r}")
        self.d_ssm, self.H, self.P, self.G, self.N, self.W = (getattr(host, self.dims[s]) for s in SIZES)
        GN = self.G * self.N
        if hasattr(host, 'in_proj'):  # not yet wrapped: the fused layout
            self.d_mlp = (host.in_proj.out_features - 2 * self.d_ssm - 2 * GN - self.H) // 2
        else:
            self.d_mlp = (getattr(host, READ_PROJ).out_features - self.d_ssm - GN) // 2
        # in_proj rows: [z0 | x0 | z | x | B | C | dt]; conv1d channels: [x | B | C]
        x0 = 2 * self.d_mlp + self.d_ssm
        self.in_rows = {'x': (x0, x0 + self.d_ssm), 'B': (x0 + self.d_ssm, x0 + self.d_ssm + GN),
                        'C': (x0 + self.d_ssm + GN, x0 + self.d_ssm + 2 * GN),
                        'dt': (x0 + self.d_ssm + 2 * GN, x0 + self.d_ssm + 2 * GN + self.H)}
        self.conv_channels = {'x': (0, self.d_ssm), 'B': (self.d_ssm, self.d_ssm + GN),
                              'C': (self.d_ssm + GN, self.d_ssm + 2 * GN)}

    def write_projections(self):
        h = self.host
        return [WriteProjection(n, linear_rows(h.in_proj, self.in_rows[n]), _channels(h.conv1d, *self.conv_channels[n]))
                for n in ('x', 'B')] + [WriteProjection('dt', linear_rows(h.in_proj, self.in_rows['dt']))]

    def detach_write_side(self):
        """Replace in_proj and conv1d by the read side's rows (z0, x0, z, C) and C channels."""
        h = self.host  # one projection for the read side: [z0 | x0 | z | C]
        setattr(h, READ_PROJ, linear_rows(h.in_proj, (0, 2 * self.d_mlp + self.d_ssm), self.in_rows['C']))
        setattr(h, C_CONV, _channels(h.conv1d, *self.conv_channels['C']))
        super().detach_write_side()

    def state_shape(self):
        return (self.H, self.P, self.N)

    def read_conv_shapes(self):
        return {'C': (self.G * self.N, self.W)}

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> z0, x0 [N, d_mlp], z [N, d_ssm], C [N, G * N] (after its conv)."""
        h = self.host
        conv = getattr(h, C_CONV)
        z0, x0, z, c = getattr(h, READ_PROJ)(x).split([self.d_mlp, self.d_mlp, self.d_ssm, self.G * self.N], -1)
        c = layout.conv(c, conv.weight, conv.bias, 'silu', backend, None if conv_rows is None else conv_rows['C'])
        return {'z0': z0, 'x0': x0, 'z': z, 'C': c}

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """The raw dt rows [S, H] -> softplus(dt + dt_bias), clamped to dt_limit, at least fp32."""
        dt = F.softplus(acc(dt) + acc(self.host.dt_bias))
        lo, hi = self.host.dt_limit
        return dt.clamp(lo, hi) if (lo, hi) != (0.0, float('inf')) else dt

    def _slots(self, read, write, dispatch):
        """x [S, H, P], B and C [S, G, N], A [H] (at least fp32) and D [H, P or 1] of the slots."""
        h = self.host
        x = write['x'].unflatten(-1, (self.H, self.P))
        B = write['B'].unflatten(-1, (self.G, self.N))
        C = gather(read['C'], dispatch).unflatten(-1, (self.G, self.N))
        A = -torch.exp(acc(h.A_log))  # fp32 as the hosts compute it; fp64 stays fp64
        return x, B, C, A, self._skip()

    def _skip(self) -> torch.Tensor:
        """The skip weights [H, P] (``D_has_hdim``) or [H, 1]."""
        D = self.host.D
        return D.view(self.H, self.P) if self.host.D_has_hdim else D[:, None]

    def decode_in_place(self, read, write, dispatch, rows):
        """``scalar_decay_step`` on the pool's rows (fp32 pools; others take the wrapper's path)."""
        if rows.flat.dtype != torch.float32:
            return None
        from mom_wrap.kernels.scalar_decay import scalar_decay_step
        x, B, C, A, D = self._slots(read, write, dispatch)
        dt = self._dt(write['dt'])
        o = scalar_decay_step(C, B, (acc(x) * dt[..., None]).to(x.dtype), dt * A, rows.flat, rows.index, rows.valid)
        return (acc(o) + acc(D) * acc(x)).to(x.dtype)

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """Per slot: k = B, q = C, v = dt x, g = dt A through the scan, plus D x (the memory's own x): our
        ``chunk_ssd`` (triton: ``chunk_scalar_decay`` with these ends in its autograd function, which saves x rather
        than its fp32 copy and v) or the reference in PyTorch ops (torch). Returns [S, H, P] and the final states
        [G, H, P, N] when asked."""
        x, B, C, A, D = self._slots(read, write, dispatch)
        dt = self._dt(write['dt'])
        if backend == 'torch':
            from mom_wrap.kernels.scalar_decay import scalar_decay_reference
            xf = acc(x)
            o, state = scalar_decay_reference(acc(C), acc(B), xf * dt[..., None], dt * A, dispatch.cu_seqlens,
                                              initial_state=initial_state, output_final_state=output_final_state)
            return (acc(o) + acc(D) * xf).to(x.dtype), state
        from mom_wrap.kernels.ssd import chunk_ssd
        return chunk_ssd(C, B, x, dt, A, D, dispatch.cu_seqlens, dispatch.cu_seqlens_cpu, initial_state=initial_state,
                         output_final_state=output_final_state)

    def finish(self, o, read, backend):
        """o [N, H, P] -> [N, hidden]: the gated norm (or the z gate), the gated MLP part, out_proj."""
        h = self.host
        y = gate_or_norm(o.flatten(1), read['z'], h.norm if h.rmsnorm else None, backend)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(read['z0']) * read['x0'], y], -1)
        return h.out_proj(y)
