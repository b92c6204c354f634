"""MemoryBank's projection forms, each slot against F.linear with its own memory's weights in a plain loop:
projections of x (fused), of another input, low-rank two-stage projections, biases; memory-major plans
(grouped GEMM and per-block fallback) and decode plans (token-major), with gradients."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mom_wrap.ops as ops
from mom_wrap.adapters.base import WriteProjection
from mom_wrap.dispatch import plan_decode, plan_dispatch
from mom_wrap.memories import MemoryBank
from tests.test_primitives import close

HID, RANK = 16, 4


def bank(E):
    projections = [
        WriteProjection('k', nn.Linear(HID, 8, bias=False)),
        WriteProjection('lowrank', nn.Linear(HID, RANK, bias=False), second=nn.Linear(RANK, 12), activation='tanh'),
        WriteProjection('mixed', nn.Linear(HID, 6), input='x_mix'),
        WriteProjection('mixed_lowrank', nn.Linear(HID, RANK, bias=False), input='x_mix',
                        second=nn.Linear(RANK, 8, bias=False), activation='sigmoid'),
    ]
    b = MemoryBank(projections, E, 'random')
    for p in b.parameters():  # fresh biases start at zero-ish: make every term count
        nn.init.normal_(p.data, std=0.5)
    return b


def per_slot_reference(b, inputs, token, memory):
    """name -> [S, out]: slot s = token[s] through memory[s]'s weights, one slot at a time."""
    out = {n: [] for n in b.names}
    for t, m in zip(token.tolist(), memory.tolist()):
        for n in b.names:
            y = F.linear(inputs[b.inputs[n]][t], b.proj[n][m], b.proj_bias[n][m] if n in b.proj_bias else None)
            if n in b.second:
                act = {'tanh': torch.tanh, 'sigmoid': torch.sigmoid}[b.activation[n]]
                y = F.linear(act(y), b.second[n][m], b.second_bias[n][m] if n in b.second_bias else None)
            out[n].append(y)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize('plan', ['memory-major', 'per-block', 'decode'])
def test_every_projection_form_matches_a_per_slot_loop(plan, monkeypatch):
    if plan == 'per-block':
        monkeypatch.setattr(ops, '_grouped_mm_ok', lambda x, weight: False)
    E, N, s = 4, 7, 2
    b = bank(E)
    assert set(b.input_weight) == {'mixed', 'mixed_lowrank'} and b.weight.shape[1] == 8 + RANK
    g = torch.Generator().manual_seed(0)
    inputs = {'x': torch.randn(N, HID, generator=g, requires_grad=True),
              'x_mix': torch.randn(N, HID, generator=g, requires_grad=True)}
    memory = torch.stack([torch.randperm(E, generator=g)[:s] for _ in range(N)])
    weight = torch.ones(N, s)
    if plan == 'decode':
        d = plan_decode(memory, weight, None)
    else:
        d = plan_dispatch(memory, weight, torch.zeros(N, dtype=torch.long), None, 1, E)
    got = b(inputs, d)
    want = per_slot_reference(b, inputs, d.token, d.memory)
    for n in b.names:
        close(got[n], want[n], tol=1e-5)
    # gradients of every parameter and both inputs
    grads = {n: torch.randn(want[n].shape, generator=g) for n in b.names}
    params = [inputs['x'], inputs['x_mix'], *b.parameters()]
    g_got = torch.autograd.grad(sum((got[n] * grads[n]).sum() for n in b.names), params)
    g_want = torch.autograd.grad(sum((want[n] * grads[n]).sum() for n in b.names), params)
    for a, w in zip(g_got, g_want):
        close(a, w, tol=1e-5)


def test_unknown_stage_activation_is_refused():
    with pytest.raises(ValueError, match='activation'):
        MemoryBank([WriteProjection('w', nn.Linear(4, 2), second=nn.Linear(2, 4), activation='gelu')], 2, 'copy')


def conv_bank(E):
    """Projections of x as a host's write side has them: short convs (with and without bias and SiLU), one
    without a conv, one of another input."""
    from fla.modules import ShortConvolution
    projections = [
        WriteProjection('k', nn.Linear(HID, 8, bias=False), conv=ShortConvolution(8, 4, activation='silu')),
        WriteProjection('v', nn.Linear(HID, 6, bias=False), conv=ShortConvolution(6, 3, bias=True,
                                                                                   activation=None)),
        WriteProjection('beta', nn.Linear(HID, 2)),
        WriteProjection('mixed', nn.Linear(HID, 4), input='x_mix'),
    ]
    b = MemoryBank(projections, E, 'random')
    for p in b.parameters():
        nn.init.normal_(p.data, std=0.5)
    return b


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                    reason='needs TRITON_INTERPRET=1 or CUDA')
def test_recomputed_projection_equals_the_kept_one_and_is_not_kept():
    """On the triton backend with ``MemoryBank.recompute`` (off by default) the fused projection of x feeding
    the convs is computed again in the backward: outputs and every gradient bitwise those of keeping it, and no
    [S, sum(out)] tensor is kept for the backward."""
    assert not conv_bank(2).recompute
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    E, N, s = 4, 40, 2
    b = conv_bank(E).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, HID, generator=g).to(device).requires_grad_()
    x_mix = torch.randn(N, HID, generator=g).to(device).requires_grad_()
    memory = torch.stack([torch.randperm(E, generator=g)[:s] for _ in range(N)]).to(device)
    sequence = (torch.arange(N) >= 25).long().to(device)  # two sequences: segments start mid-batch
    d = plan_dispatch(memory, torch.ones(N, s, device=device), sequence, None, 2, E)
    widths = b.weight.shape[1]
    results = []
    for recompute in (False, True):
        b.recompute = recompute
        kept = []

        def pack(t):
            kept.append(t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = b({'x': x, 'x_mix': x_mix}, d, backend='triton')
        assert b._recomputes(d, 'triton', None) == recompute
        # the fused projection's output (its column blocks: views of its storage)
        assert (d.num_slots * widths * x.element_size() in kept) != recompute
        grads = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(device)
                 for n, t in out.items()}
        params = [x, x_mix, *b.parameters()]
        results.append((out, torch.autograd.grad(sum((out[n] * grads[n]).sum() for n in out), params)))
    (out0, g0), (out1, g1) = results
    for n in out0:
        assert torch.equal(out0[n], out1[n]), n
    for a, w in zip(g0, g1):
        assert torch.equal(a, w)
    # the torch backend, and no gradients: nothing to recompute
    with torch.no_grad():
        assert not b._recomputes(d, 'triton', None)
    assert not b._recomputes(d, 'torch', None)
