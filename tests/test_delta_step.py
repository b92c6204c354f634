"""The in-place decode step of the gated delta rule (``mom_wrap.kernels.delta_step``) against the PyTorch
reference of the GatedDeltaNet adapter, run as one-row segments from the same states; on the CPU through
Triton's interpreter."""
import os

import pytest
import torch
import torch.nn.functional as F

from mom_wrap.adapters.gated_deltanet import gated_delta_rule_reference
from mom_wrap.kernels.delta_step import gated_delta_step

needs_triton = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                  reason='needs TRITON_INTERPRET=1 or CUDA')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def inputs(R=5, H=2, HV=4, K=12, V=20, P=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(R, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(R, HV, V, generator=g).to(dtype)
    a, b = torch.randn(R, HV, generator=g), torch.randn(R, HV, generator=g)
    A_log, dt_bias = torch.rand(HV, generator=g).log(), torch.randn(HV, generator=g) * 0.5
    pool = torch.randn(P, HV, V, K, generator=g)
    index = torch.randperm(P, generator=g)[:R]
    return q, k, v, a, b, A_log, dt_bias, pool, index


def reference(q, k, v, a, b, A_log, dt_bias, pool, index, allow_neg_eigval=False):
    """The adapter's reference on R one-row segments starting from pool[index]: o [R, HV, V], new states."""
    R = q.shape[0]
    cu = torch.arange(R + 1)
    return gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias, cu, torch.zeros(R, dtype=torch.long),
                                      allow_neg_eigval, initial_state=pool[index], output_final_state=True)


@needs_triton
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('allow_neg_eigval', [False, True])
def test_step_equals_reference_in_place(dtype, tol, allow_neg_eigval):
    q, k, v, a, b, A_log, dt_bias, pool, index = inputs(dtype=dtype)
    want_o, want_state = reference(q, k, v, a, b, A_log, dt_bias, pool, index, allow_neg_eigval)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool)
    untouched[index] = False
    dev_pool = pool.to(DEVICE)
    o = gated_delta_step(*(t.to(DEVICE) for t in (q, k, v, b)), dev_pool, index.to(DEVICE), a=a.to(DEVICE),
                         A_log=A_log.to(DEVICE), dt_bias=dt_bias.to(DEVICE), allow_neg_eigval=allow_neg_eigval)
    assert o.dtype == dtype and o.shape == want_o.shape
    torch.testing.assert_close(o.float().cpu(), want_o.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dev_pool.cpu()[index], want_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(dev_pool.cpu()[untouched], pool[untouched])  # other rows: not one bit changed


@needs_triton
def test_step_valid_rows_log_decay_no_gate_and_strided_inputs():
    q, k, v, a, b, A_log, dt_bias, pool, index = inputs(R=4, H=2, HV=2, K=16, V=8)
    # the gate as a log decay given directly, and no decay at all (DeltaNet): the reference with the same g
    g = -A_log.exp() * F.softplus(a + dt_bias)
    valid = torch.tensor([True, False, True, True])
    for gate in ('log', None):
        p = pool.clone().to(DEVICE)
        vs = torch.stack([v, v], -1).to(DEVICE)[..., 0]  # last dim strided: copied, as the docstring says
        o = gated_delta_step(q.to(DEVICE), k.to(DEVICE), vs, b.to(DEVICE), p, index.to(DEVICE),
                             valid=valid.to(DEVICE), a=g.to(DEVICE) if gate == 'log' else None).cpu()
        p = p.cpu()
        # the reference with A_log = log(1): g = -softplus(...) would differ, so write the decay in as dt_bias
        want_o, want_state = reference(q, k, v, a, b, A_log, dt_bias, pool, index) if gate == 'log' else \
            reference(q, k, v, torch.full_like(a, -1e4), b, A_log, dt_bias, pool, index)
        torch.testing.assert_close(o[valid], want_o[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(o[~valid], torch.zeros_like(o[~valid]))
        torch.testing.assert_close(p[index[valid]], want_state[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(p[index[~valid]], pool[index[~valid]])


@needs_triton
def test_step_errors_name_the_argument():
    q, k, v, a, b, A_log, dt_bias, pool, index = inputs()
    base = dict(q=q, k=k, v=v, b=b, pool=pool, index=index, a=a, A_log=A_log, dt_bias=dt_bias)
    for change, error, name in [
            (dict(k=k.double()), TypeError, 'k'), (dict(v=v[:, :3]), ValueError, 'q, v'),
            (dict(pool=pool.double()), TypeError, 'pool'), (dict(index=index.float()), TypeError, 'index'),
            (dict(index=index[:2]), ValueError, 'index'), (dict(dt_bias=None), ValueError, 'A_log, dt_bias'),
            (dict(b=b[:, :1]), ValueError, 'b'), (dict(valid=torch.ones(5)), TypeError, 'valid')]:
        with pytest.raises(error, match=f"^{name}"):
            gated_delta_step(**{**base, **change})
    with pytest.raises(RuntimeError, match='inference-only'):
        gated_delta_step(**{**base, 'q': q.clone().requires_grad_()})


@needs_triton
def test_step_on_k_major_states_deltanet_form():
    """DeltaNet's form: states [K, V] per head (``state_v_first=False``), beta given (no sigmoid), no decay, q and
    k normalised by the caller (``l2norm=False``)."""
    q, k, v, a, b, A_log, dt_bias, pool, index = inputs(HV=2)
    qn, kn = (t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    beta = b.sigmoid()
    want_o, want_state = reference(qn, kn, v, torch.full_like(a, -1e4), b, A_log, dt_bias, pool, index)
    kv = pool.transpose(-1, -2).contiguous().to(DEVICE)  # [P, HV, K, V]
    o = gated_delta_step(qn.to(DEVICE), kn.to(DEVICE), v.to(DEVICE), beta.to(DEVICE), kv, index.to(DEVICE),
                         beta_sigmoid=False, l2norm=False, state_v_first=False).cpu()
    kv = kv.cpu()
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv[index].transpose(-1, -2), want_state, rtol=1e-5, atol=1e-5)
