"""Adapter for fla's ``GatedSlotAttention`` (GSA, ``fla.layers.gsa``).

Write side per memory: k_proj, v_proj, the forget-gate projection f_proj, and the k/v short convs when
``use_short_conv``: what a memory writes into its slots (the slot weights s = 1 - exp(f) and the decay come
from f).
Read side once per token: q_proj (+ q short conv) and the query feature map, then after the combine SiLU, the
RMS norm ``g_norm`` over the whole value dim and o_proj (fla fuses the two: ``rms_norm_linear``). The host
shares its feature map between q and k: a ``t2r`` map (a Linear of its own) stays on the host, one module read
by every memory's k and by q.

GSA reads through its memory's own state: the query scores the memory's slots (``q . K_m``), a softmax over the
slots turns the scores into read weights, and those read the slots' values. That softmax is per memory, so
the recurrence computes every memory's per-slot output on its own segment, and only those outputs are mixed
with the routing weights (then SiLU, norm, o_proj), as for every host.

State per segment: [H, M, K + V] (H = num_heads, the k/v heads already repeated over their query-head groups;
M = num_slots): row m holds slot m's key memory (``K_m``, fla's ``hk[:, m]``) and its value memory (``V_m``,
fla's ``hv[m]``). Both halves of a row decay with that slot's forget gate and take the same slot weight, so the
whole state updates as one tensor. fla keeps a pair (hk [H, K, M], hv [H, M, V]); ``to_fla_state`` and
``from_fla_state`` convert.

The host's forward (fla 0.6.0), which this adapter follows step by step: q, k, v after the short convs (SiLU
inside them) or plain projections; f = f_proj(x); q, k through the feature map (per head); v = SiLU(v);
f = logsigmoid(f) / gate_logit_normalizer; s = 1 - exp(f); k, v, f, s repeated from num_kv_heads to num_heads;
then per head, slot m (scale: the host's ``scale``, default 1):
    K_m <- exp(f_m) K_m + s_m k_t;   V_m <- exp(f_m) V_m + s_m v_t
    p = softmax_m(scale q_t . K_m);  o_t = sum_m p_m V_m
then o -> rms_norm(SiLU(o)) (eps 1e-5 whatever ``norm_eps`` says: fla's layer passes none) -> o_proj.
Options without an effect in fla 0.6.0's layer: ``use_output_gate`` (it has no output gate) and ``use_norm`` (it
always normalises); the adapter follows the layer, so they have none here either.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import fla_models, padded_segments, q_conv_shapes, q_projection, rms_norm
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent up to this length, else its mode's kernel
MODES = ('chunk', 'fused_recurrent')
# the eps of fla's rms_norm_linear, which the host calls without one (its g_norm.eps, norm_eps, is never read)
HOST_NORM_EPS = 1e-5


def to_fla_state(state: torch.Tensor, key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., H, M, K + V] (this adapter's layout) -> fla's pair (hk [..., H, K, M], hv [..., H, M, V]) (views)."""
    return state[..., :key_dim].transpose(-1, -2), state[..., key_dim:]


def from_fla_state(hk: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """fla's pair (hk [..., H, K, M], hv [..., H, M, V]) -> [..., H, M, K + V] (this adapter's layout)."""
    return torch.cat([hk.transpose(-1, -2), hv.to(hk.dtype)], -1)


def gsa_reference(q, k, v, s, g, cu_seqlens, position, scale=None, initial_state=None, output_final_state=False):
    """Gated slot attention over packed segments, step by step in fp32: the oracle for fla's kernels.

    q, k [S, H, K]; v [S, H, V]; s, g [S, H, M] (slot weights and log forget gates, as fla's kernels take them);
    cu_seqlens [G+1]; position [S] (slot's position inside its segment); initial_state [G, H, M, K + V] or None.
    Per segment and head, with state R [M, K + V] (row m: slot m's key memory, then its value memory):
        R <- exp(g_t)[:, None] R + s_t [k_t, v_t];  p = softmax(R[:, :K] (scale q_t));  o_t = p^T R[:, K:]
    (fla's two passes, keys -> slots and slots -> values, in one loop.) Returns o [S, H, V] (dtype of v) and the
    final states [G, H, M, K + V] fp32 (or None).
    """
    S, H, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    # padded steps have g = 0 and s = 0: they leave the state unchanged, so the final state is exact
    segment, (q, kv, s, g) = padded_segments(cu_seqlens, position, acc(q), torch.cat([acc(k), acc(v)], -1), acc(s),
                                             acc(g))
    L, M = q.shape[1], s.shape[-1]
    q = q * scale
    state = q.new_zeros(G, H, M, K + V) if initial_state is None else acc(initial_state).clone()
    out = q.new_zeros(G, L, H, V)
    for t in range(L):
        state = state * g[:, t].exp()[..., None] + s[:, t, :, :, None] * kv[:, t, :, None, :]
        p = torch.einsum('ghmk,ghk->ghm', state[..., :K], q[:, t]).softmax(-1)
        out[:, t] = torch.einsum('ghmv,ghm->ghv', state[..., K:], p)
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


def _swish(x: torch.Tensor) -> torch.Tensor:
    """fla's ``swish`` (SwishFeatureMap): x * sigmoid(x) computed in fp32, in the input's dtype."""
    xf = acc(x)
    return (xf * torch.sigmoid(xf)).to(x.dtype)


@register_adapter
class GatedSlotAttentionAdapter(HostAdapter):
    """Every option of fla 0.6.0's layer is supported: num_kv_heads, num_slots, use_short_conv (conv_size,
    conv_bias), feature_map ('swish', 'relu', 't2r'), scale, gate_logit_normalizer, elementwise_affine,
    expand_k / expand_v, mode ('chunk', 'fused_recurrent'), and use_output_gate / use_norm / norm_eps, which
    the layer itself ignores. Refused (ValueError naming the option): an unknown ``mode`` (the host raises
    only at its first long forward), expand_v with ``g_norm`` weights of another size (the host fails in its
    forward), and a replaced feature map or projection."""

    host_class = 'fla.layers.gsa.GatedSlotAttention'
    write_modules = ('k_proj', 'v_proj', 'f_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_models(cls):
        return fla_models('GSA', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                  'short_conv': dict(use_short_conv=True),
                                  'kv_heads_t2r': dict(num_heads=4, num_kv_heads=2, feature_map='t2r')},
                          num_heads=2, num_slots=16)

    @classmethod
    def example_host(cls):
        # K = 16 and the default num_slots = K: no dimension of fla's chunk kernels' dots below 16 on a GPU
        return cls.load_host_class()(hidden_size=64, expand_k=0.5, num_heads=2, layer_idx=0)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        if h.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES} (the host's), got {h.mode!r}")
        self.feature_map = self._feature_map_name(h.feature_map)
        norm = h.g_norm
        if norm.weight is not None and norm.weight.numel() != h.value_dim:
            raise ValueError(f"expand_v: the value dim ({h.value_dim}) differs from the g_norm weight's "
                             f"({norm.weight.numel()}, hidden_size): fla's layer itself fails in its forward "
                             "(rms_norm_linear); use expand_v=1 or elementwise_affine=False")
        expected = {'k_proj': h.key_dim_per_group, 'v_proj': h.value_dim_per_group,
                    'f_proj': h.num_kv_heads * h.num_slots}
        for name, out in expected.items():
            m = getattr(h, name, None)
            if not (isinstance(m, nn.Linear) and m.in_features == h.hidden_size and m.out_features == out):
                raise ValueError(f"{name}: expected the host's Linear({h.hidden_size}, {out}), got {m!r}")

    @staticmethod
    def _feature_map_name(fm) -> str | None:
        """The host's feature map module -> 'swish', 'relu', 't2r' or None (a ValueError for anything else)."""
        from fla.modules.feature_map import ReLUFeatureMap, SwishFeatureMap, T2RFeatureMap
        if fm is None:
            return None
        for name, cls in (('swish', SwishFeatureMap), ('relu', ReLUFeatureMap), ('t2r', T2RFeatureMap)):
            if type(fm) is cls:
                return name
        raise ValueError(f"feature_map: {type(fm).__name__} is not one of the host's feature maps (swish, relu, t2r, "
                         "or None)")

    def _apply_feature_map(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The host's feature map over x [..., K] (per head): its own module on the triton backend, and on the
        torch backend PyTorch ops (t2r's module is plain PyTorch either way)."""
        if self.feature_map is None:
            return x
        if backend == 'torch':
            if self.feature_map == 'swish':
                return _swish(x)
            if self.feature_map == 'relu':
                return F.relu(x)
        return self.host.feature_map(x)

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                WriteProjection('v', h.v_proj, h.v_conv1d if conv else None),
                WriteProjection('f', h.f_proj)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.num_slots, h.head_k_dim + h.head_v_dim)

    def read_conv_shapes(self):
        return q_conv_shapes(self.host)

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (after the conv and the feature map, once per token)."""
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows).unflatten(-1, (h.num_heads, h.head_k_dim))
        return {'q': self._apply_feature_map(q, backend)}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k' [S, key_dim / groups], 'v' [S, value_dim / groups], 'f' [S, num_kv_heads * num_slots] per
        sorted slot; initial_state [G, H, M, K + V] or None. Returns o [S, H, V] and the final states
        [G, H, M, K + V] (or None)."""
        h = self.host
        Hkv, K, V, M = h.num_kv_heads, h.head_k_dim, h.head_v_dim, h.num_slots
        q = gather(read['q'], dispatch)
        k = self._apply_feature_map(write['k'].unflatten(-1, (Hkv, K)), backend)
        v = F.silu(write['v'].unflatten(-1, (Hkv, V)))
        g = F.logsigmoid(write['f'].unflatten(-1, (Hkv, M))) / h.gate_logit_normalizer
        s = (1 - g.exp()).to(g.dtype)
        if h.num_kv_groups > 1:  # kv head j serves query heads j*groups .. j*groups + groups-1, as fla repeats
            k, v, g, s = (t.repeat_interleave(h.num_kv_groups, dim=1) for t in (k, v, g, s))
        if backend == 'torch':
            return gsa_reference(q, k, v, s, g, dispatch.cu_seqlens, dispatch.position, scale=h.scale,
                                 initial_state=initial_state, output_final_state=output_final_state)
        from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa
        kwargs = dict(scale=h.scale, output_final_state=output_final_state, cu_seqlens=dispatch.cu_seqlens,
                      initial_state=None if initial_state is None else to_fla_state(initial_state, K))
        # The host's own mode rule, on the longest segment: fused_recurrent up to 64 tokens (in training too),
        # else its mode's kernel. Both take cu_seqlens and a pair of initial / final states per segment; with
        # cu_seqlens fused_recurrent_gsa never takes its one-token kernel (dense batches only).
        if h.mode == 'fused_recurrent' or dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN:
            o, (hk, hv) = fused_recurrent_gsa(q[None], k[None], v[None], s[None], g[None], **kwargs)
        else:
            o, (hk, hv) = chunk_gsa(q[None], k[None], v[None], s[None], g[None],
                                    cu_seqlens_cpu=dispatch.cu_seqlens_cpu, **kwargs)
        return o[0], (from_fla_state(hk, hv) if output_final_state else None)

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: SiLU, the RMS norm over the value dim (g_norm's weight and bias, eps 1e-5 as
        the host has it), o_proj."""
        h = self.host
        norm = h.g_norm
        o = F.silu(o.flatten(1))
        if backend == 'torch':
            return h.o_proj(rms_norm(o, norm.weight, norm.bias, HOST_NORM_EPS).to(o.dtype))
        from fla.modules.layernorm import rms_norm_linear
        return rms_norm_linear(o, norm.weight, norm.bias, h.o_proj.weight, h.o_proj.bias)
