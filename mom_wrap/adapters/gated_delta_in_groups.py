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

The forward and backward are fla's own (``chunk_gated_delta_rule_fwd`` / ``_bwd``, with the L2 norm of q and
k, the beta sigmoid and the gate in its kernels, as the adapter's one call runs them); this Function composes
them the way fla's ``ChunkGatedDeltaRuleFunction`` does, without its initial and final states (a training
forward from zero states has none) and with the backward's calls on row ranges of the saved tensors: views,
since a group's rows are contiguous. Each group's gradients go into the full-size gradients as they come (a
copy; the group's own buffers are freed before the next call).
"""
from __future__ import annotations

import torch

from mom_wrap.dispatch import SegmentGroup

CHUNK_SIZE = 64  # fla's chunk size for the gated delta rule


class GatedDeltaRuleInGroups(torch.autograd.Function):
    """q, k [1, S, H, K], v [1, S, HV, V], a, b [1, S, HV] (raw gate input and beta logits), A_log, dt_bias [HV]
    -> o [1, S, HV, V]: fla's chunked gated delta rule over the segments of cu_seqlens [G+1] (chunk_indices:
    fla's [NT, 2] of them), from zero states; the backward in a call per group of ``groups``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, q, k, v, a, b, A_log, dt_bias, scale: float, allow_neg_eigval: bool,
                cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, groups: list[SegmentGroup]):
        from fla.modules.norm.l2norm import l2norm_fwd
        from fla.ops.common.gate import fused_beta_sigmoid_fwd
        from fla.ops.gated_delta_rule import chunk as fla_chunk
        q, k, v, a, b = (t.contiguous() for t in (q, k, v, a, b))  # (a, b: column slices of the write side)
        q, q_rstd = l2norm_fwd(q)
        k, k_rstd = l2norm_fwd(k)
        beta = fused_beta_sigmoid_fwd(b, scale=2.0 if allow_neg_eigval else 1.0)
        g, o, A, _, _, _ = fla_chunk.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=a, beta=beta, scale=scale, initial_state=None, output_final_state=False,
            state_v_first=True, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, use_gate_in_kernel=True,
            A_log=A_log, dt_bias=dt_bias, chunk_size=CHUNK_SIZE)
        ctx.save_for_backward(q, q_rstd, k, k_rstd, v, g, a, b, beta, A, A_log, dt_bias)
        ctx.scale, ctx.allow_neg_eigval, ctx.groups = scale, allow_neg_eigval, groups
        return o.to(q.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, do):
        from fla.modules.norm.l2norm import l2norm_bwd
        from fla.ops.common.gate import fused_beta_sigmoid_bwd
        from fla.ops.gated_delta_rule import chunk as fla_chunk
        q, q_rstd, k, k_rstd, v, g, a, b, beta, A, A_log, dt_bias = ctx.saved_tensors
        do = do.contiguous()
        # the gradients of the kernels' inputs (normalised q and k, beta after its sigmoid), group by group
        dq, dk, dv, da = (torch.empty_like(t) for t in (q, k, v, a))
        dbeta = torch.empty_like(beta)
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
            del dq_g, dk_g, dv_g, dbeta_g, da_g  # (the next group's call allocates its own)
        # then through the norms and the sigmoid once, over all rows (rowwise: as fla does after its one call)
        dq = l2norm_bwd(q, q_rstd, dq)
        dk = l2norm_bwd(k, k_rstd, dk)
        db = fused_beta_sigmoid_bwd(b, dbeta, scale=2.0 if ctx.allow_neg_eigval else 1.0)
        return dq, dk, dv, da, db, dA_log, ddt_bias, None, None, None, None, None
