"""Mamba2's scan (SSD) on the scalar-decay chunk kernels, its elementwise ends inside one autograd function.

Per slot, with x [S, H, P] (the memory's own conv output), dt [S, H] (after softplus and dt_limit, fp32), A [H]
and D [H, P] or [H, 1]:
    o = chunk_scalar_decay(q = C, k = B, v = dt x, g = dt A) + D x
Written as PyTorch ops around ``chunk_scalar_decay`` (as ``Mamba2Common.recurrence`` did), autograd keeps x's fp32
copy (for dt x and D x) and v = dt x for the backward, and the backward makes an fp32 [S, H, P] gradient per term:
in bf16 that is 24 of the layer's 80 KiB saved per token at fla's Mamba2 size (32 heads x 64, state 128; measured
with saved_tensors_hooks), and the fp32 transients beside it. Here the forward saves x, dt, A and D (and the
kernels' q, k) and the backward recomputes v and g. The gradients are the PyTorch ops' own expressions in fp32, x's
cast once, so they equal theirs bit for bit (tests/test_ssd.py).
"""
from __future__ import annotations

import torch

from mom_wrap.kernels.scalar_decay import check_chunk_arguments, chunk_backward, chunk_forward
from mom_wrap.ops import acc


def _scan_inputs(xf, dt, A, dtype):
    """v = dt x [S, H, P] in ``dtype`` (x's) from xf = acc(x), g = dt A [S, H] fp32: what the kernels take."""
    return (xf * dt[..., None]).to(dtype), dt * A


class _ChunkSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, x, dt, A, D, cu_seqlens, initial_state, output_final_state, BT):
        ctx.set_materialize_grads(False)
        xf = acc(x)  # (one fp32 copy for both ends, not kept)
        v, g = _scan_inputs(xf, dt, A, x.dtype)
        o, ht, (q, k, _, _) = chunk_forward(q, k, v, g, cu_seqlens, initial_state, 1.0, output_final_state, BT)
        ctx.save_for_backward(q, k, x, dt, A, D, cu_seqlens, initial_state, ht)
        ctx.BT = BT
        return (acc(o) + acc(D) * xf).to(x.dtype), ht

    @staticmethod
    def backward(ctx, dout, dht):
        q, k, x, dt, A, D, cu_seqlens, initial_state, ht = ctx.saved_tensors
        xf = acc(x)
        v, g = _scan_inputs(xf, dt, A, x.dtype)
        # (the kernels take dout itself: o's gradient through acc(o) and the cast back is dout, exactly)
        dq, dk, dv, dg, dh0 = chunk_backward(q, k, v, g, cu_seqlens, initial_state, ht, dout, dht, 1.0, ctx.BT,
                                             ctx.needs_input_grad[7])
        dvf = acc(dv)
        dx = dvf * dt[..., None]  # through v = dt x
        ddt = (dvf * xf).sum(-1) + dg * A  # through v and through g = dt A
        dA = (dg * dt).sum(0) if ctx.needs_input_grad[4] else None
        dD = None
        if dout is not None:  # through D x
            doutf, Df = acc(dout), acc(D)
            dx = dx + doutf * Df
            dD = (doutf * xf).sum_to_size(Df.shape).to(D.dtype) if ctx.needs_input_grad[5] else None
        return dq, dk, dx.to(x.dtype), ddt.to(dt.dtype), dA, dD, None, dh0, None, None


def chunk_ssd(q, k, x, dt, A, D, cu_seqlens, cu_seqlens_cpu=None, initial_state=None, output_final_state=False,
              chunk_size=64):
    """Mamba2's scan over packed segments: ``chunk_scalar_decay(q, k, dt x, dt A) + D x``, forward and backward.

    q = C, k = B [S, G, N]; x [S, H, P] (q's dtype); dt [S, H] (after softplus and its limits; any float dtype, fp32
    as the hosts compute it); A [H] (-exp(A_log)); D [H, P] or [H, 1]; cu_seqlens, cu_seqlens_cpu, initial_state,
    output_final_state and chunk_size as ``chunk_scalar_decay`` takes them (v = dt x in x's dtype, g = dt A).

    Returns o [S, H, P] in x's dtype and the final states [N, H, P, N_state] fp32 (or None). Gradients flow to q, k,
    x, dt, A, D and initial_state; the same values as the PyTorch ops around ``chunk_scalar_decay``, from less memory.
    """
    initial_state = check_chunk_arguments(q, k, x, dt, cu_seqlens, cu_seqlens_cpu, initial_state, chunk_size)
    H, P = x.shape[1:]
    if not isinstance(A, torch.Tensor) or A.shape != (H,):
        raise ValueError(f"A: expected [{H}], got {tuple(getattr(A, 'shape', ())) or type(A).__name__}")
    if not isinstance(D, torch.Tensor) or D.shape not in ((H, P), (H, 1)):
        raise ValueError(f"D: expected [{H}, {P}] or [{H}, 1], got {tuple(getattr(D, 'shape', ())) or type(D).__name__}")
    return _ChunkSSD.apply(q, k, x, dt, A, D, cu_seqlens.contiguous(), initial_state, bool(output_final_state),
                           chunk_size)
