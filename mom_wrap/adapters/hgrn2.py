"""Adapter for fla's ``HGRN2Attention`` (HGRN2, ``fla.layers.hgrn2``): a gated linear RNN with state expansion,
run on fla's GLA kernels with a key tied to its forget gate (k = 1 - f).

Write side per memory: f_proj (the forget gate, [hidden -> forget_dim]) and i_proj (the input, HGRN2's value,
[hidden -> hidden]), and their short convs f_conv1d / i_conv1d when ``use_short_conv`` (no activation in them).
From them, per slot: the log forget gate g = logsigmoid(f), raised to the layer's lower bound where it has one,
and the key k = 1 - exp(g): a memory's gate decides both how fast its state forgets and how much it writes.
Read side once per token: q_proj (+ q short conv) and SiLU; after the combine the RMS norm ``g_norm`` over the
whole value dim and o_proj (fla fuses the two: ``rms_norm_linear``).
State per segment: [H, V, K] (fla's GLA ``state_v_first=True`` layout, as the host caches it; H = num_heads,
K = expand_ratio, the forget / key dim per head, V = hidden_size / num_heads, the input dim per head).

The host's forward (fla 0.6.0), which this adapter follows step by step (shapes per token):
    q = swish(q_proj(x))  [H, K];  f = f_proj(x)  [H, K];  i = i_proj(x)  [H, V]   (after the convs, if any)
    g = logsigmoid(f);  after layer 0, with a lower bound lb: g = log(lb + (1 - lb) exp(g))   (logaddexp)
    k = 1 - exp(g);  S <- S * exp(g)[None, :];  S <- S + i k^T;  o = S (q / sqrt(K))          (S [V, K] per head)
    out = o_proj(rms_norm(o over [H * V]))   (eps 1e-5 whatever ``norm_eps`` says: fla's layer passes none)
The lower bound is the layer's forward argument ``lower_bound``: fla's ``HGRN2Model`` passes each layer its own
row of ``softmax(lower_bounds, 0).cumsum(0)`` minus the first ([hidden_size], the same for every token); layer 0
ignores it. The wrapper takes it as the host does (``host_inputs``), broadcast over the tokens, and gathers it
to the slots: its gradient reaches the model's ``lower_bounds`` as the host's does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import fla_models, q_projection, rms_norm
from mom_wrap.adapters.gla import gla_reference
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent up to this length, else its mode's kernel
MODES = ('chunk', 'fused_recurrent', 'fused_chunk')
# the eps of fla's rms_norm_linear, which the host calls without one (its g_norm.eps, norm_eps, is never read)
HOST_NORM_EPS = 1e-5


def lower_bounded_gate(f: torch.Tensor, lower_bound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """HGRN2's gate from the forget-gate projection f [..., F]: (the log forget gate g, the key k = 1 - exp(g)),
    both [..., F]. With ``lower_bound`` (broadcastable to f, values in [0, 1]) the forget gate lb + (1 - lb)
    sigmoid(f), in the log domain (logaddexp: no underflow where sigmoid(f) is tiny). dtypes as the host's: g in
    f's dtype promoted with the lower bound's, k in g's."""
    g = F.logsigmoid(f)
    if lower_bound is not None:
        g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
    return g, 1 - g.exp()


def _fla_swish(x: torch.Tensor) -> torch.Tensor:
    """fla's ``swish`` (the host's q activation, a Triton kernel): what the triton backend runs."""
    from fla.modules.activations import swish
    return swish(x)


@register_adapter
class HGRN2Adapter(HostAdapter):
    """Every option of fla 0.6.0's layer is supported: num_heads / expand_ratio, use_short_conv (conv_size,
    conv_bias), elementwise_affine, mode ('chunk', 'fused_recurrent', and 'fused_chunk', which runs ``chunk_gla``:
    fla's ``fused_chunk_gla`` only raises, so the host itself fails past 64 tokens in that mode), the forward's
    ``lower_bound``, and ``norm_eps``, which the layer ignores (so does the adapter). Refused (ValueError naming
    it): an unknown ``mode``, a lower bound not broadcastable to the layer's forget gate, and replaced projections."""

    host_class = 'fla.layers.hgrn2.HGRN2Attention'
    write_modules = ('f_proj', 'i_proj', 'f_conv1d', 'i_conv1d')
    silent_projection = 'i'  # i = 0 writes nothing (k = 1 - f does not vanish; the value does)

    @classmethod
    def example_host(cls):
        """HGRN2Attention(hidden_size=64, expand_ratio=32: 2 heads) as layer 1: a later layer, which applies the
        lower bound (``example_inputs``). Its g_norm weight (ones) redrawn from a fixed seed, to count."""
        host = cls.load_host_class()(hidden_size=64, expand_ratio=32, layer_idx=1)
        with torch.no_grad():
            w = host.g_norm.weight
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return host

    @classmethod
    def example_inputs(cls, x):
        """``lower_bound`` per token, [B, T, hidden] in (0, 1), a fixed function of x at each position (the host
        broadcasts it against its gate as it does the model's [hidden]; this one slices, pads and packs with x)."""
        return {'lower_bound': torch.sigmoid(2 * x.flip(-1))}

    @classmethod
    def example_models(cls):
        # config defaults unlike the layer's: norm_eps 1e-6 (the layer's norm ignores it), use_lower_bound=True
        return fla_models('HGRN2', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                    'heads=4_short_conv': dict(expand_ratio=16, use_short_conv=True),
                                    'no_lower_bound_no_affine': dict(use_lower_bound=False, elementwise_affine=False,
                                                                     num_heads=1, expand_ratio=None)},
                          expand_ratio=32)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        if h.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES} (the host's), got {h.mode!r}")
        for name, out in (('q_proj', h.forget_dim), ('f_proj', h.forget_dim), ('i_proj', h.input_dim)):
            m = getattr(h, name, None)
            if not (isinstance(m, nn.Linear) and m.in_features == h.hidden_size and m.out_features == out):
                raise ValueError(f"{name}: expected the host's Linear({h.hidden_size}, {out}), got {m!r}")

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('f', h.f_proj, h.f_conv1d if conv else None),
                WriteProjection('i', h.i_proj, h.i_conv1d if conv else None)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_i_dim, h.head_f_dim)

    def read_conv_shapes(self):
        h = self.host
        return {'q': (h.forget_dim, h.conv_size)} if h.use_short_conv else {}

    def host_inputs(self, kwargs, layout):
        """``lower_bound`` (the host's forward argument: None, or a floating tensor broadcastable to its gate
        [batch, seq_len, forget_dim]; fla's models pass [forget_dim]) -> {'lower_bound': [N, forget_dim]} (a view
        without copy where it is the same for every token), or {} where the host does not apply one: None, or
        layer 0."""
        lb, h = kwargs.get('lower_bound'), self.host
        if lb is None:
            return {}
        if not isinstance(lb, torch.Tensor):
            raise TypeError(f"lower_bound: expected a torch.Tensor or None, got {type(lb).__name__}")
        if not lb.is_floating_point():
            raise TypeError(f"lower_bound: expected a floating-point tensor, got {lb.dtype}")
        if h.layer_idx is None:  # (the host fails comparing None > 0)
            raise ValueError("lower_bound: the host applies it after layer 0 only, and this layer has no layer_idx")
        if h.layer_idx == 0:
            return {}
        shape = (layout.batch_size, layout.seq_len, h.forget_dim)
        try:
            ok = lb.dim() <= 3 and torch.broadcast_shapes(lb.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"lower_bound: expected a tensor broadcastable to {list(shape)} ([batch, seq_len, "
                             f"forget_dim]; fla's models pass [forget_dim]), got {list(lb.shape)}")
        return {'lower_bound': lb.expand(shape).reshape(-1, h.forget_dim)}

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (q_proj, its conv, SiLU: once per token)."""
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows)
        q = F.silu(acc(q)).to(q.dtype) if backend == 'torch' else _fla_swish(q)
        return {'q': q.unflatten(-1, (h.num_heads, h.head_f_dim))}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'f' [S, forget_dim], 'i' [S, hidden] per sorted slot; read: 'q' [N, H, K] and, after layer 0
        with a lower bound, 'lower_bound' [N, forget_dim]. Returns o [S, H, V] and the final states [G, H, V, K]
        (or None)."""
        h = self.host
        H, K, V = h.num_heads, h.head_f_dim, h.head_i_dim
        q = gather(read['q'], dispatch)
        lb = gather(read['lower_bound'], dispatch) if 'lower_bound' in read else None
        v = write['i'].unflatten(-1, (H, V))
        g, k = lower_bounded_gate(write['f'], lb)
        g, k = g.unflatten(-1, (H, K)), k.to(v.dtype).unflatten(-1, (H, K))
        if backend == 'torch':
            return gla_reference(q, k, v, g, dispatch.cu_seqlens, dispatch.position, initial_state=initial_state,
                                 output_final_state=output_final_state)
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, state_v_first=True,
                      cu_seqlens=dispatch.cu_seqlens)
        # The host's own rule, on the longest segment: fused_recurrent up to 64 tokens (in training too), else
        # chunk_gla (mode 'fused_chunk' too: fla's fused_chunk_gla only raises, pointing to chunk_gla).
        if h.mode == 'fused_recurrent' or dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN:
            o, state = fused_recurrent_gla(q[None], k[None], v[None], gk=g[None], **kwargs)
        else:
            o, state = chunk_gla(q[None], k[None], v[None], g=g[None], cu_seqlens_cpu=dispatch.cu_seqlens_cpu,
                                 **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: the RMS norm over the whole value dim (g_norm's weight and bias, eps 1e-5
        as the host has it), o_proj."""
        h = self.host
        norm = h.g_norm
        o = o.flatten(1)
        if backend == 'torch':
            return h.o_proj(rms_norm(o, norm.weight, norm.bias, HOST_NORM_EPS).to(o.dtype))
        from fla.modules.layernorm import rms_norm_linear
        return rms_norm_linear(o, norm.weight, norm.bias, h.o_proj.weight, h.o_proj.bias)
