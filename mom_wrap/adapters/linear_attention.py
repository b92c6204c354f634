"""Adapter for fla's ``LinearAttention`` (``fla.layers.linear_attn``), the host of the MoM authors' own reference
code (OpenSparseLLMs/MoM, ``mom_linear_attn.py``).

Write side per memory: k_proj, v_proj.
Shared by the memories: the key feature map ``feature_map_k`` (it stays in the host and maps every memory's k on
its slots), as the MoM authors' reference shares it; with ``tie_feature_map_qk`` it is the query's map itself.
Read side once per token: q_proj, ``feature_map_q``, ``norm_q``, the output norm (``norm``: RMSNorm per head or
identity) and o_proj.
State per segment: [H, K', V] (the host's layout; K' the feature map's output size: 2K for hedgehog, 8K for dpfp,
H = num_heads, the k/v heads already repeated over their query-head groups); with ``do_feature_map_norm``
[H, K', V + 1]: the host's (kv state [H, K', V], key sum z [1, H, K']) pair, z as the last column.

The host's forward, which this adapter follows step by step: q, k, v projections; k, v repeated from
num_kv_heads to num_heads; q = feature_map_q(q), k = feature_map_k(k) per head; ``norm_q`` / ``norm_k``:
x / (sum x + 1e-4); the recurrence (no decay; scale = K'^-0.5)
    S <- S + k_t v_t^T;  o_t = scale q_t^T S
and with ``do_feature_map_norm`` z <- z + k_t;  o_t <- o_t / (scale q_t . z + 1e-10); then norm and o_proj.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import fla_models, padded_segments, rms_norm
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent up to this length in inference, else its mode's kernel


def _elu_p1(x: torch.Tensor) -> torch.Tensor:
    """fla's ``elu_p1`` (a Triton kernel) in PyTorch: elu(x) + 1 computed in fp32."""
    xf = acc(x)
    return torch.where(xf >= 0, xf + 1, torch.exp(torch.clamp_max(xf, 0))).to(x.dtype)


def _feature_maps() -> tuple:
    """The feature-map modules the host builds (PyTorch, per head: the same on both backends); its 'elu' map is
    fla's function ``elu_p1`` instead."""
    from fla.modules.feature_map import DPFPFeatureMap, HadamardFeatureMap, HedgehogFeatureMap, T2RFeatureMap
    return (HadamardFeatureMap, HedgehogFeatureMap, T2RFeatureMap, DPFPFeatureMap, nn.ReLU, nn.Identity)


def linear_attn_reference(q, k, v, cu_seqlens, position, initial_state=None, output_final_state=False,
                          normalize=False):
    """Linear attention over packed segments in fp32 (masked quadratic form): the oracle for fla's kernels.

    q, k [S, H, K] (after the feature maps); v [S, H, V]; cu_seqlens [G+1]; position [S] (slot's position in its
    segment); initial_state [G, H, K, V] or, with ``normalize``, [G, H, K, V+1] (the key sum z as the last column).
    Per segment and head, scale = K^-0.5:
        S_t = S_0 + sum_{s<=t} k_s v_s^T;  o_t = scale q_t^T S_t;  normalize: o_t / (scale q_t . z_t + 1e-10)
    (z_t = z_0 + sum_{s<=t} k_s: carried as a value column of ones). Returns o [S, H, V] (dtype of v) and the
    final states (shape of initial_state, fp32) or None.
    """
    dtype, V = v.dtype, v.shape[-1]
    scale = q.shape[-1] ** -0.5
    if normalize:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    # padded steps have k = 0 and v = 0 (the ones column too): they add nothing, so the final state is exact
    segment, (q, k, v) = padded_segments(cu_seqlens, position, acc(q) * scale, acc(k), acc(v))
    L = q.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum('glhk,gshk->ghls', q, k).masked_fill(~causal, 0)
    out = torch.einsum('ghls,gshv->glhv', scores, v)
    state = None
    if initial_state is not None:
        out = out + torch.einsum('glhk,ghkv->glhv', q, acc(initial_state))
    if output_final_state:
        state = torch.einsum('glhk,glhv->ghkv', k, v)
        state = state if initial_state is None else state + acc(initial_state)
    o = out[segment, position]
    if normalize:
        o = o[..., :V] / (o[..., V:] + 1e-10)
    return o.to(dtype), state


@register_adapter
class LinearAttentionAdapter(HostAdapter):
    """Every option of the host is supported: all of fla's feature maps (tied or not), ``num_kv_heads``,
    ``norm_q`` / ``norm_k``, ``do_feature_map_norm``, ``output_norm`` 'rmsnorm' / 'identity', every mode.
    Refused: feature maps or an output norm replaced by modules that are not fla's."""

    host_class = 'fla.layers.linear_attn.LinearAttention'
    write_modules = ('k_proj', 'v_proj')

    @classmethod
    def example_host(cls):
        return cls.load_host_class()(hidden_size=64, num_heads=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        # the config's defaults differ from the layer's: attn_mode 'fused_chunk', norm_eps 1e-6
        return fla_models('LinearAttention', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                              'hedgehog_norm_kv': dict(feature_map='hedgehog', norm_feature_map=True,
                                                                       num_kv_heads=1)}, num_heads=2)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        from fla.modules import RMSNorm
        from fla.modules.activations import elu_p1
        for side in ('q', 'k'):
            fm = getattr(host, f'feature_map_{side}')
            if not (fm is elu_p1 or type(fm) in _feature_maps()):
                raise ValueError(f"feature_map: feature_map_{side} is {fm!r}, not one of fla's feature maps that "
                                 "LinearAttention builds (elementwise_product, hedgehog, t2r, dpfp, elu, relu, "
                                 "identity); the MoM LinearAttention adapter takes only those")
        if not isinstance(host.norm, (RMSNorm, nn.Identity)):
            raise ValueError(f"output_norm: expected fla's RMSNorm ('rmsnorm') or nn.Identity ('identity'), got "
                             f"{host.norm!r}")
        self.normalize = bool(host.do_feature_map_norm)
        ref = host.q_proj.weight
        with torch.no_grad():  # K': the feature map's output size per head
            self.feature_dim = self._map('k', 'torch')(ref.new_zeros(1, host.head_k_dim)).shape[-1]

    def _map(self, side: str, backend: str):
        """The host's feature map of ``side`` ('q' or 'k'); on the torch backend fla's Triton ``elu_p1`` is
        replaced by its PyTorch version (the other maps are PyTorch modules)."""
        from fla.modules.activations import elu_p1
        fm = getattr(self.host, f'feature_map_{side}')
        return _elu_p1 if fm is elu_p1 and backend == 'torch' else fm

    def _features(self, x: torch.Tensor, side: str, backend: str) -> torch.Tensor:
        """x [N, heads, K] -> [N, heads, K']: the feature map, then the host's sum normalisation if enabled."""
        x = self._map(side, backend)(x)
        return x / (x.sum(-1, True) + 1e-4) if getattr(self.host, f'norm_{side}') else x

    def write_projections(self) -> list[WriteProjection]:
        return [WriteProjection('k', self.host.k_proj), WriteProjection('v', self.host.v_proj)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, self.feature_dim, h.head_v_dim + int(self.normalize))

    def read_conv_shapes(self):
        return {}

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K'] (after the feature map and ``norm_q``: per token, once)."""
        h = self.host
        return {'q': self._features(h.q_proj(x).unflatten(-1, (h.num_heads, h.head_k_dim)), 'q', backend)}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k' [S, key_dim / groups], 'v' [S, value_dim / groups] per sorted slot; initial_state
        [G, *state_shape()] or None. Returns o [S, H, V] and the final states [G, *state_shape()] (or None)."""
        h = self.host
        q = gather(read['q'], dispatch)
        # the feature map and norm_k act per head: applied before the head repeat, on fewer elements
        k = self._features(write['k'].unflatten(-1, (h.num_kv_heads, h.head_k_dim)), 'k', backend)
        v = write['v'].unflatten(-1, (h.num_kv_heads, h.head_v_dim))
        if h.num_kv_groups > 1:  # kv head j serves query heads j*groups .. j*groups + groups-1, as fla repeats
            k, v = (t.repeat_interleave(h.num_kv_groups, dim=1) for t in (k, v))
        if backend == 'torch':
            return linear_attn_reference(q, k, v, dispatch.cu_seqlens, dispatch.position, initial_state,
                                         output_final_state, self.normalize)
        return self._kernel(q, k, v, dispatch, initial_state, output_final_state)

    def _kernel(self, q, k, v, dispatch, initial_state, output_final_state):
        """fla's linear_attn functions' own bodies, on all segments at once (varlen, per-segment states):
        the simple_gla kernel of the host's mode rule (no gate: g=None), then ``normalize_with_z_state`` for
        ``do_feature_map_norm``. Called directly rather than through ``chunk_linear_attn`` to pass chunk_simple_gla
        the host-side ``cu_seqlens_cpu`` (fewer syncs)."""
        from fla.ops.linear_attn.utils import normalize_with_z_state
        from fla.ops.simple_gla import chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla
        V, scale = v.shape[-1], k.shape[-1] ** -0.5
        s0 = z0 = None
        if initial_state is not None:
            s0 = initial_state[..., :V].contiguous() if self.normalize else initial_state
            z0 = initial_state[..., V][:, None].contiguous() if self.normalize else None  # [G, 1, H, K']
        kw = dict(scale=scale, initial_state=s0, output_final_state=output_final_state,
                  cu_seqlens=dispatch.cu_seqlens)
        # the host's rule: chunk whenever gradients are on, else fused_recurrent up to 64 tokens (on the longest
        # segment here), else its mode's kernel
        mode = 'chunk' if torch.is_grad_enabled() else \
            'fused_recurrent' if dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN else self.host.mode
        if mode == 'chunk':
            o, state = chunk_simple_gla(q[None], k[None], v[None], cu_seqlens_cpu=dispatch.cu_seqlens_cpu, **kw)
        elif mode == 'fused_chunk':
            o, state = fused_chunk_simple_gla(q[None], k[None], v[None], **kw)
        else:
            o, state = fused_recurrent_simple_gla(q[None], k[None], v[None], **kw)
        if self.normalize:
            o, z = normalize_with_z_state(o, q[None], k[None], scale, z0, False, dispatch.cu_seqlens)
            if output_final_state:
                state = torch.cat([state, z[:, 0, ..., None].to(state.dtype)], -1)
        return o[0].to(v.dtype), state if output_final_state else None

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: the host's output norm (per head), then o_proj."""
        norm = self.host.norm
        if isinstance(norm, nn.Identity):
            pass
        elif backend == 'torch':
            o = rms_norm(o, norm.weight, getattr(norm, 'bias', None), norm.eps).to(o.dtype)
        else:
            o = norm(o)
        return self.host.o_proj(o.flatten(1))
