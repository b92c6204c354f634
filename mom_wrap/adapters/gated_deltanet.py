"""Adapter for fla's ``GatedDeltaNet``.

Write side per memory: k_proj, v_proj, a_proj (gate input), b_proj (beta logits) and the k/v short convs.
Read side once per token: q_proj + q short conv, g_proj (output gate), o_norm, o_proj; host constants
A_log and dt_bias (the in-kernel gate -exp(A_log) * softplus(a + dt_bias) is shared by all memories).
State per segment: [HV, V, K] (fla's ``state_v_first=True`` layout, as the host caches it).
A decode step (triton backend, fp32 state pool) runs ``mom_wrap.kernels.delta_step.gated_delta_step`` on the
pool's rows in place; other steps and prefills run fla's kernels on gathered states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import (check_value_heads, fla_models, gated_norm_out, l2norm, padded_segments,
                                          q_conv_shapes, q_projection)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

CHUNK_SIZE = 64  # fla's chunk size for the gated delta rule


def gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias, cu_seqlens, position, allow_neg_eigval=False,
                               scale=None, initial_state=None, output_final_state=False):
    """The gated delta rule over packed segments, step by step in fp32: the oracle for fla's kernels.

    q, k [S, H, K]; v [S, HV, V]; a, b [S, HV] raw gate input and beta logits (gate and beta activations,
    and q/k L2 normalisation, applied here as fla applies them in-kernel); cu_seqlens [G+1]; position [S];
    initial_state [G, HV, V, K] or None. Per segment and head, with state S [V, K]:
        S <- exp(g_t) S;  S <- S + beta_t (v_t - S k_t) k_t^T;  o_t = S (scale q_t)
    Returns o [S, HV, V] (dtype of v) and the final states [G, HV, V, K] fp32 (or None).
    """
    S, H, K = q.shape
    HV, V = v.shape[1:]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    q = l2norm(acc(q)) * scale
    k = l2norm(acc(k))
    if HV != H:  # grouped value heads: each q/k head serves HV // H value heads
        q, k = q.repeat_interleave(HV // H, dim=1), k.repeat_interleave(HV // H, dim=1)
    g = -acc(A_log).exp() * F.softplus(acc(a) + acc(dt_bias))
    beta = acc(b).sigmoid() * (2.0 if allow_neg_eigval else 1.0)

    # padded steps have g = 0 and beta = 0: they leave the state unchanged, so the final state is exact
    segment, (q, k, v, g, beta) = padded_segments(cu_seqlens, position, q, k, acc(v), g, beta)
    L = q.shape[1]
    state = q.new_zeros(G, HV, V, K) if initial_state is None else initial_state.to(q.dtype).clone()
    out = q.new_zeros(G, L, HV, V)
    for t in range(L):
        state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        delta = (v[:, t] - torch.einsum('ghvk,ghk->ghv', state, k_t)) * beta[:, t, :, None]
        state = state + delta[..., None] * k_t[:, :, None, :]
        out[:, t] = torch.einsum('ghvk,ghk->ghv', state, q[:, t])
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


@register_adapter
class GatedDeltaNetAdapter(HostAdapter):
    host_class = 'fla.layers.gated_deltanet.GatedDeltaNet'
    write_modules = ('k_proj', 'v_proj', 'a_proj', 'b_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_host(cls):
        return cls.load_host_class()(hidden_size=64, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        return fla_models('GatedDeltaNet', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                            'no_gate': dict(use_gate=False)}, head_dim=16, num_heads=2, expand_v=1)

    def __init__(self, host: torch.nn.Module):
        super().__init__(host)
        check_value_heads(host)

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                WriteProjection('v', h.v_proj, h.v_conv1d if conv else None),
                WriteProjection('a', h.a_proj),
                WriteProjection('b', h.b_proj)]

    def state_shape(self):
        h = self.host
        return (h.num_v_heads, h.head_v_dim, h.head_k_dim)

    def read_conv_shapes(self):
        return q_conv_shapes(self.host)

    def read(self, x, layout, backend, conv_rows=None):
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows)
        if not h.use_short_conv:  # the host's SiLU without the conv
            q = F.silu(q)
        read = {'q': q.unflatten(-1, (-1, h.head_k_dim))}
        if h.use_gate:
            read['gate'] = h.g_proj(x).unflatten(-1, (-1, h.head_v_dim))
        return read

    def query(self, read, write, dispatch) -> torch.Tensor:
        """q [S, H, K] per sorted slot: the token's q (read once per token), gathered to its slots."""
        return gather(read['q'], dispatch)

    def decode_in_place(self, read, write, dispatch, rows):
        """``gated_delta_step`` on the pool's rows (fp32 pools; others take the wrapper's gather / scatter)."""
        if rows.flat.dtype != torch.float32:
            return None
        from mom_wrap.kernels.delta_step import gated_delta_step
        h = self.host
        q, (k, v) = self.query(read, write, dispatch), self._kv(write)
        if not q.dtype == k.dtype == v.dtype:  # (under autocast, say): the kernel takes one dtype
            return None
        return gated_delta_step(q, k, v, write['b'], rows.flat, rows.index, rows.valid, a=write['a'], A_log=h.A_log,
                                dt_bias=h.dt_bias, allow_neg_eigval=h.allow_neg_eigval)

    def _kv(self, write):
        """k [S, H, K], v [S, HV, V] per slot (the host's SiLU where it has no short conv)."""
        h = self.host
        k, v = write['k'], write['v']
        if not h.use_short_conv:
            k, v = F.silu(k), F.silu(v)
        return k.unflatten(-1, (-1, h.head_k_dim)), v.unflatten(-1, (-1, h.head_v_dim))

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        h = self.host
        q = self.query(read, write, dispatch)
        k, v = self._kv(write)
        a, b = write['a'], write['b']
        if backend == 'torch':
            return gated_delta_rule_reference(q, k, v, a, b, h.A_log, h.dt_bias, dispatch.cu_seqlens,
                                              dispatch.position, h.allow_neg_eigval, initial_state=initial_state,
                                              output_final_state=output_final_state)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        kwargs = dict(initial_state=initial_state, output_final_state=output_final_state,
                      use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                      allow_neg_eigval=h.allow_neg_eigval, state_v_first=True, use_gate_in_kernel=True,
                      A_log=h.A_log, dt_bias=h.dt_bias, cu_seqlens=dispatch.cu_seqlens)
        # the host's own mode rule: chunk whenever gradients flow, fused_recurrent for short eval inputs
        if torch.is_grad_enabled() or h.training or (dispatch.max_seqlen > 64 and h.mode == 'chunk'):
            chunks = dispatch.segments.chunk_indices(CHUNK_SIZE)  # (made on the host, uploaded asynchronously)
            o, state = chunk_gated_delta_rule(q[None], k[None], v[None], g=a[None], beta=b[None],
                                              cu_seqlens_cpu=dispatch.cu_seqlens_cpu, chunk_indices=chunks,
                                              chunk_size=CHUNK_SIZE, **kwargs)
        else:
            o, state = fused_recurrent_gated_delta_rule(q[None], k[None], v[None], g=a[None], beta=b[None], **kwargs)
        return o[0], state

    def recurrence_in_groups(self, read, write, dispatch, backend, parts):
        """fla's chunk kernels in one forward call, the backward in a call per group of whole segments
        (``gated_delta_in_groups``): the triton backend's training forward; None otherwise (the torch backend
        has no separate backward to split) and where the segments do not split evenly."""
        if backend == 'torch' or not torch.is_grad_enabled():
            return None
        from mom_wrap.adapters.gated_delta_in_groups import GatedDeltaRuleInGroups, QKBetaNorm
        h = self.host
        k, v = self._kv(write)
        # queued before the plan's sync (segment_groups reads the host layout): the device runs them meanwhile
        q, k, beta = QKBetaNorm.apply(self.query(read, write, dispatch)[None], k[None], write['b'][None],
                                      h.allow_neg_eigval)
        groups = dispatch.segment_groups(parts, CHUNK_SIZE)
        if not groups:  # (the norms above are dropped with their graph)
            return None
        o = GatedDeltaRuleInGroups.apply(q, k, v[None], write['a'][None], beta, h.A_log, h.dt_bias,
                                         h.head_k_dim ** -0.5, dispatch.cu_seqlens,
                                         dispatch.segments.chunk_indices(CHUNK_SIZE), groups)
        return o[0]

    def finish(self, o, read, backend):
        return gated_norm_out(self.host, o, read.get('gate'), backend)
