"""Adapter for fla's ``DeltaNet`` (``fla.layers.delta_net``).

Write side per memory: k_proj, v_proj, b_proj (beta logits, with ``use_beta``) and the k/v short convs
(with ``use_short_conv``). Read side once per token: q_proj + q short conv, g_proj (output gate, with
``use_gate``), o_norm, o_proj. State per segment: [H, K, V], the layout fla's delta-rule kernels return
and the host stores in its ``Cache``.

The host's feature pipeline, mirrored step by step (fla 0.6.0 ``DeltaNet.forward``):
    q, k: projection -> short conv (its activation is SiLU only for qk_activation='silu'; without convs,
          SiLU for 'silu') -> relu / elu+1 / identity for the other activations -> sum norm (qk_norm='sum')
          -> L2 norm inside the kernel (qk_norm='l2')
    v:    projection -> short conv with SiLU (SiLU alone without convs)
    beta: sigmoid(b_proj x) with use_beta, else 1; times 2 with allow_neg_eigval
Every option of fla 0.6.0's layer is supported. Refused (ValueError naming the option): values the host
would not accept either (set on the module after construction), and ``use_output_norm=False`` on a host
that has that flag (fla 0.6.0's DeltaNet has none; a layer without its output norm is not verified here).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import (fla_models, gated_norm_out, l2norm, padded_segments, q_conv_shapes,
                                          q_projection)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

CHUNK_SIZE = 64  # fla's chunk size for the delta rule (the host's default)
MODES = ('chunk', 'fused_recurrent')
QK_ACTIVATIONS = ('silu', 'relu', 'elu', 'identity')
QK_NORMS = ('l2', 'sum')


def delta_rule_reference(q, k, v, beta, cu_seqlens, position, qk_l2norm=True, scale=None, initial_state=None,
                         output_final_state=False):
    """The delta rule over packed segments, step by step in fp32: the oracle for fla's kernels.

    q, k [S, H, K] (features after activation and sum norm; L2-normalised here when ``qk_l2norm``, as fla
    does in-kernel); v [S, H, V]; beta [S, H] (already activated); cu_seqlens [G+1]; position [S] (slot's
    position in its segment); initial_state [G, H, K, V] or None. Per segment and head, with state S [K, V]:
        S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (scale q_t)
    Returns o [S, H, V] (dtype of v) and the final states [G, H, K, V] fp32 (or None).
    """
    S, H, K = q.shape
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    q, k = acc(q), acc(k)
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    # padded steps have k = 0 and beta = 0: they leave the state unchanged, so the final state is exact
    segment, (q, k, v, beta) = padded_segments(cu_seqlens, position, q, k, acc(v), acc(beta))
    L = q.shape[1]
    state = q.new_zeros(G, H, K, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype).clone()
    out = q.new_zeros(G, L, H, v.shape[-1])
    for t in range(L):
        k_t = k[:, t]
        delta = (v[:, t] - torch.einsum('ghkv,ghk->ghv', state, k_t)) * beta[:, t, :, None]
        state = state + k_t[..., None] * delta[:, :, None, :]
        out[:, t] = torch.einsum('ghkv,ghk->ghv', state, q[:, t])
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


@functools.cache
def _chunk_function() -> type[torch.autograd.Function]:
    """fla's ``ChunkDeltaRuleFunction`` with the chunk indices passed in, made on first use (fla stays an
    optional import). Its backward is fla's own, unchanged; only the forward differs, in two ways:

    * ``chunk_indices`` come from the caller: fla's ``chunk_delta_rule`` takes ``cu_seqlens_cpu`` but no
      chunk indices, and uploads the ones it makes from the host blocking (``.to(device)`` of pageable
      memory, a sync of its own); the adapter uploads them asynchronously from pinned memory instead.
    * no dtype check: ``chunk_delta_rule`` asserts that q is not fp32 ("use bfloat16"), a policy of its entry
      point rather than of the kernels. They are the ones fla's ``chunk_gated_delta_rule`` runs in fp32 without
      that assertion (``chunk_scaled_dot_kkt``, ``solve_tril``, ``chunk_gated_delta_rule_fwd_h``,
      ``chunk_fwd_o`` and their backwards, with g=None), plus the delta rule's own WY kernels, whose dots
      are ``allow_tf32=False``. So fp32 training runs in fp32, as the host's fused_recurrent path does;
      casting to bf16 would silently lose precision against the torch backend.
    """
    from fla.modules.norm.l2norm import l2norm_fwd
    from fla.ops.delta_rule import chunk as fla_chunk
    from fla.utils import autocast_custom_fwd, input_guard

    class ChunkDeltaRule(fla_chunk.ChunkDeltaRuleFunction):
        @staticmethod
        @input_guard
        @autocast_custom_fwd
        def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                    cu_seqlens, chunk_indices, chunk_size):
            # the body of fla's forward, minus its prepare_chunk_indices; saves what its backward reads
            if use_qk_l2norm_in_kernel:
                q, q_rstd = l2norm_fwd(q)
                k, k_rstd = l2norm_fwd(k)
            else:
                q_rstd, k_rstd = None, None
            o, A, final_state = fla_chunk.chunk_delta_rule_fwd(
                q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                chunk_size=chunk_size)
            ctx.save_for_backward(q, q_rstd, k, k_rstd, v, beta, A, initial_state, cu_seqlens, chunk_indices)
            ctx.scale = scale
            ctx.chunk_size = chunk_size
            ctx.use_qk_l2norm_in_kernel = use_qk_l2norm_in_kernel
            return o.to(q.dtype), final_state

    return ChunkDeltaRule


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    """fla's DeltaNet ``sum_norm``: x / max(sum |x|, 1e-6) over the head dim."""
    return F.normalize(x, p=1, dim=-1, eps=1e-6).to(x)


@register_adapter
class DeltaNetAdapter(HostAdapter):
    host_class = 'fla.layers.delta_net.DeltaNet'
    write_modules = ('k_proj', 'v_proj', 'b_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_host(cls):
        return cls.load_host_class()(hidden_size=64, num_heads=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        return fla_models('DeltaNet', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                       'gate': dict(use_gate=True)}, num_heads=2)

    def __init__(self, host):
        # fla asserts these at construction; a value set on the module afterwards would reach its forward
        # unchecked (an unknown qk_norm silently means no normalisation there), so check them here
        for option, allowed in (('mode', MODES), ('qk_activation', QK_ACTIVATIONS), ('qk_norm', QK_NORMS)):
            value = getattr(host, option)
            if value not in allowed:
                raise ValueError(f"{option}: DeltaNet supports {allowed}, got {value!r}")
        if getattr(host, 'use_output_norm', True) is False:
            raise ValueError("use_output_norm: a DeltaNet without its output norm is not supported")
        needed = ['k_proj', 'v_proj'] + (['b_proj'] if host.use_beta else []) + \
            (['k_conv1d', 'v_conv1d', 'q_conv1d'] if host.use_short_conv else []) + \
            (['g_proj'] if host.use_gate else [])
        missing = [name for name in needed if not hasattr(host, name)]
        if missing:  # e.g. a layer already wrapped once, whose write side has moved out
            raise ValueError(f"host: this DeltaNet lacks {', '.join(missing)} (use_beta={host.use_beta}, "
                             f"use_short_conv={host.use_short_conv}, use_gate={host.use_gate}); "
                             "was it wrapped already?")
        super().__init__(host)

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        projections = [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                       WriteProjection('v', h.v_proj, h.v_conv1d if conv else None)]
        if h.use_beta:
            projections.append(WriteProjection('b', h.b_proj))
        return projections

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_k_dim, h.head_v_dim)

    def read_conv_shapes(self):
        return q_conv_shapes(self.host)

    def _qk_features(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """q or k [R, H*K] after its short conv (or the raw projection without convs) -> [R, H, K] features:
        the host's activation and sum norm, everything but the in-kernel L2 norm. The torch backend computes
        them in fp32 (it is the reference), the triton backend in the input's dtype, as the host does."""
        h = self.host
        if backend == 'torch':
            x = acc(x)
        if h.qk_activation == 'silu':
            if not h.use_short_conv:  # otherwise the conv's own activation was SiLU
                x = F.silu(x)
        elif h.qk_activation == 'relu':
            x = F.relu(x)
        elif h.qk_activation == 'elu':
            if backend == 'torch':
                x = torch.where(x >= 0, x + 1, x.clamp_max(0).exp())
            else:
                from fla.modules.activations import elu_p1
                x = elu_p1(x)
        x = x.unflatten(-1, (-1, h.head_k_dim))
        return _sum_norm(x) if h.qk_norm == 'sum' else x

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> {'q': [N, H, K] features, 'gate': [N, H, V] with use_gate}."""
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows)
        read = {'q': self._qk_features(q, backend)}
        if h.use_gate:
            read['gate'] = h.g_proj(x).unflatten(-1, (-1, h.head_v_dim))
        return read

    def _beta(self, write: dict[str, torch.Tensor], like: torch.Tensor, backend: str) -> torch.Tensor:
        """Per-slot beta [S, H]: sigmoid of the memory's b projection (fp32 on the torch backend, the input's
        dtype on triton, as the host), or ones without use_beta; doubled with allow_neg_eigval."""
        h = self.host
        if h.use_beta:
            b = write['b']
            beta = (acc(b) if backend == 'torch' else b).sigmoid()
        else:
            beta = like.new_ones(like.shape[0], h.num_heads)
        return beta * 2. if h.allow_neg_eigval else beta

    def _use_chunk(self, max_seqlen: int) -> bool:
        """The host's mode rule, made for training: a host built with mode='fused_recurrent' always runs
        fused_recurrent (it trains with it too); a 'chunk' host runs chunk whenever gradients may flow (its
        backward is parallel over the sequence; the host itself would train segments of <= 64 tokens with
        fused_recurrent) and for segments longer than 64 tokens, fused_recurrent for short eval inputs."""
        h = self.host
        return h.mode == 'chunk' and (torch.is_grad_enabled() or h.training or max_seqlen > CHUNK_SIZE)

    def _slots(self, read, write, dispatch, backend):
        """q (gathered), k [S, H, K], v [S, H, V] and beta [S, H] per slot."""
        h = self.host
        q = gather(read['q'], dispatch)
        k = self._qk_features(write['k'], backend)
        v = write['v']
        if not h.use_short_conv:  # with convs, v's conv applied its SiLU
            v = F.silu(v)
        v = v.unflatten(-1, (-1, h.head_v_dim))
        return q, k, v, self._beta(write, k, backend)

    def decode_in_place(self, read, write, dispatch, rows):
        """``gated_delta_step`` without a decay on the pool's rows ([H, K, V] states; fp32 pools only)."""
        if rows.flat.dtype != torch.float32:
            return None
        from mom_wrap.kernels.delta_step import gated_delta_step
        q, k, v, beta = self._slots(read, write, dispatch, 'triton')
        if not q.dtype == k.dtype == v.dtype:
            return None
        return gated_delta_step(q, k, v, beta, rows.flat, rows.index, rows.valid, beta_sigmoid=False,
                                l2norm=self.host.qk_norm == 'l2', state_v_first=False)

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """Per-slot q (gathered), k, v, beta -> o [S, H, V] and the final states [G, H, K, V] (fp32)."""
        h = self.host
        q, k, v, beta = self._slots(read, write, dispatch, backend)
        l2 = h.qk_norm == 'l2'
        if backend == 'torch':
            return delta_rule_reference(q, k, v, beta, dispatch.cu_seqlens, dispatch.position, qk_l2norm=l2,
                                        initial_state=initial_state, output_final_state=output_final_state)
        if self._use_chunk(dispatch.max_seqlen):
            chunks = dispatch.segments.chunk_indices(CHUNK_SIZE)  # (made on the host, see _chunk_function)
            o, state = _chunk_function().apply(q[None], k[None], v[None], beta[None], q.shape[-1] ** -0.5,
                                               initial_state, output_final_state, l2, dispatch.cu_seqlens,
                                               chunks, CHUNK_SIZE)
        else:
            from fla.ops.delta_rule import fused_recurrent_delta_rule
            o, state = fused_recurrent_delta_rule(q[None], k[None], v[None], beta[None], initial_state=initial_state,
                                                  output_final_state=output_final_state, use_qk_l2norm_in_kernel=l2,
                                                  cu_seqlens=dispatch.cu_seqlens)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: the gated RMS norm (use_gate) or RMS norm, then o_proj."""
        return gated_norm_out(self.host, o, read.get('gate'), backend)
