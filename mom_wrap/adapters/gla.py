"""Adapter for fla's ``GatedLinearAttention`` (GLA, ``fla.layers.gla``).

Write side per memory: k_proj, v_proj, the low-rank forget-gate projection gk_proj (two stages, the second
with its bias) and the k/v short convs when ``use_short_conv``.
Read side once per token: q_proj (+ q short conv), the query feature map, g_proj (output gate), the output
norm (``g_norm_swish_gate``, or ``g_norm`` and ``gate_fn``) and o_proj.
State per segment: [H, V, K] (fla's ``state_v_first=True`` layout, as the host caches it; H = num_heads,
the k/v heads already repeated over their query-head groups).

The host's forward, which this adapter follows step by step: q, k, v (after the short convs, SiLU inside
them; no activation without them), gk = gk_proj(x); k, v, gk repeated from num_kv_heads to num_heads;
gk = logsigmoid(gk) / gate_logit_normalizer, then clamp_min; feature_map on q and k; the recurrence
    S <- S * exp(gk_t) (per key channel);  S <- S + v_t k_t^T;  o_t = S (q_t / sqrt(K))
then the norm and output gate and o_proj.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import (fla_models, padded_segments, q_conv_shapes, q_projection, rms_norm,
                                          rms_norm_gated)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent up to this length, else its mode's kernel


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """fla's ``gelu`` (``fast_gelu_impl``): the tanh approximation, in the input's dtype."""
    return (x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))).to(x.dtype)


def _sqrelu(x: torch.Tensor) -> torch.Tensor:
    """fla's ``sqrelu``: relu(x)^2 computed in fp32."""
    r = F.relu(acc(x))
    return (r * r).to(x.dtype)


# PyTorch versions of the entries of fla's ACT2FN that can be a feature map or an output-gate function (the
# torch backend; the triton backend calls the host's own function). 'bias_gelu' is missing on purpose: it
# takes a bias as a second argument, so the host itself fails when it calls it with one.
TORCH_ACTIVATIONS = {
    'relu': F.relu,
    'sigmoid': torch.sigmoid,
    'logsigmoid': F.logsigmoid,
    'silu': F.silu,
    'swish': F.silu,
    'sqrelu': _sqrelu,
    'gelu': _gelu_tanh,
}


def _activation_name(fn, option: str) -> str:
    """The ACT2FN name of one of the host's activation functions (the host keeps the function, not its name)."""
    from fla.modules.activations import ACT2FN
    for name, f in ACT2FN.items():
        if f == fn and name in TORCH_ACTIVATIONS:
            return name
    known = [n for n, f in ACT2FN.items() if f == fn]
    raise ValueError(f"{option}: {known[0] if known else getattr(fn, '__name__', repr(fn))!r} is not supported "
                     f"by the MoM GLA adapter; supported: {', '.join(TORCH_ACTIVATIONS)}")


def gla_reference(q, k, v, gk, cu_seqlens, position, scale=None, initial_state=None, output_final_state=False):
    """Gated linear attention over packed segments, step by step in fp32: the oracle for fla's kernels.

    q, k, gk [S, H, K] (gk: the log forget gate, as fla's kernels take it); v [S, H, V]; cu_seqlens [G+1];
    position [S] (slot's position inside its segment); initial_state [G, H, V, K] or None. Per segment and
    head, with state S [V, K]:
        S <- S * exp(gk_t)[None, :];  S <- S + v_t k_t^T;  o_t = S (scale q_t)
    Returns o [S, H, V] (dtype of v) and the final states [G, H, V, K] fp32 (or None).
    """
    S, H, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    # padded steps have gk = 0, k = 0 and v = 0: they leave the state unchanged, so the final state is exact
    segment, (q, k, v, gk) = padded_segments(cu_seqlens, position, acc(q), acc(k), acc(v), acc(gk))
    L = q.shape[1]
    q = q * scale
    state = q.new_zeros(G, H, V, K) if initial_state is None else acc(initial_state).clone()
    out = q.new_zeros(G, L, H, V)
    for t in range(L):
        state = state * gk[:, t].exp()[:, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        out[:, t] = torch.einsum('ghvk,ghk->ghv', state, q[:, t])
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


@register_adapter
class GatedLinearAttentionAdapter(HostAdapter):
    """Every option of the host is supported (``mode='fused_chunk'`` runs ``chunk_gla``: fla's
    ``fused_chunk_gla`` only raises, pointing to ``chunk_gla``), except activations that are no function of
    one tensor (``feature_map`` / ``gate_fn`` ``'bias_gelu'``) or not fla's, and a replaced ``gk_proj``."""

    host_class = 'fla.layers.gla.GatedLinearAttention'
    write_modules = ('k_proj', 'v_proj', 'gk_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_host(cls):
        return cls.load_host_class()(hidden_size=64, num_heads=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        return fla_models('GLA', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                  'no_output_gate': dict(use_output_gate=False), 'short_conv': dict(use_short_conv=True)},
                          num_heads=2)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        gk = getattr(h, 'gk_proj', None)
        if not (isinstance(gk, nn.Sequential) and len(gk) == 2 and all(isinstance(m, nn.Linear) for m in gk)):
            raise ValueError("gk_proj: expected the host's low-rank gate projection Sequential(Linear(hidden, r), "
                             f"Linear(r, key_dim / groups)), got {gk!r}")
        self.feature_map = None if h.feature_map_fn is None else _activation_name(h.feature_map_fn, 'feature_map')
        # gate_fn is used only by the unfused norm of a gated layer (the fused norm applies swish itself)
        self.gate_fn = _activation_name(h.gate_fn, 'gate_fn') \
            if h.use_output_gate and not h.fuse_norm_and_gate else None

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                WriteProjection('v', h.v_proj, h.v_conv1d if conv else None),
                WriteProjection('gk', h.gk_proj[0], second=h.gk_proj[1], activation=None)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_v_dim, h.head_k_dim)

    def read_conv_shapes(self):
        return q_conv_shapes(self.host)

    def _activation(self, option: str, backend: str):
        """The function of ``option`` ('feature_map' or 'gate_fn'): the host's own on the triton backend,
        its PyTorch version on the torch backend."""
        if backend == 'torch':
            return TORCH_ACTIVATIONS[getattr(self, option)]
        return self.host.feature_map_fn if option == 'feature_map' else self.host.gate_fn

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (after the conv and the feature map: elementwise, so once per
        token here rather than per slot) and, for a gated layer, 'gate' [N, value_dim]."""
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows)
        if self.feature_map is not None:
            q = self._activation('feature_map', backend)(q)
        read = {'q': q.unflatten(-1, (h.num_heads, h.head_k_dim))}
        if h.use_output_gate:
            read['gate'] = h.g_proj(x)
        return read

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k', 'gk' [S, key_dim / groups], 'v' [S, value_dim / groups] per sorted slot.
        Returns o [S, H, V] and the final states [G, H, V, K] (or None)."""
        h = self.host
        Hkv, K, V = h.num_kv_heads, h.head_k_dim, h.head_v_dim
        q = gather(read['q'], dispatch)
        k = write['k'].unflatten(-1, (Hkv, K))
        v = write['v'].unflatten(-1, (Hkv, V))
        # the gate and the feature map are elementwise: applied before the head repeat, on fewer elements
        gk = F.logsigmoid(write['gk'].unflatten(-1, (Hkv, K))) / h.gate_logit_normalizer
        if h.clamp_min is not None:
            gk = torch.clamp_min(gk, h.clamp_min)
        if self.feature_map is not None:
            k = self._activation('feature_map', backend)(k)
        if h.num_kv_groups > 1:  # kv head j serves query heads j*groups .. j*groups + groups-1, as fla repeats
            k, gk, v = (t.repeat_interleave(h.num_kv_groups, dim=1) for t in (k, gk, v))
        if backend == 'torch':
            return gla_reference(q, k, v, gk, dispatch.cu_seqlens, dispatch.position, initial_state=initial_state,
                                 output_final_state=output_final_state)
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, state_v_first=True,
                      cu_seqlens=dispatch.cu_seqlens)
        # The host's own mode rule, on the longest segment: fused_recurrent up to 64 tokens (in training too:
        # unlike GatedDeltaNet, GLA's layer looks at the length only), else its mode's kernel, chunk_gla
        # ('fused_chunk' too: fla's fused_chunk_gla only raises, pointing to chunk_gla).
        if h.mode == 'fused_recurrent' or dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN:
            o, state = fused_recurrent_gla(q[None], k[None], v[None], gk=gk[None], **kwargs)
        else:
            # chunk_gla takes no chunk_indices, only cu_seqlens_cpu, from which it makes its own on the host.
            # fla 0.6.0 still syncs inside it all the same: its chunk_local_cumsum rebuilds chunk indices from
            # the device cu_seqlens (repeat_interleave) and chunk_fwd_h (chunk_bwd_dh in the backward) reads
            # the chunk count with .item(); nothing to pass that avoids it.
            o, state = chunk_gla(q[None], k[None], v[None], g=gk[None], cu_seqlens_cpu=dispatch.cu_seqlens_cpu,
                                 **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: the host's norm and output gate, then o_proj."""
        h = self.host
        if h.fuse_norm_and_gate:  # FusedRMSNormGated: rms_norm(o) * weight * swish(gate), per head
            norm, gate = h.g_norm_swish_gate, read['gate'].unflatten(-1, (-1, h.head_v_dim))
            if backend == 'torch':
                o = rms_norm_gated(o, gate, norm.weight, norm.bias, norm.eps, norm.activation)
            else:
                o = norm(o, gate)
            return h.o_proj(o.flatten(1))
        norm = h.g_norm  # RMSNorm per head, then gate_fn(g) over the flat value dim
        if backend == 'torch':
            o = rms_norm(o, norm.weight, norm.bias, norm.eps).to(o.dtype)
        else:
            o = norm(o)
        o = o.flatten(1)
        if h.use_output_gate:
            o = o * self._activation('gate_fn', backend)(read['gate'])
        return h.o_proj(o)
