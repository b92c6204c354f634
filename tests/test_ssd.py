"""``chunk_ssd`` (Mamba2's scan with dt x, dt A and D x inside one autograd function) against the PyTorch ops around
``chunk_scalar_decay`` it replaces: the same output and gradients bit for bit, from less saved memory; on the CPU
through Triton's interpreter."""
import pytest
import torch
import torch.nn.functional as F

from mom_wrap.kernels.scalar_decay import chunk_scalar_decay
from mom_wrap.kernels.ssd import chunk_ssd
from mom_wrap.ops import acc
from tests.test_scalar_decay import DEVICE, LENGTHS, _bf16_dots, inputs, needs_triton  # noqa: F401 (the fixture)


def ops(q, k, x, dt, A, D, cu, chunk_size, initial_state=None, output_final_state=False):
    """The scan as PyTorch ops around chunk_scalar_decay (Mamba2Common.recurrence before chunk_ssd)."""
    xf = acc(x)
    o, ht = chunk_scalar_decay(q, k, (xf * dt[..., None]).to(x.dtype), dt * A, cu, initial_state=initial_state,
                               output_final_state=output_final_state, chunk_size=chunk_size)
    return (acc(o) + acc(D) * xf).to(x.dtype), ht


def leaves(dtype, G, H, K, V, D_per_channel, seed=1):
    """q, k, x (dtype), the raw dt [S, H] and A_log [H] (fp32, as the hosts keep them), D (dtype) and h0 (fp32)."""
    q, k, x, _, cu, h0 = inputs(LENGTHS, G, H, K, V, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    dt_raw = torch.randn(q.shape[0], H, generator=g) - 2
    A_log = torch.rand(H, generator=g).log1p()
    D = torch.randn(H, V if D_per_channel else 1, generator=g)
    out = [t.to(dtype) for t in (q, k, x)] + [dt_raw, A_log, D.to(dtype), h0]
    return [t.to(DEVICE).requires_grad_() for t in out], cu


def run(fn, tensors, cu, final, chunk):
    q, k, x, dt_raw, A_log, D, h0 = tensors
    dt, A = F.softplus(dt_raw), -torch.exp(A_log)  # (as Mamba2Common computes them: fp32)
    return fn(q, k, x, dt, A, D, cu.to(DEVICE), chunk, initial_state=h0, output_final_state=final)


# name: (dtype, chunk size, G, H, K, V, D per channel, the loss reads the final state)
CASES = {
    'fp32-groups-final-D_has_hdim': (torch.float32, 16, 2, 4, 12, 20, True, True),
    'bf16-groups-final': (torch.bfloat16, 16, 2, 4, 12, 20, False, True),
    'fp16-one-group': (torch.float16, 32, 1, 2, 16, 16, False, False),
}


@needs_triton
@pytest.mark.parametrize('case', list(CASES))
def test_equals_the_pytorch_ops_bit_for_bit(case):
    """Output, final state and the gradients of q, k, x, the raw dt, A_log, D and the initial state: identical."""
    dtype, chunk, G, H, K, V, D_per_channel, final = CASES[case]
    got = {}
    for name, fn in (('ops', ops), ('chunk_ssd', lambda *a, **kw: chunk_ssd(*a[:7], chunk_size=a[7], **kw))):
        tensors, cu = leaves(dtype, G, H, K, V, D_per_channel)
        o, ht = run(fn, tensors, cu, final, chunk)
        gen = torch.Generator().manual_seed(3)
        terms = [(o, torch.randn(o.shape, generator=gen).to(dtype).to(DEVICE))]
        if final:
            terms.append((ht, torch.randn(ht.shape, generator=gen).to(DEVICE)))
        grads = torch.autograd.grad([t for t, _ in terms], tensors, [d for _, d in terms])
        got[name] = [o] + ([ht] if final else []) + list(grads)
    names = ['o'] + (['ht'] if final else []) + ['dq', 'dk', 'dx', 'd dt_raw', 'dA_log', 'dD', 'dh0']
    for name, ref, new in zip(names, got['ops'], got['chunk_ssd']):
        assert new.dtype == ref.dtype and torch.equal(new, ref), name


@needs_triton
def test_saves_neither_x_in_fp32_nor_v():
    """In bf16 the PyTorch ops keep x's fp32 copy and v = dt x (bf16) for the backward; chunk_ssd keeps neither
    (saved_tensors_hooks: every tensor autograd keeps that is not one of the inputs)."""
    saved_bytes = {}
    for name, fn in (('ops', ops), ('chunk_ssd', lambda *a, **kw: chunk_ssd(*a[:7], chunk_size=a[7], **kw))):
        tensors, cu = leaves(torch.bfloat16, 2, 4, 12, 20, False)
        own = {t.untyped_storage().data_ptr() for t in tensors}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(fn, tensors, cu, True, 16)
        x = tensors[2]
        if name == 'chunk_ssd':
            assert not [s for s in saved.values() if s[0] == tuple(x.shape)], saved
        saved_bytes[name] = sum(n for *_, n in saved.values())
    assert saved_bytes['chunk_ssd'] + 6 * x.numel() <= saved_bytes['ops'], saved_bytes


@needs_triton
def test_argument_errors():
    """A and D of the wrong shape: a ValueError naming them; the scan's own arguments as chunk_scalar_decay checks
    them (x in v's place, dt in g's)."""
    (q, k, x, dt_raw, A_log, D, h0), cu = leaves(torch.float32, 2, 4, 12, 20, True)
    ok = dict(q=q, k=k, x=x, dt=dt_raw, A=A_log, D=D, cu_seqlens=cu.to(DEVICE))
    for error, name, bad in ((ValueError, 'A', dict(A=A_log[:2])), (ValueError, 'D', dict(D=D.T)),
                             (ValueError, 'D', dict(D=D[:, :3])), (ValueError, 'v, g', dict(dt=dt_raw[:, :2])),
                             (TypeError, 'v', dict(x=x.double()))):
        with pytest.raises(error, match=name):
            chunk_ssd(**{**ok, **bad})
