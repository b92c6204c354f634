"""Triton kernels: the scalar-decay gated linear recurrence over packed segments (Mamba2's SSD, RetNet-style
and plain linear attention), chunked for training and one token at a time for decoding.

Per packed segment and head h, with q and k shared by the heads of a group (group = h // (H // G)) and the
state S [V, K] (mamba-ssm's ssm_state layout [headdim, d_state]):
    S_t = exp(g_t) S_{t-1} + v_t k_t^T          o_t = scale * S_t q_t
Mamba2 passes k = B, q = C, v = dt * x, g = dt * A (g <= 0: a decay; not checked, that would sync).

Layouts: q, k [S, G, K]; v [S, H, V]; g [S, H]; cu_seqlens [N+1] (segments contiguous and time-ordered,
empty ones allowed); states [N, H, V, K] fp32 (the decode pool [P, H, V, K] fp32). q, k, v may be strided
views (the split of a fused projection, say) as long as their last dim is contiguous.

Chunked form (chunk of BT rows, b_i = sum of g over the chunk up to row i, S_in the state at its start):
    o_i   = scale * (exp(b_i) S_in q_i + sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j)
    S_out = exp(b_last) S_in + sum_j exp(b_last - b_j) v_j k_j^T
The products within a chunk are tl.dot tiles (tensor cores; operands in the inputs' dtype, the fp32 state
cast to it as fla does, fp32 accumulation). Every weight is exp of a difference of cumulative log decays
that is <= 0, so nothing overflows. One program per (segment, head, V block) walks its segment's chunks in
order with the state [BV, BK] in registers: no per-chunk state is ever stored, and the grid comes from the
shapes alone (N segments), so the host needs no segment lengths and nothing syncs.

Backward, with dS the adjoint of the state ([V, K]) and dht that of the final state:
  * ``_bwd_dq_kernel`` sweeps forward, recomputing each chunk's starting state, for
        dq_i = scale * (exp(b_i) S_in^T do_i + sum_{j <= i} exp(b_i - b_j) (do_i . v_j) k_j)
  * ``_bwd_dkv_kernel`` sweeps backward carrying dS (dht at the segment's end) for
        dk_j = exp(b_last - b_j) dS_end^T v_j + scale * sum_{i >= j} exp(b_i - b_j) (do_i . v_j) q_i
        dv_j = exp(b_last - b_j) dS_end k_j   + scale * sum_{i >= j} exp(b_i - b_j) (q_i . k_j) do_i
        dS_start = exp(b_last) dS_end + scale * sum_i exp(b_i) do_i q_i^T     (at the segment start: dh0)
  * dg. With G_t = g_1 + ... + g_t (per segment), every term of o_t carries exp(G_t - G_s) (s <= t) or
    exp(G_t) (the initial state's), and every term of the final state exp(G_T - G_s) or exp(G_T). So
        dL/dG_t = do_t . o_t - sum_{i >= t} scale exp(G_i - G_t) (q_i . k_t)(do_i . v_t)
                  - exp(G_T - G_t) v_t^T dht k_t + [t = T] <dht, S_T>
                = q_t . dq_t - k_t . dk_t + [t = T] <dht, S_T>
    (q_t . dq_t = do_t . o_t; k_t . dk_t is exactly the sum of the terms in exp(-G_t); the s = t term of o_t
    and of S_T carries no decay and cancels), and dg_s = sum_{t >= s} dG_t within the segment: a reverse
    cumulative sum, taken in ``_bwd_dkv_kernel`` as it walks the chunks backwards. Everything here is
    linear in the V block's share of dq, dk and of <dht, S_T>, so each V block sums its own share and the
    launcher adds the V blocks' partial dg (and the heads' dq, dk over each group).

Offsets: a segment's row can pass 2**31 elements (v [S, H, V] from S * H * V = 2**31), so each program moves
its pointers to its chunk's first row in 64-bit arithmetic and indexes the chunk's rows from there in int32
(as in ``segment_conv``); the launcher makes sure BT rows span less than 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_wrap.kernels.rows import pool_tile

BLOCK_V = 64  # V block of the chunk kernels: the state tile [BLOCK_V, K] lives in registers
STEP_BLOCK_V = 32  # V block of the decode step (a memory-bound kernel: more programs, fewer registers)
MAX_K = 256  # the whole K dimension is one tile (the state's [BV, BK] in registers)
CHUNK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scalar_decay_reference(q, k, v, g, cu_seqlens, scale=1.0, initial_state=None, output_final_state=False):
    """The recurrence step by step over packed segments, in fp32 (fp64 stays fp64): the kernels' oracle,
    differentiable by autograd.

    q, k [S, G, K]; v [S, H, V]; g [S, H] (log decay); cu_seqlens [N+1]; initial_state [N, H, V, K] or None.
    Per segment and head h (group h // (H // G)), with state S [V, K]:
        S <- exp(g_t) S + v_t k_t^T;  o_t = scale * S q_t
    Returns o [S, H, V] (dtype of v) and the final states [N, H, V, K] fp32 (fp64 for fp64 inputs; or None).
    """
    from mom_wrap.adapters.fla_common import padded_segments
    from mom_wrap.ops import acc

    S, G, K = q.shape
    H, V = v.shape[1:]
    N = cu_seqlens.numel() - 1
    dtype = v.dtype
    rows = torch.arange(S, device=q.device)
    position = rows - cu_seqlens[torch.searchsorted(cu_seqlens[1:], rows, right=True)]
    # padded steps have g = k = v = 0: they leave the state unchanged, so the final state is exact
    segment, (q, k, v, g) = padded_segments(cu_seqlens, position, acc(q).repeat_interleave(H // G, 1),
                                            acc(k).repeat_interleave(H // G, 1), acc(v), acc(g))
    state = q.new_zeros(N, H, V, K) if initial_state is None else initial_state.to(q.dtype).clone()
    out = q.new_zeros(N, q.shape[1], H, V)
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None] + v[:, t, :, :, None] * k[:, t, :, None, :]
        out[:, t] = scale * torch.einsum('nhvk,nhk->nhv', state, q[:, t])
    return out[segment, position].to(dtype), (state if output_final_state else None)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_inputs(q, k, v, g, r0, hq, h, n_rows, t, ck, cv, SQ, SQH, SK, SKH, SV, SVH, SG, SGH,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """One chunk's q, k [BT, BK], v [BT, BV] (inputs' dtype, zero past the segment's end), the cumulative
    log decay b [BT] and b_last, the chunk's whole decay (fp32; g is zero past the end, so b_last is b's last
    entry, bit for bit). r0: the chunk's first row (int64); rows from there in int32."""
    row_ok = t < n_rows
    mk = row_ok[:, None] & (ck < K)[None, :]
    mv = row_ok[:, None] & (cv < V)[None, :]
    qc = tl.load(q + r0 * SQ + hq * SQH + t[:, None] * SQ + ck[None, :], mask=mk, other=0.)
    kc = tl.load(k + r0 * SK + hq * SKH + t[:, None] * SK + ck[None, :], mask=mk, other=0.)
    vc = tl.load(v + r0 * SV + h * SVH + t[:, None] * SV + cv[None, :], mask=mv, other=0.)
    gc = tl.load(g + r0 * SG + h * SGH + t * SG, mask=row_ok, other=0.).to(tl.float32)
    b = tl.cumsum(gc, axis=0)
    return qc, kc, vc, b, tl.sum(tl.where(t == BT - 1, b, 0.), axis=0)


@triton.jit
def _causal_decay(b, t, TRANSPOSED: tl.constexpr = False):
    """[BT, BT]: exp(b_i - b_j) at [i, j] (or [j, i] if TRANSPOSED) for j <= i, else 0 (the exponent masked
    first: exp never sees i < j)."""
    if TRANSPOSED:
        return tl.exp(tl.where(t[:, None] <= t[None, :], b[None, :] - b[:, None], float('-inf')))
    return tl.exp(tl.where(t[:, None] >= t[None, :], b[:, None] - b[None, :], float('-inf')))


@triton.jit
def _segment_tile(cu_seqlens, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """Program (segment n, head h, V block vb) of the chunk kernels: n, h, vb, the q/k group hq, the row, K
    and V offsets in a chunk, the state tile's mask, and the segment's first row (int64) and length."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    t = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    ms = (cv < V)[:, None] & (ck < K)[None, :]
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    T = (tl.load(cu_seqlens + n + 1).to(tl.int64) - bos).to(tl.int32)
    return n, h, vb, h // HG, t, ck, cv, ms, bos, T


@triton.jit
def _fwd_kernel(q, k, v, g, cu_seqlens, h0, o, ht, scale, SQ, SQH, SK, SKH, SV, SVH, SG, SGH,
                H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    n, h, vb, hq, t, ck, cv, ms, bos, T = _segment_tile(cu_seqlens, HG, K, V, BT, BK, BV)
    s_off = (n * H + h) * V * K + cv[:, None] * K + ck[None, :]
    state = tl.zeros((BV, BK), dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0 + s_off, mask=ms, other=0.)
    for c in range(0, tl.cdiv(T, BT)):
        r0 = bos + c * BT
        n_rows = T - c * BT
        qc, kc, vc, b, b_last = _chunk_inputs(q, k, v, g, r0, hq, h, n_rows, t, ck, cv, SQ, SQH, SK, SKH, SV,
                                              SVH, SG, SGH, K, V, BT)
        A = tl.dot(qc, tl.trans(kc)) * _causal_decay(b, t) * scale  # [i, j]: scale (q_i . k_j) exp(b_i - b_j)
        oc = tl.dot(A.to(vc.dtype), vc) + tl.dot(qc, tl.trans(state.to(qc.dtype))) * (scale * tl.exp(b))[:, None]
        tl.store(o + (r0 * H + h) * V + t[:, None] * (H * V) + cv[None, :], oc.to(o.dtype.element_ty),
                 mask=(t < n_rows)[:, None] & (cv < V)[None, :])
        vw = (vc * tl.exp(b_last - b)[:, None]).to(kc.dtype)
        state = state * tl.exp(b_last) + tl.dot(tl.trans(vw), kc)
    if STORE_HT:
        tl.store(ht + s_off, state, mask=ms)


@triton.jit
def _bwd_dq_kernel(q, k, v, g, cu_seqlens, h0, do, dq, qdq, scale, S, SQ, SQH, SK, SKH, SV, SVH, SG, SGH,
                   H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr):
    """The forward sweep: this V block's share of dq, per head (dq [NV, S, H, K]), and of q . dq per row
    (qdq [NV, S, H], fp32), recomputing each chunk's starting state as the forward did."""
    n, h, vb, hq, t, ck, cv, ms, bos, T = _segment_tile(cu_seqlens, HG, K, V, BT, BK, BV)
    state = tl.zeros((BV, BK), dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0 + (n * H + h) * V * K + cv[:, None] * K + ck[None, :], mask=ms, other=0.)
    for c in range(0, tl.cdiv(T, BT)):
        r0 = bos + c * BT
        n_rows = T - c * BT
        row_ok = t < n_rows
        qc, kc, vc, b, b_last = _chunk_inputs(q, k, v, g, r0, hq, h, n_rows, t, ck, cv, SQ, SQH, SK, SKH, SV,
                                              SVH, SG, SGH, K, V, BT)
        doc = tl.load(do + (r0 * H + h) * V + t[:, None] * (H * V) + cv[None, :],
                      mask=row_ok[:, None] & (cv < V)[None, :], other=0.)
        M = tl.dot(doc, tl.trans(vc)) * _causal_decay(b, t) * scale  # [i, j]: scale (do_i . v_j) exp(b_i - b_j)
        dqc = tl.dot(M.to(kc.dtype), kc) + tl.dot(doc, state.to(doc.dtype)) * (scale * tl.exp(b))[:, None]
        row = (vb.to(tl.int64) * S + r0) * H + h  # [NV, S, H] index of the chunk's first row, int64
        tl.store(dq + row * K + t[:, None] * (H * K) + ck[None, :], dqc.to(dq.dtype.element_ty),
                 mask=row_ok[:, None] & (ck < K)[None, :])
        tl.store(qdq + row + t * H, tl.sum(qc.to(tl.float32) * dqc, axis=1), mask=row_ok)
        vw = (vc * tl.exp(b_last - b)[:, None]).to(kc.dtype)
        state = state * tl.exp(b_last) + tl.dot(tl.trans(vw), kc)


@triton.jit
def _bwd_dkv_kernel(q, k, v, g, cu_seqlens, ht, dht, do, qdq, dk, dv, dg, dh0, scale, S, SQ, SQH, SK, SKH, SV,
                    SVH, SG, SGH, H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                    STORE_DH0: tl.constexpr):
    """The reverse sweep: dv, this V block's share of dk per head (dk [NV, S, H, K]) and of dg (dg [NV, S, H],
    fp32), and dh0; dS, the adjoint of the state, starts from dht at the segment's end."""
    n, h, vb, hq, t, ck, cv, ms, bos, T = _segment_tile(cu_seqlens, HG, K, V, BT, BK, BV)
    s_off = (n * H + h) * V * K + cv[:, None] * K + ck[None, :]
    dstate = tl.zeros((BV, BK), dtype=tl.float32)
    carry = 0.  # sum of dG over the rows after this chunk: dg's reverse cumulative sum across chunks
    if HAS_DHT:
        dstate = tl.load(dht + s_off, mask=ms, other=0.)
        # the final state's share of dG at the segment's last row: <dht, S_T>, S_T as the forward stored it
        carry = tl.sum(tl.sum(dstate * tl.load(ht + s_off, mask=ms, other=0.), axis=1), axis=0)
    NT = tl.cdiv(T, BT)
    for i in range(0, NT):
        c = NT - 1 - i
        r0 = bos + c * BT
        n_rows = T - c * BT
        row_ok = t < n_rows
        qc, kc, vc, b, b_last = _chunk_inputs(q, k, v, g, r0, hq, h, n_rows, t, ck, cv, SQ, SQH, SK, SKH, SV,
                                              SVH, SG, SGH, K, V, BT)
        mv = row_ok[:, None] & (cv < V)[None, :]
        doc = tl.load(do + (r0 * H + h) * V + t[:, None] * (H * V) + cv[None, :], mask=mv, other=0.)
        # transposed products ([j, i]: row j of dk and dv sums over the later rows i), dv's first, so that few
        # [BT, BT] and [BT, BK] tiles are live at once (register pressure: this is the largest of the kernels)
        decay_t = _causal_decay(b, t, TRANSPOSED=True)
        w = tl.exp(b_last - b)[:, None]  # [BT, 1]: the decay from row j to the chunk's end
        ds = dstate.to(vc.dtype)
        At = tl.dot(kc, tl.trans(qc)) * decay_t * scale  # [j, i]: scale (q_i . k_j) exp(b_i - b_j)
        dvc = tl.dot(At.to(doc.dtype), doc) + tl.dot(kc, tl.trans(ds)) * w
        tl.store(dv + (r0 * H + h) * V + t[:, None] * (H * V) + cv[None, :], dvc.to(dv.dtype.element_ty), mask=mv)
        Mt = tl.dot(vc, tl.trans(doc)) * decay_t * scale  # [j, i]: scale (do_i . v_j) exp(b_i - b_j)
        dkc = tl.dot(Mt.to(qc.dtype), qc) + tl.dot(vc, ds) * w
        row = (vb.to(tl.int64) * S + r0) * H + h  # [NV, S, H] index of the chunk's first row, int64
        tl.store(dk + row * K + t[:, None] * (H * K) + ck[None, :], dkc.to(dk.dtype.element_ty),
                 mask=row_ok[:, None] & (ck < K)[None, :])
        dG = tl.load(qdq + row + t * H, mask=row_ok, other=0.) - tl.sum(kc.to(tl.float32) * dkc, axis=1)
        dG = tl.where(row_ok, dG, 0.)
        tl.store(dg + row + t * H, tl.cumsum(dG, axis=0, reverse=True) + carry, mask=row_ok)
        carry += tl.sum(dG, axis=0)
        qw = (qc * (scale * tl.exp(b))[:, None]).to(doc.dtype)
        dstate = dstate * tl.exp(b_last) + tl.dot(tl.trans(doc), qw)
    if STORE_DH0:
        tl.store(dh0 + s_off, dstate, mask=ms)


@triton.jit
def _step_kernel(q, k, v, g, pool, index, valid, o, scale, SQR, SQG, SKR, SKG, SVR, SVH, SGR, SGH, SP, SPH, SPV,
                 H: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, HAS_VALID: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hq = h // HG
    row, ms, keep, ck, cv, k_ok, v_ok = pool_tile(pool, index, valid, r, h, SP, SPH, SPV, 1, K, V, BK, BV,
                                                  HAS_VALID)
    state = tl.load(row, mask=ms, other=0.)
    qr = tl.load(q + r * SQR + hq * SQG + ck, mask=k_ok, other=0.).to(tl.float32)
    kr = tl.load(k + r * SKR + hq * SKG + ck, mask=k_ok, other=0.).to(tl.float32)
    vr = tl.load(v + r * SVR + h * SVH + cv, mask=v_ok, other=0.).to(tl.float32)
    gr = tl.load(g + r * SGR + h * SGH).to(tl.float32)
    state = state * tl.exp(gr) + vr[:, None] * kr[None, :]
    out = tl.sum(state * qr[None, :], axis=1) * scale
    if HAS_VALID:
        out = tl.where(keep, out, 0.)
    tl.store(o + (r * H + h) * V + cv, out.to(o.dtype.element_ty), mask=v_ok)
    # every load of this row's state happened above, so writing it in place is safe (rows are distinct)
    tl.store(row, state, mask=ms)


# ---------------------------------------------------------------------------------------------- launchers


def _check_float(name, x, dtypes=DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {x.dtype} not supported (one of {', '.join(map(str, dtypes))})")


def _check_shapes(q, k, v, g, device):
    """Shapes and dtypes shared by the chunked and the step forms; returns (S, G, H, K, V)."""
    for name, x, dim in (('q', q, 3), ('k', k, 3), ('v', v, 3), ('g', g, 2)):
        _check_float(name, x)
        if x.dim() != dim:
            raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, q on {device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: dtypes {k.dtype}, {v.dtype} differ from q's {q.dtype}")
    S, G, K = q.shape
    H, V = v.shape[1:]
    if k.shape != q.shape:
        raise ValueError(f"k: shape {tuple(k.shape)}, q's is {tuple(q.shape)}")
    if v.shape[0] != S or g.shape != (S, H):
        raise ValueError(f"v, g: expected [{S}, H, V] and [{S}, H], got {tuple(v.shape)} and {tuple(g.shape)}")
    if G == 0 or H % G:
        raise ValueError(f"v: {H} heads are not a multiple of q's {G} groups")
    if not 0 < K <= MAX_K or V == 0:
        raise ValueError(f"q, v: K = {K} (1..{MAX_K}) and V = {V} (>= 1) not supported")
    return S, G, H, K, V


def _rows_ok(x, rows):
    """Whether ``rows`` rows of x span < 2**31 elements from the first one's head (the head's offset is int64
    in the kernels), and x's last dim is contiguous (q, k, v: the dim their tiles are loaded along)."""
    return (x.dim() == 2 or x.stride(-1) == 1) and rows * max(x.stride(0), 1) + x.shape[2:].numel() < 2**31


def _fit(name, x, rows):
    """x as the kernels read it: rows and heads may be strided, a chunk's rows within int32 offsets of its
    first row; a copy only where that does not hold."""
    if not _rows_ok(x, rows):
        x = x.contiguous()
        if not _rows_ok(x, rows):
            raise ValueError(f"{name}: rows of {x.shape[1:].numel()} elements are too wide for the kernels' int32 "
                             "offsets")
    return x


def _warps(BK, BV):
    """num_warps of the chunk kernels. Untuned (no GPU timings yet): chosen from ptxas' register reports for
    sm_90 (Triton 3.9, bf16, K = 128, V = 64, BT = 64): every kernel takes about 255 registers a thread at
    8 warps, and spill 0 (the forward, num_stages 3), 24 (the dq sweep, 2) and ~200 bytes (the reverse sweep,
    3, its best); with 4 warps they spill more."""
    return 8 if BK * BV >= 64 * 64 else 4


def chunk_forward(q, k, v, g, cu_seqlens, initial_state, scale, output_final_state, BT):
    """The chunk kernels' forward launch (arguments as ``chunk_scalar_decay`` checked them): returns o [S, H, V],
    the final states (or None) and (q, k, v, g) as the kernels read them (``_fit``), which the backward takes."""
    S, G, K = q.shape
    H, V = v.shape[1:]
    N = cu_seqlens.numel() - 1
    q, k, v, g = (_fit(name, x, BT) for name, x in (('q', q), ('k', k), ('v', v), ('g', g)))
    BK, BV = _blocks(K, V)
    o = torch.empty(S, H, V, device=q.device, dtype=v.dtype)
    ht = torch.empty(N, H, V, K, device=q.device, dtype=torch.float32) if output_final_state else None
    if N:
        _fwd_kernel[(N, H, triton.cdiv(V, BV))](
            q, k, v, g, cu_seqlens, initial_state, o, ht, scale, *_strides(q, k, v, g), H=H, HG=H // G, K=K,
            V=V, BT=BT, BK=BK, BV=BV, HAS_H0=initial_state is not None, STORE_HT=output_final_state,
            num_warps=_warps(BK, BV), num_stages=3)
    return o, ht, (q, k, v, g)


def chunk_backward(q, k, v, g, cu_seqlens, initial_state, ht, do, dht, scale, BT, want_dh0):
    """The chunk kernels' backward launch: q, k, v, g as ``chunk_forward`` returned them, ht its final states (or
    None), do [S, H, V] (or None: zeros) and dht (or None). Returns dq, dk (q's, k's dtypes), dv (v's), dg (fp32)
    and dh0 (or None)."""
    S, G, K = q.shape
    H, V = v.shape[1:]
    N = cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    HG = H // G
    do = torch.zeros(S, H, V, device=v.device, dtype=v.dtype) if do is None else do.contiguous()
    has_dht = dht is not None and ht is not None
    # per head and V block: the shares the launcher adds over each group and V (fp32 unless one share)
    part = torch.float32 if NV > 1 or HG > 1 else None
    dq = torch.empty(NV, S, H, K, device=q.device, dtype=part or q.dtype)
    dk = torch.empty(NV, S, H, K, device=q.device, dtype=part or k.dtype)
    dv = torch.empty(S, H, V, device=q.device, dtype=v.dtype)
    qdq = torch.empty(NV, S, H, device=q.device, dtype=torch.float32)
    dg = torch.empty(NV, S, H, device=q.device, dtype=torch.float32)
    want_dh0 = initial_state is not None and want_dh0
    dh0 = torch.empty_like(initial_state) if want_dh0 else None
    if N:
        grid = (N, H, NV)
        meta = dict(H=H, HG=HG, K=K, V=V, BT=BT, BK=BK, BV=BV, num_warps=_warps(BK, BV))
        strides = _strides(q, k, v, g)
        _bwd_dq_kernel[grid](q, k, v, g, cu_seqlens, initial_state, do, dq, qdq, scale, S, *strides,
                             HAS_H0=initial_state is not None, num_stages=2, **meta)
        _bwd_dkv_kernel[grid](q, k, v, g, cu_seqlens, ht, dht.contiguous() if has_dht else None, do, qdq, dk,
                              dv, dg, dh0, scale, S, *strides, HAS_DHT=has_dht,
                              STORE_DH0=want_dh0, num_stages=3, **meta)
    dq = dq.view(NV, S, G, HG, K).sum((0, 3)) if part else dq[0]
    dk = dk.view(NV, S, G, HG, K).sum((0, 3)) if part else dk[0]
    dg = dg.sum(0) if NV > 1 else dg[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0


def _blocks(K, V):
    """The kernels' K and V tile sizes (BK, BV)."""
    return max(16, triton.next_power_of_2(K)), max(16, min(BLOCK_V, triton.next_power_of_2(V)))


class _ChunkScalarDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, cu_seqlens, initial_state, scale, output_final_state, BT):
        ctx.set_materialize_grads(False)
        o, ht, (q, k, v, g) = chunk_forward(q, k, v, g, cu_seqlens, initial_state, scale, output_final_state, BT)
        ctx.save_for_backward(q, k, v, g, cu_seqlens, initial_state, ht)
        ctx.meta = (scale, BT)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, cu_seqlens, initial_state, ht = ctx.saved_tensors
        scale, BT = ctx.meta
        dq, dk, dv, dg, dh0 = chunk_backward(q, k, v, g, cu_seqlens, initial_state, ht, do, dht, scale, BT,
                                             ctx.needs_input_grad[5])
        return dq, dk, dv, dg.to(g.dtype), None, dh0, None, None, None


def _strides(q, k, v, g):
    return q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1)


def check_chunk_arguments(q, k, v, g, cu_seqlens, cu_seqlens_cpu, initial_state, chunk_size):
    """``chunk_scalar_decay``'s checks of its arguments (a clear error naming the argument, never a kernel's crash);
    returns initial_state as the kernels take it (fp32, contiguous, differentiable) or None."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a tensor, got {type(q).__name__}")
    S, G, H, K, V = _check_shapes(q, k, v, g, q.device)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cu_seqlens: expected an int64 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected [N+1] on {q.device}, got {tuple(cu_seqlens.shape)} on "
                         f"{cu_seqlens.device}")
    N = cu_seqlens.numel() - 1
    if cu_seqlens_cpu is not None:
        c = cu_seqlens_cpu
        if c.device.type != 'cpu' or c.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_cpu: expected a CPU tensor of shape {tuple(cu_seqlens.shape)}")
        if c[0] != 0 or c[-1] != S or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens_cpu: expected 0 = c[0] <= c[1] <= ... <= c[N] = {S}, got {c.tolist()}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: {chunk_size} not one of {CHUNK_SIZES}")
    if initial_state is not None:
        _check_float('initial_state', initial_state, DTYPES + (torch.float64,))
        if initial_state.shape != (N, H, V, K) or initial_state.device != q.device:
            raise ValueError(f"initial_state: expected [{N}, {H}, {V}, {K}] on {q.device}, got "
                             f"{tuple(initial_state.shape)} on {initial_state.device}")
        initial_state = initial_state.float().contiguous()  # differentiable: its gradient flows back cast
    return initial_state


def chunk_scalar_decay(q, k, v, g, cu_seqlens, cu_seqlens_cpu=None, scale=1.0, initial_state=None,
                       output_final_state=False, chunk_size=64):
    """The recurrence over packed segments, chunked, forward and backward in Triton.

    q, k [S, G, K]; v [S, H, V] (H a multiple of G; fp16, bf16 or fp32, one dtype; rows and heads may be
    strided, the last dim contiguous); g [S, H] log decay (<= 0, any float dtype); cu_seqlens [N+1] int64
    (or int32) on q's device: segment n is rows cu_seqlens[n]:cu_seqlens[n+1] (empty segments allowed);
    initial_state [N, H, V, K] or None (cast to fp32). K <= 256 (one tile), chunk_size in 16/32/64/128.

    Returns o [S, H, V] in v's dtype and, with output_final_state, the final states [N, H, V, K] fp32 (else
    None). Gradients flow to q, k, v, g and initial_state, and from o and the final state.

    cu_seqlens_cpu: a CPU copy of cu_seqlens, used only to check the segments (first 0, non-decreasing, last
    S) when the caller has it. The kernels run one program per segment (and head and V block), so the grid
    comes from cu_seqlens' shape and no segment length is needed on the host: without it nothing syncs and
    nothing is copied (device-side cu_seqlens are trusted).
    """
    initial_state = check_chunk_arguments(q, k, v, g, cu_seqlens, cu_seqlens_cpu, initial_state, chunk_size)
    return _ChunkScalarDecay.apply(q, k, v, g, cu_seqlens.contiguous(), initial_state, float(scale),
                                   bool(output_final_state), chunk_size)


def scalar_decay_step(q, k, v, g, pool, index, valid=None, scale=1.0):
    """One decode token per row r, reading and updating its state in the pool in place.

    q, k [R, G, K]; v [R, H, V] (fp16, bf16 or fp32, one dtype); g [R, H] log decay; pool [P, H, V, K] fp32
    (last dim contiguous); index [R] int64 (or int32): row r's state is pool[index[r]] (distinct rows); valid
    [R] bool or None: a False row outputs 0 and leaves the pool (and its index) untouched. Per row and head:
        pool[index[r], h] <- exp(g[r, h]) pool[index[r], h] + v[r, h] k[r, group]^T
        o[r, h] = scale * pool[index[r], h] q[r, group]
    Returns o [R, H, V] in v's dtype. Inference only (no autograd); no host sync and no allocation but the
    output (strided q, k, v, g are read as they are), so it can be captured in a CUDA graph.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a tensor, got {type(q).__name__}")
    R, G, H, K, V = _check_shapes(q, k, v, g, q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g)):
        raise RuntimeError("scalar_decay_step is inference-only; use chunk_scalar_decay under autograd")
    _check_float('pool', pool, (torch.float32,))
    if pool.dim() != 4 or pool.shape[1:] != (H, V, K) or pool.device != q.device:
        raise ValueError(f"pool: expected [P, {H}, {V}, {K}] on {q.device}, got {tuple(pool.shape)} on {pool.device}")
    if pool.stride(-1) != 1 or (H - 1) * pool.stride(1) + (V - 1) * pool.stride(2) + K >= 2**31:
        raise ValueError(f"pool: a row needs its last dim contiguous and int32 offsets (strides {pool.stride()})")
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index: expected an int64 tensor, got {getattr(index, 'dtype', type(index))}")
    if index.shape != (R,) or index.device != q.device:
        raise ValueError(f"index: expected [{R}] on {q.device}, got {tuple(index.shape)} on {index.device}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid: expected a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
        if valid.shape != (R,) or valid.device != q.device:
            raise ValueError(f"valid: expected [{R}] on {q.device}, got {tuple(valid.shape)} on {valid.device}")
        valid = valid.contiguous().view(torch.uint8)  # bytes: bool pointers are not portable across backends
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    index = index.contiguous()
    o = torch.empty(R, H, V, device=q.device, dtype=v.dtype)
    if R:
        BK = triton.next_power_of_2(K)
        BV = min(STEP_BLOCK_V, triton.next_power_of_2(V))
        _step_kernel[(R, H, triton.cdiv(V, BV))](
            q, k, v, g, pool, index, valid, o, float(scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), g.stride(0), g.stride(1), pool.stride(0), pool.stride(1), pool.stride(2),
            H=H, HG=H // G, K=K, V=V, BK=BK, BV=BV, HAS_VALID=valid is not None)
    return o
