"""``mom_wrap.kernels.combine`` against PyTorch references (under the interpreter on the CPU)."""
import pytest
import torch

from mom_wrap.kernels import combine

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def _on_device(fn):
    """fn on DEVICE: the tests build their tensors on the CPU; on a GPU machine the kernels run on CUDA."""
    def call(*args, **kwargs):
        args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return out.cpu() if isinstance(out, torch.Tensor) else tuple(o if o is None else o.cpu() for o in out)
    return call


weighted_rows_sum = _on_device(combine.weighted_rows_sum)
combine_backward = _on_device(combine.combine_backward)

N, SLOTS = 13, 3
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make(D, dtype, with_present, spare=0, n=N, s=SLOTS):
    """y [S, D], idx [n, s], weight [n, s] fp32 (fp64 for fp64 y), present [n, s] or None. With present: a
    padding token, some dropped slots, and S = (present slots) + spare rows that no present slot names; the
    slots that are not present point anywhere in range, the spare rows included."""
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(n, s, dtype=wdtype) + 0.1
    if not with_present:
        S = n * s
        idx = torch.randperm(S).view(n, s)
        present = None
    else:
        present = (torch.rand(n, s) > 0.3).float()
        present[0] = 0.  # a padding token: none of its slots
        P = int(present.sum())
        S = P + spare
        idx = torch.randint(0, S, (n, s))
        idx[present != 0] = torch.randperm(S)[:P]  # injective over the present slots
    y = torch.randn(S, D, dtype=torch.float64).to(dtype)
    return y, idx, weight, present


def reference(y, idx, weight, present):
    mask = torch.ones_like(weight) if present is None else present.to(weight.dtype)
    g = torch.where((mask != 0)[..., None], y[idx].to(weight.dtype), 0)  # never multiply a NaN by 0
    return ((weight * mask)[..., None] * g).sum(1)


def unnamed_rows(S, idx, present):
    named = torch.zeros(S, dtype=torch.bool)
    named[idx[present != 0] if present is not None else idx.flatten()] = True
    return ~named


@pytest.mark.parametrize('D', [40, 130])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('with_present', [False, True])
def test_weighted_rows_sum(D, dtype, with_present):
    y, idx, weight, present = make(D, dtype, with_present, spare=2)
    out = weighted_rows_sum(y, idx, weight, present)
    assert out.shape == (N, D) and out.dtype == dtype
    torch.testing.assert_close(out, reference(y, idx, weight, present).to(dtype), **TOL[dtype])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_weighted_rows_sum_skips_rows_of_absent_slots(dtype):
    """A NaN / Inf row named only by slots that are not present (another sequence's row) must not be read."""
    y, idx, weight, present = make(130, dtype, True, spare=2)
    S = y.shape[0]
    bad = torch.nonzero(unnamed_rows(S, idx, present)).flatten()
    expected = reference(y, idx, weight, present).to(dtype)
    y[bad[0]] = float('nan')
    y[bad[1]] = float('inf')
    absent = torch.nonzero(present == 0)
    idx[absent[0, 0], absent[0, 1]] = bad[0]  # the padding token's slots, and another absent slot
    idx[absent[1, 0], absent[1, 1]] = bad[1]
    idx[absent[-1, 0], absent[-1, 1]] = bad[0]
    out = weighted_rows_sum(y, idx, weight, present)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    weight[present == 0] = float('nan')  # weights of absent slots are not read either
    torch.testing.assert_close(weighted_rows_sum(y, idx, weight, present), expected, **TOL[dtype])


def test_weighted_rows_sum_strided_rows_bool_present_fp16():
    y, idx, weight, present = make(40, torch.float16, True, spare=1)
    wide = torch.randn(y.shape[0], 100, dtype=torch.float16)
    wide[:, 30:70] = y
    ys = wide[:, 30:70]  # row stride 100, a column slice
    out = weighted_rows_sum(ys, idx, weight, present.bool())
    torch.testing.assert_close(out, reference(y, idx, weight, present).half(), **TOL[torch.float16])


def test_weighted_rows_sum_fp64_y_fp32_weight():
    y, idx, _, present = make(40, torch.float64, True)
    weight = torch.rand(N, SLOTS)  # fp32 weight, fp64 accumulation
    out = weighted_rows_sum(y, idx, weight, present)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(y, idx, weight.double(), present), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('D', [40, 130])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('with_present', [False, True])
def test_combine_backward(D, dtype, with_present):
    y, idx, weight, present = make(D, dtype, with_present, spare=3)
    grad = torch.randn(N, D, dtype=dtype)
    y_ref, w_ref = y.clone().requires_grad_(), weight.clone().requires_grad_()
    reference(y_ref, idx, w_ref, present).backward(grad)
    dy, dweight = combine_backward(grad, y, idx, weight, present)
    assert dy.shape == y.shape and dy.dtype == dtype and dweight.shape == (N, SLOTS)
    assert dweight.dtype == weight.dtype
    torch.testing.assert_close(dy, y_ref.grad, **TOL[dtype])
    torch.testing.assert_close(dweight, w_ref.grad, **TOL[dtype])
    if present is not None:
        assert (dweight[present == 0] == 0).all()
        unnamed = unnamed_rows(y.shape[0], idx, present)
        assert unnamed.sum() == 3 and (dy[unnamed] == 0).all()
    dy2, none = combine_backward(grad, y, idx, weight, present, need_dweight=False)
    assert none is None
    torch.testing.assert_close(dy2, dy, rtol=0, atol=0)


@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')  # masked-off lanes: 0 * inf
def test_combine_backward_bf16_and_nan_rows_of_absent_slots():
    y, idx, weight, present = make(130, torch.bfloat16, True, spare=1)
    grad = torch.randn(N, 130, dtype=torch.bfloat16)
    grad[0] = float('inf')  # the padding token's gradient reaches nothing
    bad = torch.nonzero(unnamed_rows(y.shape[0], idx, present)).flatten()[0]
    absent = torch.nonzero(present == 0)
    idx[absent[-1, 0], absent[-1, 1]] = bad
    y_clean = y.clone()
    y[bad] = float('nan')
    y_ref, w_ref = y_clean.float().requires_grad_(), weight.clone().requires_grad_()
    g_ref = grad.float()
    g_ref[0] = 0
    reference(y_ref, idx, w_ref, present).backward(g_ref)
    dy, dweight = combine_backward(grad, y, idx, weight, present)
    assert torch.isfinite(dy).all() and torch.isfinite(dweight).all()
    assert dy.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    torch.testing.assert_close(dy, y_ref.grad.bfloat16(), **TOL[torch.bfloat16])
    torch.testing.assert_close(dweight, w_ref.grad, rtol=2e-2, atol=5e-2)
    assert (dy[bad] == 0).all()


def test_empty():
    y = torch.randn(0, 40)
    idx = torch.zeros(0, SLOTS, dtype=torch.long)
    weight = torch.zeros(0, SLOTS)
    out = weighted_rows_sum(y, idx, weight)
    assert out.shape == (0, 40) and out.dtype == y.dtype
    dy, dweight = combine_backward(torch.zeros(0, 40), y, idx, weight, torch.zeros(0, SLOTS))
    assert dy.shape == (0, 40) and dweight.shape == (0, SLOTS)
    # tokens but no rows (every slot absent): zeros, no launch
    out = weighted_rows_sum(y, torch.zeros(2, SLOTS, dtype=torch.long), torch.ones(2, SLOTS), torch.zeros(2, SLOTS))
    assert out.shape == (2, 40) and (out == 0).all()


def test_bad_arguments():
    y, idx, weight, present = make(40, torch.float32, True)
    with pytest.raises(ValueError, match='idx'):
        weighted_rows_sum(y, idx.flatten(), weight, present)
    with pytest.raises(ValueError, match='idx'):
        weighted_rows_sum(y, idx.float(), weight, present)
    with pytest.raises(ValueError, match='weight'):
        weighted_rows_sum(y, idx, weight.half(), present)
    with pytest.raises(ValueError, match='weight'):
        weighted_rows_sum(y, idx, weight.double(), present)  # fp64 weight needs fp64 y
    with pytest.raises(ValueError, match='weight'):
        weighted_rows_sum(y, idx, weight[:, :2], present)
    with pytest.raises(ValueError, match='present'):
        weighted_rows_sum(y, idx, weight, present[1:])
    with pytest.raises(ValueError, match='y'):
        weighted_rows_sum(y.int(), idx, weight, present)
    with pytest.raises(ValueError, match='grad'):
        combine_backward(torch.randn(N, 41), y, idx, weight, present)
    with pytest.raises(ValueError, match='idx'):
        combine_backward(torch.randn(N, 40), y, idx[:, :, None], weight, present)


@pytest.mark.parametrize('padded', [False, True], ids=['dense', 'padded'])
def test_plan_gather_and_combine_on_the_kernels_equal_the_pytorch_path(padded, monkeypatch):
    """``mom_wrap.dispatch``'s gather and combine with ``Dispatch.kernels`` (the triton backend's plans, on
    CUDA) equal their PyTorch path, forward and every gradient; here on the CPU under the interpreter, with the
    kernels' CUDA-only switch opened. A NaN in a padding token's row reaches nothing."""
    import mom_wrap.dispatch as dispatch_module
    from mom_wrap.dispatch import combine, gather, plan_dispatch
    monkeypatch.setattr(dispatch_module, '_kernels', lambda t, d: d.kernels)
    torch.manual_seed(0)
    N, E, s, Q = 12, 5, 3, 2
    memory = torch.stack([torch.randperm(E - 1)[:s - 1] for _ in range(N)])
    memory = torch.cat([memory, torch.full((N, 1), E - 1)], 1)  # top-2 + the shared memory E-1
    weight = torch.rand(N, s)
    sequence = torch.arange(N) // (N // Q)
    valid = torch.ones(N, dtype=torch.bool)
    if padded:
        valid[[0, 1, 6]] = False
    x = torch.randn(N, 4, 6, dtype=torch.float64)
    if padded:
        x[0] = float('nan')
    memory, weight, sequence, valid, x = (t.to(DEVICE) for t in (memory, weight, sequence, valid, x))
    results = []
    for kernels in (False, True):
        d = plan_dispatch(memory, weight, sequence, valid if padded else None, Q, E, kernels=kernels)
        xi = x.clone().requires_grad_(True)
        w = d.token_weight.double().requires_grad_(True)
        d.token_weight = w
        y = gather(xi, d) * torch.linspace(0.5, 1.5, d.num_slots, dtype=x.dtype, device=DEVICE)[:, None, None]
        out = combine(y, d)
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(DEVICE))
        results.append((out.detach().cpu(), xi.grad.cpu(), w.grad.cpu()))
    for want, got in zip(*results):
        ok = ~torch.isnan(want)
        assert torch.equal(ok, ~torch.isnan(got))
        torch.testing.assert_close(got[ok], want[ok], rtol=1e-12, atol=1e-12)
    if padded:
        keep = valid.cpu()
        keep[0] = False
        assert torch.isfinite(results[1][0][keep]).all() and torch.isfinite(results[1][1][keep]).all()
