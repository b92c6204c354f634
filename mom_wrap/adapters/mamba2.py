"""Adapter for mamba-ssm's ``Mamba2`` (the SSD layer; mamba-ssm is optional: without it this adapter is not
registered).

The host, per token (in_proj fused as [z0 | x0 | z | x | B | C | dt]; z0, x0 only when d_ssm < d_inner):
    x, B, C = silu(conv1d(x | B | C))                 depthwise causal conv of width d_conv, with its bias
    dt = softplus(dt + dt_bias), clamped to dt_limit;  A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T;  y_t = S_t C_t + D x_t     per head (S [headdim, d_state];
                                                                              B, C shared by a group's heads)
    y = rmsnorm(y * silu(z)) (grouped by ngroups; norm_before_gate: rmsnorm(y) * silu(z); no rmsnorm:
        y * silu(z));  with d_mlp: y = [silu(z0) * x0 | y];  out = out_proj(y)

Write side per memory: the x, B and dt rows of in_proj (and their bias when ``bias``) and the x and B
channels of conv1d (weight and bias): everything the state is written through. D's skip term uses each
memory's own x, so it is part of each memory's output.
Read side once per token: the z0, x0, z and C rows of in_proj (``mom_read_proj``), the C channels of conv1d
(``mom_c_conv``, cached as the read conv 'C'), A_log, dt_bias, D, the gated norm and out_proj. The wrapper
replaces the host's in_proj and conv1d by these two.
State per segment: [nheads, headdim, d_state] (mamba-ssm's ``ssm_state`` layout).

Kernels (triton backend): a forward without initial states (training, a plain or first forward) runs
mamba-ssm's own ``mamba_chunk_scan_combined`` on all segments at once, packed with ``seq_idx`` (the host's
kernel: its numerics); anything that starts from states (cached prefill, chunked prefill) runs our
``chunk_scalar_decay`` (``mom_wrap/kernels/scalar_decay.py``), as mamba-ssm's scan takes one initial state
per batch row, not per packed segment; a decode step (no autograd) runs ``scalar_decay_step``, which
updates the state pool's rows in place (``decode_in_place``).
Measured for plain forwards (``benchmarks/bench_scalar_decay.py``, one H100, bf16, 32 heads x 64, d_state 128,
the 49,152 slots of 8 x 2048 tokens at top-2 + shared, 2026-11-26): forward+backward mamba-ssm's scan with
``seq_idx`` 4.90 ms, ours 5.08 ms; forward alone 1.06 ms and 0.93 ms. The scan also takes dt's softplus, its
limit, dt x and the D skip inside, which ours leaves to PyTorch around it: so mamba-ssm's for plain forwards.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.calls import MambaConvention
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

READ_PROJ, C_CONV = 'mom_read_proj', 'mom_c_conv'  # the read side's modules, which replace in_proj / conv1d


def gated_rms_norm(y, z, weight, bias, eps: float, group_size: int | None, norm_before_gate: bool) -> torch.Tensor:
    """mamba-ssm's gated RMSNorm (``RMSNormGated``) of y [N, D] with the gate z [N, D], over groups of
    ``group_size`` channels (None: all D): rmsnorm(y) * w (+ b), times silu(z) after the norm or before it. In fp32 as
    its kernel computes, but fp64 stays fp64 (mamba-ssm's own ``rms_norm_ref`` takes the weight to fp32)."""
    y, z = acc(y), acc(z)
    if not norm_before_gate:
        y = y * F.silu(z)
    groups = y.unflatten(-1, (-1, group_size or y.shape[-1]))
    out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    out = out + bias if bias is not None else out
    return out * F.silu(z) if norm_before_gate else out


def _rows(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A new nn.Linear holding rows [start, stop) of ``linear`` (weight and bias)."""
    w = linear.weight
    out = nn.Linear(w.shape[1], stop - start, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w[start:stop])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[start:stop])
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


@register_adapter
class Mamba2Adapter(HostAdapter):
    host_class = 'mamba_ssm.modules.mamba2.Mamba2'
    write_modules = ('in_proj', 'conv1d')
    convention = MambaConvention
    silent_projection = 'x'  # init="preserve": x = silu(conv) = 0 makes v = dt x and D x zero

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        if getattr(h, 'process_group', None) is not None:
            raise ValueError("process_group: tensor-parallel Mamba2 is not supported; wrap the layer without one")
        if h.activation not in ('silu', 'swish'):
            raise ValueError(f"activation: Mamba2's conv activation must be silu, got {h.activation!r}")
        self.H, self.P, self.G, self.N = h.nheads, h.headdim, h.ngroups, h.d_state
        GN = self.G * self.N
        if hasattr(h, 'in_proj'):  # not yet wrapped: the fused layout
            self.d_mlp = (h.in_proj.out_features - 2 * h.d_ssm - 2 * GN - self.H) // 2
        else:
            self.d_mlp = (getattr(h, READ_PROJ).out_features - h.d_ssm - GN) // 2
        # in_proj rows: [z0 | x0 | z | x | B | C | dt]; conv1d channels: [x | B | C]
        z_end = 2 * self.d_mlp + h.d_ssm
        self.in_rows = {'x': (z_end, z_end + h.d_ssm), 'B': (z_end + h.d_ssm, z_end + h.d_ssm + GN),
                        'C': (z_end + h.d_ssm + GN, z_end + h.d_ssm + 2 * GN),
                        'dt': (z_end + h.d_ssm + 2 * GN, z_end + h.d_ssm + 2 * GN + self.H)}
        self.conv_channels = {'x': (0, h.d_ssm), 'B': (h.d_ssm, h.d_ssm + GN), 'C': (h.d_ssm + GN, h.d_ssm + 2 * GN)}

    @property
    def hidden_size(self) -> int:
        return self.host.d_model

    @classmethod
    def example_models(cls):
        """mamba-ssm's MambaLMHeadModel (2 Mamba2 layers, d_model 64), with its RMSNorms and with LayerNorms, and
        with 2 groups; D and the norms' weights redrawn (fixed seed)."""
        def make(rms_norm: bool, **ssm):
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
            config = MambaConfig(d_model=64, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8, rms_norm=rms_norm,
                                 fused_add_norm=False, residual_in_fp32=True,
                                 ssm_cfg=dict(layer='Mamba2', d_state=16, headdim=16, chunk_size=16,
                                              use_mem_eff_path=False, **ssm))
            model = MambaLMHeadModel(config)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in model.backbone.layers:
                    for p in (layer.mixer.D, layer.mixer.norm.weight):
                        p.add_(0.3 * torch.randn(p.shape, generator=g))
            return model.eval()
        return {'default': lambda: make(True), 'layer_norm': lambda: make(False), 'ngroups=2': lambda: make(True, ngroups=2)}

    @classmethod
    def example_host(cls):
        """Mamba2(d_model=64, d_state=16, headdim=16, chunk_size=16), layer 0, without the memory-efficient
        path (it needs the causal-conv1d CUDA package); D and the norm's weight (ones) redrawn (fixed seed)."""
        host = cls.load_host_class()(d_model=64, d_state=16, headdim=16, chunk_size=16, layer_idx=0,
                                     use_mem_eff_path=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (host.D, host.norm.weight):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return host

    def write_projections(self):
        h = self.host
        return [WriteProjection(n, _rows(h.in_proj, *self.in_rows[n]), _channels(h.conv1d, *self.conv_channels[n]))
                for n in ('x', 'B')] + [WriteProjection('dt', _rows(h.in_proj, *self.in_rows['dt']))]

    def detach_write_side(self):
        """Replace in_proj and conv1d by the read side's rows (z0, x0, z, C) and C channels."""
        h = self.host
        z_end = 2 * self.d_mlp + h.d_ssm
        read = _rows(h.in_proj, 0, z_end)
        c = _rows(h.in_proj, *self.in_rows['C'])
        with torch.no_grad():  # one projection for the read side: [z0 | x0 | z | C]
            proj = nn.Linear(read.in_features, z_end + c.out_features, bias=read.bias is not None,
                             device=read.weight.device, dtype=read.weight.dtype)
            proj.weight.copy_(torch.cat([read.weight, c.weight]))
            if read.bias is not None:
                proj.bias.copy_(torch.cat([read.bias, c.bias]))
        setattr(h, READ_PROJ, proj)
        setattr(h, C_CONV, _channels(h.conv1d, *self.conv_channels['C']))
        super().detach_write_side()

    def state_shape(self):
        return (self.H, self.P, self.N)

    def read_conv_shapes(self):
        return {'C': (self.G * self.N, self.host.d_conv)}

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> z0, x0 [N, d_mlp], z [N, d_ssm], C [N, ngroups * d_state] (after its conv)."""
        h = self.host
        conv = getattr(h, C_CONV)
        z0, x0, z, c = getattr(h, READ_PROJ)(x).split([self.d_mlp, self.d_mlp, h.d_ssm, self.G * self.N], -1)
        c = layout.conv(c, conv.weight, conv.bias, 'silu', backend, None if conv_rows is None else conv_rows['C'])
        return {'z0': z0, 'x0': x0, 'z': z, 'C': c}

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """The raw dt rows [S, H] -> softplus(dt + dt_bias), clamped to dt_limit, fp32."""
        h = self.host
        dt = F.softplus(acc(dt) + acc(h.dt_bias))
        lo, hi = h.dt_limit
        return dt.clamp(lo, hi) if (lo, hi) != (0.0, float('inf')) else dt

    def _slots(self, read, write, dispatch):
        """x [S, H, P], B and C [S, G, N], A [H] fp32 and D [H, P or 1] of the slots."""
        h = self.host
        H, P, G, N = self.H, self.P, self.G, self.N
        x = write['x'].unflatten(-1, (H, P))
        B = write['B'].unflatten(-1, (G, N))
        C = gather(read['C'], dispatch).unflatten(-1, (G, N))
        A = -torch.exp(acc(h.A_log))  # fp32 as the host computes it; fp64 stays fp64
        D = h.D.view(H, P) if h.D_has_hdim else h.D[:, None]
        return x, B, C, A, D

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
        """Per slot: k = B, q = C, v = dt x, g = dt A through the scan, plus D x (the memory's own x).
        Returns [S, H, headdim]."""
        h = self.host
        H, P = self.H, self.P
        x, B, C, A, D = self._slots(read, write, dispatch)
        if backend == 'triton' and initial_state is None and not output_final_state:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            seq_idx = ((dispatch.position == 0).cumsum(0) - 1).to(torch.int32)  # each slot's segment
            limit = {} if h.dt_limit == (0.0, float('inf')) else {'dt_limit': h.dt_limit}
            y = mamba_chunk_scan_combined(x[None], write['dt'][None], A, B[None], C[None], h.chunk_size,
                                          D=h.D.view(H, P) if h.D_has_hdim else h.D, dt_bias=h.dt_bias,
                                          dt_softplus=True, seq_idx=seq_idx[None], **limit)
            return y[0], None
        dt = self._dt(write['dt'])
        xf = acc(x)
        v, g = xf * dt[..., None], dt * A
        if backend == 'torch':
            from mom_wrap.kernels.scalar_decay import scalar_decay_reference
            o, state = scalar_decay_reference(acc(C), acc(B), v, g, dispatch.cu_seqlens,
                                              initial_state=initial_state, output_final_state=output_final_state)
        else:
            from mom_wrap.kernels.scalar_decay import chunk_scalar_decay
            o, state = chunk_scalar_decay(C, B, v.to(x.dtype), g, dispatch.cu_seqlens, dispatch.cu_seqlens_cpu,
                                          initial_state=initial_state, output_final_state=output_final_state)
        return (acc(o) + acc(D) * xf).to(x.dtype), state

    def finish(self, o, read, backend):
        """o [N, H, headdim] -> [N, hidden]: the gated norm (or the z gate), the gated MLP part, out_proj."""
        h = self.host
        y, z = o.flatten(1), read['z']
        if h.rmsnorm:
            if backend == 'torch':
                n = h.norm
                y = gated_rms_norm(y, z, n.weight, n.bias, n.eps, n.group_size, n.norm_before_gate).to(y.dtype)
            else:
                y = h.norm(y, z)
        else:
            y = (acc(y) * F.silu(acc(z))).to(y.dtype)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(read['z0']) * read['x0'], y], -1)
        return h.out_proj(y)
