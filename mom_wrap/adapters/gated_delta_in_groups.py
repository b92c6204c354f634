"""fla's chunked gated delta rule over all segments in one forward call, its backward in a call per group of whole
segments (``Dispatch.segment_groups``): the recurrence in parts of ``GatedDeltaNetAdapter.recurrence_in_groups``.

Why: the backward of fla's chunked kernels holds transients over all the rows of its call (the chunk states h
recomputed and their gradients dh, [chunks, HV, V, K] each, and w, u, dv, dq, dk, dw: about 47 units of
[N, hidden] bf16 over the (top-k + shared) x N slots of the paper's layer), and those set the layer's peak
memory. Segments are independent (training starts each from zero), so the backward of a group of whole
segments reads only the group's rows of what the forward saved: run group by group, each call holds the
transients of its own rows only, and the forward is still one call. The parts over time
(``mom_wrap.recurrence``) get the same peak but run the forward in parts too, with copies into part order and
states carried between the parts: about twice the host time per extra part (fla's call costs milliseconds of
host time, forward and backward).

The forward and backward are fla's own (``chunk_gated_delta_rule_fwd`` / ``_bwd``, the gate in its kernels;
fla's L2 norms of q and k and its beta sigmoid before them, ``QKBetaNorm``, as the adapter's one call runs
them); these Functions compose them the way fla's ``ChunkGatedDeltaRuleFunction`` does, without its initial
and final states (a training forward from zero states has none) and with the backward's calls on row ranges of
the saved tensors: views, since a group's rows are contiguous. Each group's gradients go into the full-size
gradients as they come (a copy; the group's own buffers are freed before the next call). The norms are a
Function of their own so that they need no host layout: the adapter queues them before the plan's sync, and
the device has them to run while the host builds the layout and the groups.
"""
from __future__ import annotations

import torch

from mom_wrap.dispatch import SegmentGroup

CHUNK_SIZE = 64  # fla's chunk size for the gated delta rule


class QKBetaNorm(torch.autograd.Function):
    """fla's in-kernel L2 norms of q and k and the sigmoid of the beta logits, as a Function of their own: q, k
    [1, S, H, K], b [1, S, HV] -> q / |q|, k / |k|, beta (fp32; times 2 with ``allow_neg_eigval``). Apart from
    the recurrence so that they need no plan on the host: the adapter queues them before the plan's sync."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, q, k, b, allow_neg_eigval: bool):
        from fla.modules.norm.l2norm import l2norm_fwd
        from fla.ops.common.gate import fused_beta_sigmoid_fwd
        q, q_rstd = l2norm_fwd(q.contiguous())
        k, k_rstd = l2norm_fwd(k.contiguous())
        b = b.contiguous()  # (a column slice of the write side where its split runs no convs)
        beta = fused_beta_sigmoid_fwd(b, scale=2.0 if allow_neg_eigval else 1.0)
        ctx.save_for_backward(q, q_rstd, k, k_rstd, b)
        ctx.allow_neg_eigval = allow_neg_eigval
        return q, k, beta

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, dq, dk, dbeta):
        from fla.modules.norm.l2norm import l2norm_bwd
        from fla.ops.common.gate import fused_beta_sigmoid_bwd
        q, q_rstd, k, k_rstd, b = ctx.saved_tensors
        return (l2norm_bwd(q, q_rstd, dq.contiguous()), l2norm_bwd(k, k_rstd, dk.contiguous()),
                fused_beta_sigmoid_bwd(b, dbeta.contiguous(), scale=2.0 if ctx.allow_neg_eigval else 1.0), None)


class GatedDeltaRuleInGroups(torch.autograd.Function):
    """q, k [1, S, H, K] (L2-normalised), v [1, S, HV, V], a [1, S, HV] (raw gate input), beta [1, S, HV] (after
    its sigmoid), A_log, dt_bias [HV] -> o [1, S, HV, V]: fla's chunked gated delta rule over the segments of
    cu_seqlens [G+1] (chunk_indices: fla's [NT, 2] of them), from zero states; the backward in a call per group
    of ``groups``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, q, k, v, a, beta, A_log, dt_bias, scale: float, cu_seqlens: torch.Tensor,
                chunk_indices: torch.Tensor, groups: list[SegmentGroup]):
        from fla.ops.gated_delta_rule import chunk as fla_chunk
        v, a = v.contiguous(), a.contiguous()
        g, o, A, _, _, _ = fla_chunk.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=a, beta=beta, scale=scale, initial_state=None, output_final_state=False,
            state_v_first=True, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, use_gate_in_kernel=True,
            A_log=A_log, dt_bias=dt_bias, chunk_size=CHUNK_SIZE)
        ctx.save_for_backward(q, k, v, g, a, beta, A, A_log, dt_bias)
        ctx.scale, ctx.groups = scale, groups
        return o.to(q.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, do):
        from fla.ops.gated_delta_rule import chunk as fla_chunk
        q, k, v, g, a, beta, A, A_log, dt_bias = ctx.saved_tensors
        do = do.contiguous()
        # the groups' gradients put together as they come (each call's buffers freed before the next call)
        dq, dk, dv, da, dbeta = (torch.empty_like(t) for t in (q, k, v, a, beta))
        dA_log, ddt_bias = torch.zeros_like(A_log), torch.zeros_like(dt_bias)
        for group in ctx.groups:
            r = slice(group.start, group.stop)
            dq_g, dk_g, dv_g, dbeta_g, da_g, _, dA_log_g, ddt_bias_g = fla_chunk.chunk_gated_delta_rule_bwd(
                q=q[:, r], k=k[:, r], v=v[:, r], g=g[:, r], beta=beta[:, r], A=A[:, r], scale=ctx.scale,
                initial_state=None, do=do[:, r], dht=None, state_v_first=True, cu_seqlens=group.cu_seqlens,
                chunk_indices=group.chunk_indices, use_gate_in_kernel=True, g_input=a[:, r], A_log=A_log,
                dt_bias=dt_bias, chunk_size=CHUNK_SIZE)
            for full, part in ((dq, dq_g), (dk, dk_g), (dv, dv_g), (dbeta, dbeta_g), (da, da_g)):
                full[:, r] = part
            dA_log += dA_log_g
            ddt_bias += ddt_bias_g
            del dq_g, dk_g, dv_g, dbeta_g, da_g
        return dq, dk, dv, da, dbeta, dA_log, ddt_bias, None, None, None, None
