"""The scalar-decay recurrence (Mamba2's SSD): the PyTorch reference against independent formulations, and our
Triton kernels (chunked forward and backward, the decode step) against the reference; on the CPU through
Triton's interpreter."""
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

from mom_wrap.kernels import scalar_decay as sd
from mom_wrap.kernels.scalar_decay import chunk_scalar_decay, scalar_decay_reference, scalar_decay_step

needs_triton = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                  reason='needs TRITON_INTERPRET=1 or CUDA')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# fp32 dots are TF32 on a GPU unless TRITON_F32_DEFAULT=ieee (mom_wrap.check sets it); the interpreter's are fp32
IEEE_DOTS = os.environ.get('TRITON_INTERPRET') == '1' or os.environ.get('TRITON_F32_DEFAULT') == 'ieee'
FP32_TOL = 2e-5 if IEEE_DOTS else 5e-3
# segments shorter than, as long as and longer than a chunk of 16, empty and of one row
LENGTHS = [0, 1, 16, 5, 37, 0, 70]


def bf16_dots_under_interpreter():
    """Triton's interpreter (3.9) stores bf16 as uint16 and its tl.dot multiplies those raw bits; this makes its
    dot read bf16 operands as the fp32 numbers they are, as a GPU does. Returns the original dot (to restore)."""
    import triton.language as tl
    from triton.runtime import interpreter
    dot = interpreter.InterpreterBuilder.create_dot

    def f32(x):
        if x.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *args: dot(self, f32(a), f32(b), *args)
    return dot


@pytest.fixture(autouse=True)
def _bf16_dots():
    if os.environ.get('TRITON_INTERPRET') != '1':
        yield
        return
    dot = bf16_dots_under_interpreter()
    try:
        yield
    finally:
        from triton.runtime import interpreter
        interpreter.InterpreterBuilder.create_dot = dot


def inputs(lengths, G, H, K, V, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    S, N = sum(lengths), len(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    q = torch.randn(S, G, K, generator=g, dtype=dtype)
    k = torch.randn(S, G, K, generator=g, dtype=dtype) * K ** -0.5
    v = torch.randn(S, H, V, generator=g, dtype=dtype)
    # log decays from about 0 to -1.5 (Mamba2: dt * A), a few steps that forget almost everything
    gate = -torch.rand(S, H, generator=g, dtype=dtype) ** 2 * 1.5
    h0 = torch.randn(N, H, V, K, generator=g, dtype=dtype)
    return q, k, v, gate, cu, h0


def dense(q, k, v, g, cu, scale, h0):
    """Each segment as masked attention: o = scale ((q k^T) * exp(G_i - G_j) * causal) v + scale exp(G_i) S0 q,
    final = exp(G_T) S0 + sum_j exp(G_T - G_j) v_j k_j^T, G the cumulative log decay (fp64)."""
    H = v.shape[1]
    rep = H // q.shape[1]
    o, final = torch.zeros_like(v), h0.clone()
    for n in range(cu.numel() - 1):
        rows = slice(int(cu[n]), int(cu[n + 1]))
        for h in range(H):
            qs, ks, vs = q[rows, h // rep], k[rows, h // rep], v[rows, h]
            Gc = g[rows, h].cumsum(0)
            T = Gc.numel()
            D = torch.tril(torch.exp(Gc[:, None] - Gc[None, :]))
            o[rows, h] = scale * ((qs @ ks.T) * D) @ vs + scale * Gc.exp()[:, None] * (qs @ h0[n, h].T)
            if T:
                w = torch.exp(Gc[-1] - Gc)
                final[n, h] = Gc[-1].exp() * h0[n, h] + (vs * w[:, None]).T @ ks
    return o, final


def rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def test_reference_matches_dense_masked_attention():
    q, k, v, g, cu, h0 = inputs([0, 1, 7, 3, 12], G=2, H=4, K=5, V=3, dtype=torch.float64)
    o, ht = scalar_decay_reference(q, k, v, g, cu, scale=0.6, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = dense(q, k, v, g, cu, 0.6, h0)
    assert o.dtype == torch.float64 and ht.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-12 and rel_err(ht, ht_ref) < 1e-12
    o2, none = scalar_decay_reference(q, k, v, g, cu, scale=0.6)
    assert none is None
    assert rel_err(o2, dense(q, k, v, g, cu, 0.6, torch.zeros_like(h0))[0]) < 1e-12


def test_reference_matches_fla_naive_simple_gla():
    """fla's step-by-step simple GLA (state [K, V], so ours transposed; one group per head) on segments of one
    length, as a batch."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    B, T, H, K, V = 3, 9, 2, 6, 4
    q, k, v, g, cu, h0 = inputs([T] * B, G=H, H=H, K=K, V=V)
    o, ht = scalar_decay_reference(q, k, v, g, cu, scale=0.5, initial_state=h0, output_final_state=True)
    o_fla, ht_fla = naive_recurrent_simple_gla(*(x.view(B, T, *x.shape[1:]) for x in (q, k, v, g)), scale=0.5,
                                               initial_state=h0.transpose(-1, -2).clone(), output_final_state=True)
    assert rel_err(o, o_fla.reshape(B * T, H, V)) < 1e-5
    assert rel_err(ht, ht_fla.transpose(-1, -2)) < 1e-5


# name: (dtype, chunk_size, G, H, K, V, BLOCK_V, initial state, the loss reads (o, final state), strided inputs)
CASES = {
    'fp32-c16-groups-h0-dht-vsplit': (torch.float32, 16, 2, 4, 12, 20, 16, True, 'o+ht', False),
    'fp32-c64-nogroups': (torch.float32, 64, 2, 2, 16, 16, 64, False, 'o', False),
    'fp32-c32-one-group-strided': (torch.float32, 32, 1, 3, 8, 24, 64, True, 'o+unused ht', True),
    'fp32-c16-final-state-only': (torch.float32, 16, 2, 4, 12, 20, 64, True, 'ht', False),
    'bf16-c16-groups-h0-dht': (torch.bfloat16, 16, 2, 4, 12, 20, 64, True, 'o+ht', False),
    'bf16-c64-vsplit-strided': (torch.bfloat16, 64, 1, 2, 32, 40, 32, False, 'o+ht', True),
    'fp16-c32': (torch.float16, 32, 2, 4, 16, 16, 64, True, 'o+ht', False),
}


@needs_triton
@pytest.mark.parametrize('case', list(CASES))
def test_chunk_matches_reference(case, monkeypatch):
    """o, the final state and the gradients of q, k, v, g and the initial state against autograd through the
    reference (fp32, on the same rounded inputs), with a random gradient of o and of the final state."""
    dtype, chunk, G, H, K, V, block_v, use_h0, loss, strided = CASES[case]
    monkeypatch.setattr(sd, 'BLOCK_V', block_v)
    q, k, v, g, cu, h0 = inputs(LENGTHS, G, H, K, V)
    q, k, v = (x.to(dtype) for x in (q, k, v))  # g stays fp32 (Mamba2: dt * A in fp32)
    gen = torch.Generator().manual_seed(2)
    S, N = q.shape[0], cu.numel() - 1
    do = torch.randn(S, H, V, generator=gen).to(dtype)
    dht = torch.randn(N, H, V, K, generator=gen)
    out = {}
    for backend in ('reference', 'triton'):
        leaves = [x.detach().clone().to(DEVICE) for x in (q, k, v, g)]
        if strided and backend == 'triton':  # q, k, v as column slices of one fused projection (Mamba2's xBC)
            fused = torch.cat([x.flatten(1) for x in leaves[:3]] + [torch.zeros(S, 3, dtype=dtype)], 1)
            widths = np.cumsum([0, G * K, G * K, H * V])
            leaves[:3] = [fused[:, widths[i]:widths[i + 1]].view(x.shape) for i, x in enumerate(leaves[:3])]
            assert leaves[2].stride(0) == fused.shape[1]
        leaves = [x.requires_grad_() for x in leaves]
        state = h0.clone().to(DEVICE).requires_grad_() if use_h0 else None
        final = loss != 'o'
        if backend == 'reference':
            o, ht = scalar_decay_reference(*leaves, cu.to(DEVICE), scale=0.7, initial_state=state,
                                           output_final_state=final)
        else:
            o, ht = chunk_scalar_decay(*leaves, cu.to(DEVICE), cu_seqlens_cpu=cu, scale=0.7, initial_state=state,
                                       output_final_state=final, chunk_size=chunk)
        assert o.dtype == dtype and o.shape == (S, H, V)
        assert (ht is None) == (not final) and (ht is None or ht.dtype == torch.float32)
        terms = {'o': [(o, do)], 'ht': [(ht, dht)], 'o+ht': [(o, do), (ht, dht)], 'o+unused ht': [(o, do)]}[loss]
        wrt = leaves + ([state] if use_h0 else [])
        grads = torch.autograd.grad([t for t, _ in terms], wrt, [d.to(DEVICE) for _, d in terms], allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads)]  # q, if only ht is read
        out[backend] = [o] + ([ht] if final else []) + grads
    names = ['o'] + (['ht'] if loss != 'o' else []) + ['dq', 'dk', 'dv', 'dg'] + (['dh0'] if use_h0 else [])
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    for name, ref, got in zip(names, out['reference'], out['triton']):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        err = rel_err(got.cpu(), ref.cpu())
        assert err < tol, (name, err)


@needs_triton
def test_chunk_without_rows():
    """No rows at all, only empty segments: o is empty, the final states are the initial ones and their
    gradient passes through unchanged."""
    q, k, v, g, cu, h0 = inputs([0, 0], G=1, H=2, K=4, V=4)
    state = h0.to(DEVICE).requires_grad_()
    o, ht = chunk_scalar_decay(*(x.to(DEVICE) for x in (q, k, v, g)), cu.to(DEVICE), initial_state=state,
                               output_final_state=True)
    assert o.shape == (0, 2, 4) and torch.equal(ht.cpu(), h0)
    dht = torch.randn_like(ht)
    assert torch.equal(torch.autograd.grad(ht, state, dht)[0], dht)
    o, ht = chunk_scalar_decay(*(x.to(DEVICE) for x in (q, k, v, g)), cu[:1].to(DEVICE), output_final_state=True)
    assert o.shape == (0, 2, 4) and ht.shape == (0, 2, 4, 4)


@needs_triton
def test_chunk_initial_state_without_grad():
    """An initial state that needs no gradient (and int32 cu_seqlens): no dh0, the other gradients as before."""
    q, k, v, g, cu, h0 = inputs([3, 20], G=1, H=2, K=8, V=8)
    grads = []
    for fn, kw in ((scalar_decay_reference, {}), (chunk_scalar_decay, dict(chunk_size=16))):
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (q, k, v, g)]
        o, _ = fn(*leaves, cu.to(DEVICE, torch.int32), initial_state=h0.to(DEVICE), **kw)
        grads.append(torch.autograd.grad(o.sum(), leaves))
    for ref, got in zip(*grads):
        assert rel_err(got.cpu(), ref.cpu()) < FP32_TOL


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_step_matches_reference_in_place(dtype, monkeypatch):
    """Four decode steps on rows of a strided pool (a slice of a bigger buffer, updated in place): each valid
    row's outputs and final state are the reference's over the four tokens as one segment; the row that is
    never valid outputs zeros, and every pool row not stepped (its own included) stays bit-identical."""
    monkeypatch.setattr(sd, 'STEP_BLOCK_V', 16)  # V = 20: two V blocks, the second partial
    R, P, G, H, K, V, steps = 4, 9, 2, 4, 12, 20, 4
    q, k, v, g, _, _ = inputs([R * steps], G, H, K, V, dtype=dtype, seed=3)
    q, k, v, g = (x.view(steps, R, *x.shape[1:]) for x in (q, k, v, g))  # token t of row r at [t, r]
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(P, H + 1, V, K, generator=gen)
    pool = big.to(DEVICE)[:, 1:]  # not contiguous: heads 1.. of a wider buffer
    before = pool.clone().cpu()
    index = torch.tensor([7, 0, 3, 5])
    valid = torch.tensor([True, False, True, True])
    outs = []
    with torch.no_grad():
        for t in range(steps):
            outs.append(scalar_decay_step(q[t].to(DEVICE), k[t].to(DEVICE), v[t].to(DEVICE), g[t].to(DEVICE), pool,
                                          index.to(DEVICE), valid.to(DEVICE), scale=0.7))
    o = torch.stack(outs).cpu()  # [steps, R, H, V]
    assert o.dtype == dtype and torch.equal(o[:, 1], torch.zeros_like(o[:, 1]))
    # the reference: row r's tokens as one segment of length `steps`, from the pool's row
    seq = [x.transpose(0, 1).flatten(0, 1) for x in (q, k, v, g)]  # [R * steps, ...], row-major
    o_ref, ht_ref = scalar_decay_reference(*seq, torch.arange(R + 1) * steps, scale=0.7,
                                           initial_state=before[index], output_final_state=True)
    o_ref = o_ref.view(R, steps, H, V).transpose(0, 1)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    keep = valid.nonzero()[:, 0]
    assert rel_err(o[:, keep], o_ref[:, keep]) < tol
    assert rel_err(pool.cpu()[index[keep]], ht_ref[keep]) < 2e-5  # the state is fp32 in both
    untouched = torch.ones(P, dtype=torch.bool)
    untouched[index[keep]] = False
    assert torch.equal(pool.cpu()[untouched], before[untouched])
    assert torch.equal(big[:, 0], big.to(DEVICE)[:, 0].cpu())  # the head outside the view
    # no valid mask: every row steps; an index that names no row is fine where the row is invalid
    with torch.no_grad():
        o1 = scalar_decay_step(q[0].to(DEVICE), k[0].to(DEVICE), v[0].to(DEVICE), g[0].to(DEVICE), pool,
                               torch.tensor([2, 1, 4, 6], device=DEVICE))
        o2 = scalar_decay_step(q[0].to(DEVICE), k[0].to(DEVICE), v[0].to(DEVICE), g[0].to(DEVICE), pool,
                               torch.tensor([8, 10**9, -5, 0], device=DEVICE),
                               torch.tensor([True, False, False, True], device=DEVICE))
    assert o1.shape == (R, H, V) and torch.equal(o2[1:3].cpu(), torch.zeros(2, H, V, dtype=dtype))


def test_argument_errors():
    q, k, v, g, cu, h0 = inputs([3, 2], G=2, H=4, K=8, V=8)
    ok = dict(q=q, k=k, v=v, g=g, cu_seqlens=cu)
    bad = [
        (TypeError, 'q', dict(q=q.long())),
        (TypeError, 'k, v', dict(k=k.bfloat16())),
        (TypeError, 'g', dict(g=g.long())),
        (ValueError, 'k', dict(k=k[:, :1])),
        (ValueError, 'v', dict(v=v[:, :3])),
        (ValueError, 'g', dict(g=g[:, :2])),
        (ValueError, 'q', dict(q=q[0])),
        (TypeError, 'cu_seqlens', dict(cu_seqlens=cu.float())),
        (ValueError, 'cu_seqlens', dict(cu_seqlens=cu[None])),
        (ValueError, 'cu_seqlens_cpu', dict(cu_seqlens_cpu=torch.tensor([0, 3, 4]))),
        (ValueError, 'cu_seqlens_cpu', dict(cu_seqlens_cpu=torch.tensor([0, 3]))),
        (ValueError, 'initial_state', dict(initial_state=h0[:1])),
        (TypeError, 'initial_state', dict(initial_state=h0.int())),
        (ValueError, 'chunk_size', dict(chunk_size=48)),
        (ValueError, 'K', dict(q=torch.zeros(5, 2, 300), k=torch.zeros(5, 2, 300))),
    ]
    for error, name, change in bad:
        with pytest.raises(error, match=name):
            chunk_scalar_decay(**{**ok, **change})
    pool = torch.zeros(6, 4, 8, 8)
    index = torch.tensor([0, 2])
    step = dict(q=q[:2], k=k[:2], v=v[:2], g=g[:2], pool=pool, index=index)
    bad = [
        (TypeError, 'pool', dict(pool=pool.bfloat16())),
        (ValueError, 'pool', dict(pool=pool[:, :2])),
        (ValueError, 'pool', dict(pool=pool.transpose(2, 3))),
        (TypeError, 'index', dict(index=index.float())),
        (ValueError, 'index', dict(index=index[:1])),
        (TypeError, 'valid', dict(valid=torch.ones(2, dtype=torch.int64))),
        (ValueError, 'valid', dict(valid=torch.ones(3, dtype=torch.bool))),
        (ValueError, 'v', dict(v=v[:3])),
        (RuntimeError, 'inference-only', dict(q=q[:2].requires_grad_())),
    ]
    for error, name, change in bad:
        with pytest.raises(error, match=name):
            scalar_decay_step(**{**step, **change})


def run_isolated(case: str) -> None:
    """``case()`` (a function of this module) in a child process, as in ``test_kernels_large.py``: a wrapped
    offset is a segfault under the interpreter more often than a wrong value."""
    env = dict(os.environ, PYTHONFAULTHANDLER='1')
    done = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout, end='')
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


@needs_triton
def test_chunk_rows_past_2_31():
    """Forward and backward of ``chunk_scalar_decay`` (bf16) on S = 2**26 + 40 rows of G = H = 2 heads of
    K = V = 16: q, k, v, o, do, dv, dq and dk [S, 2, 16] (4 GiB each, lazily committed on the CPU) have their
    element offsets pass 2**31 at row 2**26. Three segments at the end, the middle one's chunks crossing row
    2**26; the rows before the first segment are never touched (the kernels read only the rows cu_seqlens
    names). Checked against the reference on a compact copy of those rows."""
    run_isolated('case_chunk_rows_past_2_31')


def case_chunk_rows_past_2_31():
    S0, G, H, K, V = 2**26, 2, 2, 16, 16
    lengths = [10, 30, 30]
    first = S0 - 40
    S = first + sum(lengths)
    q, k, v, g, cu, h0 = inputs(lengths, G, H, K, V, seed=11)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    do = torch.randn(sum(lengths), H, V, generator=torch.Generator().manual_seed(12)).bfloat16()
    big = [torch.empty(S, *x.shape[1:], dtype=x.dtype, device=DEVICE) for x in (q, k, v, g, do)]
    for b, x in zip(big, (q, k, v, g, do)):
        b[first:] = x.to(DEVICE)
    assert (first + 16) * H * V < 2**31 < (S - 1) * H * V
    leaves = [x.requires_grad_() for x in big[:4]]
    o, ht = chunk_scalar_decay(*leaves, (cu + first).to(DEVICE), initial_state=h0.to(DEVICE),
                               output_final_state=True, chunk_size=16)
    grads = torch.autograd.grad(o, leaves, big[4])
    got = [o[first:], ht] + [d[first:] for d in grads]
    qs, ks, vs, gs = (x.detach().clone().requires_grad_() for x in (q, k, v, g))
    o_ref, ht_ref = scalar_decay_reference(qs, ks, vs, gs, cu, initial_state=h0, output_final_state=True)
    want = [o_ref, ht_ref] + list(torch.autograd.grad(o_ref, (qs, ks, vs, gs), do))
    for name, a, b in zip(('o', 'ht', 'dq', 'dk', 'dv', 'dg'), got, want):
        err = rel_err(a.cpu(), b)
        assert err < 2e-2, (name, err)
    print('chunk past 2**31: ok')


@needs_triton
def test_step_pool_rows_past_2_31():
    """``scalar_decay_step`` on a pool [2**22 + 8, 2, 16, 16] fp32 (8 GiB, lazily committed, 4 rows touched)
    whose indexed rows start past element 2**31; the neighbouring rows keep theirs."""
    run_isolated('case_step_pool_rows_past_2_31')


def case_step_pool_rows_past_2_31():
    R, G, H, K, V = 3, 1, 2, 16, 16
    P = 2**31 // (H * V * K) + 8
    pool = torch.empty(P, H, V, K, device=DEVICE)
    index = torch.tensor([P - 1, 3, 2**31 // (H * V * K)])  # the last one starts at element 2**31 exactly
    neighbours = torch.tensor([P - 2, 2, 2**31 // (H * V * K) - 1])
    gen = torch.Generator().manual_seed(13)
    pool[index] = torch.randn(R, H, V, K, generator=gen).to(DEVICE)
    pool[neighbours] = torch.randn(R, H, V, K, generator=gen).to(DEVICE)
    old, kept = pool[index].cpu(), pool[neighbours].cpu()
    q, k, v, g, _, _ = inputs([R], G, H, K, V, seed=14)
    with torch.no_grad():
        o = scalar_decay_step(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), g.to(DEVICE), pool, index.to(DEVICE))
    o_ref, ht_ref = scalar_decay_reference(q, k, v, g, torch.arange(R + 1), initial_state=old,
                                           output_final_state=True)
    assert rel_err(o.cpu(), o_ref) < 1e-5 and rel_err(pool[index].cpu(), ht_ref) < 1e-5
    assert torch.equal(pool[neighbours].cpu(), kept)
    print('step past 2**31: ok')


if __name__ == '__main__':
    if os.environ.get('TRITON_INTERPRET') == '1':
        bf16_dots_under_interpreter()
    globals()[sys.argv[1]]()
    if DEVICE == 'cpu':  # the big tensors stayed lazily committed
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{sys.argv[1]}: peak RSS {peak / 2**30:.2f} GiB")
        assert peak < 2 << 30, f"peak RSS {peak / 2**30:.2f} GiB"
