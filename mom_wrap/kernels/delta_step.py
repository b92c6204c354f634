"""One decode token of the gated delta rule (fla's GatedDeltaNet, and DeltaNet without the gate), reading and
updating each row's state in the cache pool in place.

fla's ``fused_recurrent_gated_delta_rule`` takes the selected states as one [G, HV, V, K] tensor and returns
a new final-state tensor, so a MoM decode step gathers every selected state out of the pool and scatters it
back: at B = 64 half of a CUDA-graph step (issue 9, issue 11). Here a program reads its row of the pool
through ``index``, applies the step and writes the row back: no gather, no scatter, no allocation but the
output. Per row r and value head h (state S [V, K] fp32, the pool's ``state_v_first`` layout):

    q, k <- q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6)      (fla's in-kernel l2norm; optional)
    g = -exp(A_log[h]) softplus(a[r, h] + dt_bias[h])           (or g given as the log decay; or none)
    beta = sigmoid(b[r, h]) (x 2 with allow_neg_eigval)          (or beta given as is)
    S <- exp(g) S;  S <- S + beta (v - S k) k^T;  o = scale S q

The reference is ``mom_wrap.adapters.gated_deltanet.gated_delta_rule_reference`` on one-row segments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_wrap.kernels.rows import pool_tile

MAX_K = 256
BLOCK_V = 32  # value rows per program: one [BV, K] fp32 tile of the state in registers


@triton.jit
def _softplus(x):
    return tl.where(x > 20., x, tl.log(1. + tl.exp(tl.minimum(x, 20.))))


@triton.jit
def _delta_step_kernel(q, k, v, a, b, A_log, dt_bias, pool, index, valid, o, scale, SQR, SQH, SKR, SKH, SVR, SVH,
                       SAR, SBR, SP, SPH, SPV, SPK, HV: tl.constexpr, HG: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                       BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, L2NORM: tl.constexpr,
                       HAS_VALID: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hq = h // HG
    row, ms, keep, ck, cv, k_ok, v_ok = pool_tile(pool, index, valid, r, h, SP, SPH, SPV, SPK, K, V, BK, BV,
                                                  HAS_VALID)
    state = tl.load(row, mask=ms, other=0.)
    qr = tl.load(q + r * SQR + hq * SQH + ck, mask=k_ok, other=0.).to(tl.float32)
    kr = tl.load(k + r * SKR + hq * SKH + ck, mask=k_ok, other=0.).to(tl.float32)
    if L2NORM:
        qr = qr * tl.rsqrt(tl.sum(qr * qr) + 1e-6)
        kr = kr * tl.rsqrt(tl.sum(kr * kr) + 1e-6)
    vr = tl.load(v + r * SVR + h * SVH + cv, mask=v_ok, other=0.).to(tl.float32)
    br = tl.load(b + r * SBR + h).to(tl.float32)
    if BETA_SIGMOID:
        br = tl.sigmoid(br)
        if NEG_EIGVAL:
            br = br * 2.
    if GATE == 1:  # a: the gate's raw input, GatedDeltaNet's in-kernel form
        ar = tl.load(a + r * SAR + h).to(tl.float32)
        gr = -tl.exp(tl.load(A_log + h).to(tl.float32)) * _softplus(ar + tl.load(dt_bias + h).to(tl.float32))
        state = state * tl.exp(gr)
    elif GATE == 2:  # a: the log decay itself
        state = state * tl.exp(tl.load(a + r * SAR + h).to(tl.float32))
    delta = (vr - tl.sum(state * kr[None, :], axis=1)) * br
    state = state + delta[:, None] * kr[None, :]
    out = tl.sum(state * qr[None, :], axis=1) * scale
    if HAS_VALID:
        out = tl.where(keep, out, 0.)
    tl.store(o + (r * HV + h) * V + cv, out.to(o.dtype.element_ty), mask=v_ok)
    # every load of this row's state happened above, so writing it in place is safe (rows are distinct)
    tl.store(row, state, mask=ms)


def _tensor(name, x, dtypes, shape, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {x.dtype} not supported (one of {', '.join(map(str, dtypes))})")
    if tuple(x.shape) != tuple(shape) or x.device != device:
        raise ValueError(f"{name}: expected shape {list(shape)} on {device}, got {list(x.shape)} on {x.device}")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def gated_delta_step(q, k, v, b, pool, index, valid=None, a=None, A_log=None, dt_bias=None, scale=None,
                     beta_sigmoid=True, allow_neg_eigval=False, l2norm=True, state_v_first=True):
    """One decode token per row r of the gated delta rule, on the states pool[index[r]] in place.

    q, k [R, H, K]; v [R, HV, V] (HV a multiple of H; fp16, bf16 or fp32, one dtype; the last dim contiguous);
    b [R, HV] beta (its logits with ``beta_sigmoid``); a [R, HV]: with A_log and dt_bias [HV] the gate's raw
    input (GatedDeltaNet: g = -exp(A_log) softplus(a + dt_bias)), without them the log decay g itself, None: no
    decay (DeltaNet); pool [P, HV, V, K] fp32 (``state_v_first``, GatedDeltaNet's layout) or [P, HV, K, V]
    (DeltaNet's); index [R] int64 or int32 (distinct rows);
    valid [R] bool or None: a False row outputs 0 and leaves the pool untouched; scale: K^-0.5 by default;
    l2norm: fla's in-kernel q/k normalisation (q, k are taken as they are without it).
    Returns o [R, HV, V] in v's dtype. Inference only; no host sync, so it can be captured in a CUDA graph.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise TypeError(f"q: expected a [R, H, K] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    R, H, K = q.shape
    dev = q.device
    _tensor('q', q, FLOATS, (R, H, K), dev)
    _tensor('k', k, (q.dtype,), (R, H, K), dev)
    if not isinstance(v, torch.Tensor) or v.dim() != 3 or v.shape[0] != R:
        raise ValueError(f"v: expected [{R}, HV, V], got {getattr(v, 'shape', type(v).__name__)}")
    HV, V = v.shape[1:]
    _tensor('v', v, (q.dtype,), (R, HV, V), dev)
    if H == 0 or HV % H or not 0 < K <= MAX_K or V == 0:
        raise ValueError(f"q, v: {HV} value heads per {H} q/k heads, K = {K} (1..{MAX_K}), V = {V}: not supported")
    _tensor('b', b, FLOATS, (R, HV), dev)
    gate = 0 if a is None else 1 if A_log is not None else 2
    if a is not None:
        _tensor('a', a, FLOATS, (R, HV), dev)
    if (A_log is None) != (dt_bias is None) or (gate == 0 and A_log is not None):
        raise ValueError("A_log, dt_bias: give both with a (the gate's raw input), or neither")
    if gate == 1:
        _tensor('A_log', A_log, FLOATS, (HV,), dev)
        _tensor('dt_bias', dt_bias, FLOATS, (HV,), dev)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, a, b, A_log, dt_bias)):
        raise RuntimeError("gated_delta_step is inference-only (no autograd)")
    state = (V, K) if state_v_first else (K, V)
    _tensor('pool', pool, (torch.float32,), (pool.shape[0], HV) + state if isinstance(pool, torch.Tensor) else (),
            dev)
    SPV, SPK = pool.stride()[2:] if state_v_first else pool.stride()[:1:-1]
    if (HV - 1) * pool.stride(1) + (V - 1) * SPV + (K - 1) * SPK >= 2**31:
        raise ValueError(f"pool: a row's elements need int32 offsets (strides {pool.stride()})")
    _tensor('index', index, (torch.int64, torch.int32), (R,), dev)
    if valid is not None:
        _tensor('valid', valid, (torch.bool,), (R,), dev)
        valid = valid.contiguous().view(torch.uint8)  # bytes: bool pointers are not portable across backends
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    b = b if b.stride(-1) == 1 else b.contiguous()
    a = b if a is None else a if a.stride(-1) == 1 else a.contiguous()  # (b: a placeholder pointer)
    A_log, dt_bias = (b, b) if gate != 1 else (A_log.contiguous(), dt_bias.contiguous())
    o = torch.empty(R, HV, V, device=dev, dtype=v.dtype)
    if R:
        BV = min(BLOCK_V, triton.next_power_of_2(V))
        _delta_step_kernel[(R, HV, triton.cdiv(V, BV))](
            q, k, v, a, b, A_log, dt_bias, pool, index.contiguous(), valid, o,
            float(K ** -0.5 if scale is None else scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), a.stride(0), b.stride(0), pool.stride(0), pool.stride(1), SPV, SPK,
            HV=HV, HG=HV // H, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, GATE=gate,
            BETA_SIGMOID=bool(beta_sigmoid), NEG_EIGVAL=bool(allow_neg_eigval), L2NORM=bool(l2norm),
            HAS_VALID=valid is not None)
    return o
