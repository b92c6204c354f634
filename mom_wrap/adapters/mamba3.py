"""Adapter for mamba-ssm's ``Mamba3`` (SISO; mamba-ssm is optional: without it this adapter's host does not load), and
the algorithm it shares with fla's port of the layer (``Mamba3Common``; fla's adapter: ``adapters/mamba3_fla.py``).

The layer, per token (in_proj, no bias, fused as [z | x | B | C | dd_dt | dd_A | trap | angles]; H heads of P
channels, state [P, N], G groups of B and C, A rotary angles):
    B, C = RMSNorm(B), RMSNorm(C) per group;  k_t = B_t + B_bias,  q_t = C_t + C_bias           (per head)
    dt_t = softplus(dd_dt + dt_bias);  a_t = dt_t * min(-softplus(dd_A), -A_floor);  lam_t = sigmoid(trap)
    theta_t = theta_{t-1} + pi tanh(angles_t) dt_t;  k~_t, q~_t = k_t, q_t with pairs (2i, 2i + 1), i < A, rotated
    S_t = exp(a_t) (S_{t-1} + dt_t (1 - lam_t) v_{t-1} k~_{t-1}^T) + dt_t lam_t v_t k~_t^T   (trapezoidal; v = x)
    y_t = S_t q~_t + D v_t;  y = y * silu(z), or with is_outproj_norm RMSNormGated(y, z) per head;  out_proj(y)

Write side per memory: the x, B, dd_dt, dd_A, trap and angle rows of in_proj: everything the state and its rotation
are written through, so each memory keeps its own clock (theta counts its own tokens' dt and angles) and its own
trapezoid (the previous token of a memory is the previous token routed to it). B's norm, B_bias, dt_bias, A_floor and
D are the host's, shared. Read side once per token: the z and C rows (``mom_read_proj``), C's norm; C_bias, the
output norm or gate and out_proj. C is rotated per slot, by the memory's theta, inside the recurrence.
State per segment: the host's four states, (S [H, P, N], k~_last [H, N], v_last [H, P], theta [H, A]), packed along
one axis per head: [H, P * N + N + P + A] (``pack_states`` / ``unpack_states``); zeros are a fresh sequence.

Kernels (triton backend): the host's ``mamba3_siso_combined`` over all segments at once (cu_seqlens, per-segment
input states and final states, gradients through both: the host's own numerics, q, k, v, trap and angles in bf16).
A decode step runs it on one-token segments from the pool's states (mamba-ssm's own step needs CuTe). Torch backend:
``mamba3_reference``, the trapezoid rewritten as one scalar-decay scan (``scalar_decay_reference``), checked against
a step-by-step loop and the host's kernel in tests/test_host_mamba3.py. MIMO (its kernels are TileLang only) is
refused.
"""
from __future__ import annotations

import importlib
import itertools
import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.fla_common import rms_norm
from mom_wrap.adapters.mamba2_common import gate_or_norm, linear_rows
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.calls import Mamba3Convention
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

READ_PROJ = 'mom_read_proj'  # the read side's rows of in_proj ([z | C]), which replaces in_proj
WRITE = ('x', 'B', 'dt', 'A', 'trap', 'angles')  # in_proj's rows after z, C excepted, in the host's order


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x [..., N] with the pairs (2i, 2i + 1), i < A, rotated by theta [..., A]; the other channels as they are."""
    A = theta.shape[-1]
    pairs = x[..., :2 * A].unflatten(-1, (A, 2))
    c, s = theta.cos(), theta.sin()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.cat([torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2), x[..., 2 * A:]], -1)


def pack_states(S, k, v, theta) -> torch.Tensor:
    """The four states (S [G, H, P, N], k~ [G, H, N], v [G, H, P], theta [G, H, A]) -> [G, H, P * N + N + P + A]."""
    return torch.cat([S.flatten(-2), k, v, theta.to(S.dtype)], -1)


def unpack_states(state: torch.Tensor, P: int, N: int):
    """``pack_states``' inverse: (S, k~, v, theta), views of ``state``."""
    S, k, v, theta = state.split([P * N, N, P, state.shape[-1] - P * N - N - P], -1)
    return S.unflatten(-1, (P, N)), k, v, theta


def mamba3_reference(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, cu_seqlens, initial_state=None,
                     output_final_state=False):
    """The SISO recurrence over packed segments, in fp32 (fp64 stays fp64), differentiable by autograd.

    q, k [S, G, N] (normed, before bias and rotation); v [S, H, P]; adt, dt, trap [S, H] (a dt, dt, trap's logit);
    q_bias, k_bias [H, N]; angles [S, H, A] (raw); D [H]; cu_seqlens [G_seg + 1]; initial_state: the packed states
    [G_seg, H, P * N + N + P + A] or None (zeros). Returns y [S, H, P] (dtype of v) and the packed final states.

    With beta_t = dt_t (1 - lam_t), gamma_t = dt_t lam_t and beta_{t+1} = 0 past a segment's end, the state
    S'_t = S_t + beta_{t+1} v_t k~_t^T obeys one scalar-decay scan, S'_t = exp(a_t) S'_{t-1} + (gamma_t +
    beta_{t+1}) v_t k~_t^T, from S'_0 = S_in + beta_1 v_in k~_in^T; and y_t = S'_t q~_t - beta_{t+1} (k~_t . q~_t) v_t.
    """
    from mom_wrap.kernels.scalar_decay import scalar_decay_reference
    H, P = v.shape[1:]
    N = q.shape[-1]
    lengths = cu_seqlens.diff()
    G_seg = lengths.numel()
    segment = torch.repeat_interleave(torch.arange(G_seg, device=q.device), lengths)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long() - 1
    out_dtype, dtype = v.dtype, acc(v).dtype
    q, k, v = acc(q).repeat_interleave(H // q.shape[1], 1), acc(k).repeat_interleave(H // k.shape[1], 1), acc(v)
    adt, dt, lam = acc(adt), acc(dt), torch.sigmoid(acc(trap))
    if initial_state is None:
        state = q.new_zeros(G_seg, H, P * N + N + P + angles.shape[-1])
    else:
        state = initial_state.to(dtype)
    S_in, k_in, v_in, theta_in = unpack_states(state, P, N)
    # theta: each segment's running sum from its initial angle, summed in fp64 (a long packed cumsum cancels in fp32)
    step = (math.pi * torch.tanh(acc(angles)) * dt[..., None]).double()
    total = step.cumsum(0)
    theta = (total - (total[starts] - step[starts])[segment] + theta_in.double()[segment]).to(dtype)
    q, k = rotate(q + acc(q_bias), theta), rotate(k + acc(k_bias), theta)
    beta, gamma = dt * (1 - lam), dt * lam
    beta_next = torch.cat([beta[1:], beta.new_zeros(1, H)])
    beta_next[ends] = 0
    S0 = S_in + beta[starts][..., None, None] * v_in[..., :, None] * k_in[..., None, :]
    o, S_out = scalar_decay_reference(q, k * (gamma + beta_next)[..., None], v, adt, cu_seqlens, initial_state=S0,
                                      output_final_state=output_final_state)
    y = o - (beta_next * (k * q).sum(-1))[..., None] * v + acc(D)[:, None] * v
    if not output_final_state:
        return y.to(out_dtype), None
    # theta mod 2 pi, as the host's kernel keeps it (the states then compare between the backends)
    return y.to(out_dtype), pack_states(S_out, k[ends], v[ends], torch.remainder(theta[ends], 2 * math.pi))


class Mamba3Common(HostAdapter):
    """The Mamba3 algorithm over a host whose attributes ``dims`` names; not registered itself (no ``host_class``):
    mamba-ssm's layer (``Mamba3Adapter``, below) and fla's port of it (``adapters/mamba3_fla.py``) compute the same
    thing and name their sizes differently. Both name alike: in_proj (fla: with ``use_bias``, a bias), is_mimo,
    num_rope_angles, A_floor, chunk_size, dt_bias, B_bias, C_bias, B_norm, C_norm, D, is_outproj_norm, norm and
    out_proj."""

    write_modules = ('in_proj',)
    silent_projection = 'x'  # init="preserve": v = x = 0 writes nothing, and D x is zero
    # size -> the host's attribute: H heads of P channels, state [P, N], G groups of B and C, d_inner = H P, and the
    # layer's input width
    dims: ClassVar[dict[str, str]]

    def __init__(self, host: nn.Module):
        super().__init__(host)
        if host.is_mimo:
            raise ValueError("is_mimo: Mamba3's MIMO form is not supported (its kernels are TileLang's only); wrap a "
                             "SISO layer (is_mimo=False)")
        self.H, self.P, self.N, self.G, self.d_inner = (getattr(host, self.dims[s]) for s in ('H', 'P', 'N', 'G',
                                                                                              'd_inner'))
        self.A = host.num_rope_angles
        sizes = dict(z=self.d_inner, x=self.d_inner, B=self.G * self.N, C=self.G * self.N, dt=self.H, A=self.H,
                     trap=self.H, angles=self.A)
        offsets = [0, *itertools.accumulate(sizes.values())]  # (plain ints: models are built on the meta device)
        self.in_rows = {name: (offsets[i], offsets[i + 1]) for i, name in enumerate(sizes)}

    @classmethod
    def host_kernel_rounding(cls, device: torch.device, dtype: torch.dtype) -> float:
        """On CUDA ``mamba3_siso_combined`` casts q, k, v, z, trap and angles to bf16 and keeps its chunk states in
        bf16 (and takes PTX approximations of cos, sin, tanh): bf16's rounding (measured on an H100: 3-5e-3 from the
        fp32 reference, 8e-3 on the B norm's weight gradient). On the CPU ``interpret_on_cpu`` drops the casts."""
        return 2e-2 if device.type == 'cuda' and dtype != torch.bfloat16 else 0.0

    @property
    def hidden_size(self) -> int:
        return getattr(self.host, self.dims['hidden'])

    @staticmethod
    def redrawn(host: nn.Module) -> nn.Module:
        """``host`` with the parameters it initialises to a constant (D, B_bias, C_bias, the B and C norms' weights)
        moved off it (fixed seed): at a constant, a check could not see them. For the examples."""
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (host.D, host.B_bias, host.C_bias, host.B_norm.weight, host.C_norm.weight):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return host

    def write_projections(self):
        return [WriteProjection(n, linear_rows(self.host.in_proj, self.in_rows[n])) for n in WRITE]

    def detach_write_side(self):
        """Replace in_proj by the read side's rows: [z | C]."""
        h = self.host
        setattr(h, READ_PROJ, linear_rows(h.in_proj, self.in_rows['z'], self.in_rows['C']))
        super().detach_write_side()

    def state_shape(self):
        return (self.H, self.P * self.N + self.N + self.P + self.A)

    def read_conv_shapes(self):
        return {}

    def _norm(self, t: torch.Tensor, norm: nn.Module, backend: str) -> torch.Tensor:
        """B or C [R, G * N] -> RMSNorm per group with the host's norm, [R, G, N] (torch: at least fp32)."""
        t = t.unflatten(-1, (self.G, self.N))
        return norm(t) if backend != 'torch' else rms_norm(t, norm.weight, norm.bias, norm.eps)

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> z [N, d_inner] and C [N, G, N] (normed, before its bias)."""
        h = self.host
        z, c = getattr(h, READ_PROJ)(x).split([self.d_inner, self.G * self.N], -1)
        return {'z': z, 'C': self._norm(c, h.C_norm, backend)}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """Per slot: v = x, k = B (normed), q = the token's C, and the memory's dt, a dt, trap and angles, through
        the host's kernel (triton) or ``mamba3_reference`` (torch). Returns [S, H, P] and, when asked, the packed
        final states [G, H, P * N + N + P + A]."""
        h = self.host
        x = write['x'].unflatten(-1, (self.H, self.P))
        B = self._norm(write['B'], h.B_norm, backend)
        C = gather(read['C'], dispatch)
        dt = F.softplus(acc(write['dt']) + acc(h.dt_bias))  # [S, H]
        adt = (-F.softplus(acc(write['A']))).clamp(max=-h.A_floor) * dt
        angles = write['angles'][:, None, :].expand(-1, self.H, -1)
        q_bias, k_bias = h.C_bias[:, 0], h.B_bias[:, 0]
        if backend == 'torch':
            return mamba3_reference(C, B, x, adt, dt, write['trap'], q_bias, k_bias, angles, h.D,
                                    dispatch.cu_seqlens, initial_state, output_final_state)
        # looked up at each call: on the CPU, mom_wrap.interpret_on_cpu swaps in the interpreter's version
        try:
            kernel = importlib.import_module('mamba_ssm.ops.triton.mamba3.mamba3_siso_combined').mamba3_siso_combined
        except ImportError as e:  # (fla's Mamba3 without mamba-ssm: its own layer has no kernel either)
            raise ImportError("backend: Mamba3's triton backend runs mamba-ssm's kernels (mamba3_siso_combined): "
                              "install mamba-ssm (pip install \"mom_wrap[mamba]\"), or use backend='torch'") from e
        states = None
        if initial_state is not None:
            S, k, v, theta = unpack_states(initial_state, self.P, self.N)
            states = (theta.contiguous(), S.contiguous(), k.contiguous(), v.contiguous())
        out = kernel(C[None], B[None], x[None], adt.T[None], dt.T[None], write['trap'].T[None],
                     q_bias, k_bias, acc(angles)[None], D=h.D, Z=None, Input_States=states, chunk_size=h.chunk_size,
                     return_final_states=output_final_state, cu_seqlens=dispatch.cu_seqlens)
        if not output_final_state:
            return out[0].to(x.dtype), None
        y, theta, S, k, v = out
        return y[0].to(x.dtype), pack_states(S.float(), k.float(), v.float(), theta.float())

    def finish(self, o, read, backend):
        """o [N, H, P] -> [N, hidden]: the gate silu(z) or the per-head gated norm, then out_proj."""
        h = self.host
        return h.out_proj(gate_or_norm(o.flatten(1), read['z'], h.norm if h.is_outproj_norm else None, backend))


@register_adapter
class Mamba3Adapter(Mamba3Common):
    host_class = 'mamba_ssm.modules.mamba3.Mamba3'
    convention = Mamba3Convention
    dims = dict(H='nheads', P='headdim', N='d_state', G='num_bc_heads', d_inner='d_inner', hidden='d_model')

    @classmethod
    def example_host(cls):
        """Mamba3(d_model=64, d_state=16, headdim=16, chunk_size=16), layer 0: 8 heads, 4 rotary angles; its constant
        parameters redrawn (``redrawn``)."""
        return cls.redrawn(cls.load_host_class()(d_model=64, d_state=16, headdim=16, chunk_size=16, layer_idx=0))
