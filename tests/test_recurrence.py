"""The recurrence in parts over time (``mom_wrap.recurrence``, ``Dispatch.time_parts``): the parts' layout, and
the same outputs and gradients as one call for every host (torch backend here, fp64; the triton backend's
parts are held to one call on the GPU, tests/test_gpu.py)."""
import pytest
import torch

import mom_wrap.recurrence as recurrence
from mom_wrap.adapters.base import _REGISTRY
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.fla_mom import FlaMomAdapter
from mom_wrap.testing import recurrence_calls, wrap

ADAPTERS = {a.host_class.rpartition('.')[2]: (a, None) for a in _REGISTRY if a.load_host_class() is not None}
ADAPTERS['GatedDeltaNet/FlaMomAdapter'] = (ADAPTERS['GatedDeltaNet'][0], FlaMomAdapter)  # q per memory, per slot


def _plan(memory, valid=None, num_memories=4):
    N, s = memory.shape
    sequence = torch.arange(N) // (N // 2)  # two sequences
    return plan_dispatch(memory, torch.rand(N, s), sequence, valid, 2, num_memories)


def _check_parts(plan, pieces, parts, align):
    """What ``time_parts`` promises, checked against the plan row by row."""
    S = plan.num_slots
    segment = torch.searchsorted(plan.cu_seqlens_cpu[1:], torch.arange(S), right=True)  # each sorted row's segment
    order = torch.cat([p.rows for p in pieces])
    assert torch.equal(order.sort().values, torch.arange(S))  # every row in exactly one part
    seen_until = plan.cu_seqlens_cpu[:-1].clone()  # per segment: the next row a later piece must start at
    previous = None
    for i, p in enumerate(pieces):
        d = p.dispatch
        assert d.cu_seqlens_cpu[0] == 0 and d.cu_seqlens_cpu[-1] == d.num_slots == p.rows.numel()
        assert torch.equal(d.cu_seqlens.cpu(), d.cu_seqlens_cpu)
        assert d.max_seqlen == int(d.cu_seqlens_cpu.diff().max())
        segs = segment[p.rows[d.cu_seqlens_cpu[:-1]]]  # the plan's segment of each of the part's segments
        for k, g in enumerate(segs.tolist()):  # each piece: the next consecutive rows of its segment, in time order
            r0, r1 = d.cu_seqlens_cpu[k], d.cu_seqlens_cpu[k + 1]
            assert torch.equal(p.rows[r0:r1], torch.arange(seen_until[g], seen_until[g] + (r1 - r0)))
            assert torch.equal(d.position[r0:r1], torch.arange(r1 - r0))
            seen_until[g] += r1 - r0
        assert torch.equal(d.token, plan.token[p.rows]) and torch.equal(d.memory, plan.memory[p.rows])
        assert torch.equal(d.segment_memory, plan.segment_memory[segs])
        if i == 0:
            assert p.carry is None
        else:  # each segment continues the previous part's piece of the same segment
            assert torch.equal(previous[p.carry], segs)
        previous = segs
        # the part's rows of each token's slots, the others absent
        inside = (p.rows[:, None] == plan.restore.reshape(-1)[None, :]).any(0).view_as(plan.restore)
        assert torch.equal(d.restore < d.num_slots, inside)
        assert torch.equal(p.rows[d.restore[inside]], plan.restore[inside])
    assert torch.equal(seen_until, plan.cu_seqlens_cpu[1:])  # every segment whole
    # each segment's shares: its blocks dealt out, blocks // parts to each part and one more to each of the first
    # blocks % parts; parts without rows dropped
    lengths = plan.cu_seqlens_cpu.diff().tolist()
    want = []
    for L in lengths:
        blocks = -(-L // align)
        ends = [0]
        for i in range(parts):
            ends.append(ends[-1] + blocks // parts + (i < blocks % parts))
        want.append([min(align * b, L) - min(align * a, L) for a, b in zip(ends, ends[1:])])
    kept = [i for i in range(parts) if any(w[i] for w in want)]
    assert len(kept) == len(pieces)
    for g, w in enumerate(want):
        assert [int((segment[p.rows] == g).sum()) for p in pieces] == [w[i] for i in kept]


@pytest.mark.parametrize('parts,align', [(2, 1), (3, 1), (3, 2), (4, 3)])
def test_time_parts_deal_every_segment_out_in_time_order(parts, align):
    torch.manual_seed(0)
    memory = torch.stack([torch.randperm(4)[:2] for _ in range(40)])  # 40 tokens, two sequences, top-2 of 4
    plan = _plan(memory)
    pieces = plan.time_parts(parts, align)
    assert len(pieces) == parts
    _check_parts(plan, pieces, parts, align)


def test_time_parts_with_padding_keep_padding_out():
    torch.manual_seed(0)
    memory = torch.stack([torch.randperm(4)[:2] for _ in range(16)])
    valid = torch.rand(16) > 0.3
    plan = _plan(memory, valid)
    pieces = plan.time_parts(2, 1)
    assert sum(p.dispatch.num_slots for p in pieces) == plan.num_slots == 2 * int(valid.sum())
    _check_parts(plan, pieces, 2, 1)
    for p in pieces:
        assert (p.dispatch.restore[~valid] == p.dispatch.num_slots).all()  # padding tokens: no slot in any part
        assert (p.dispatch.token_weight[~valid] == 0).all()


def test_short_segments_stay_in_the_first_parts():
    # segments of 1 to 3 rows in blocks of 2 (1 or 2 blocks): three parts, but only two have rows
    memory = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 2], [1, 0], [1, 3], [2, 1], [2, 3]])
    plan = _plan(memory)
    pieces = plan.time_parts(3, 2)
    assert len(pieces) == 2
    _check_parts(plan, pieces, 3, 2)
    assert plan.time_parts(3, 4) == []  # every segment one block: nothing to split
    assert plan.time_parts(1, 1) == []


@pytest.mark.parametrize('host', sorted(ADAPTERS))
@pytest.mark.parametrize('padded', [False, True])
def test_parts_equal_one_call(host, padded, monkeypatch):
    """Outputs and every gradient, with the recurrence in 1 and in 3 calls over time (blocks of 2 rows here: the
    segments are short); the adapter's calls are counted, so the parts cannot silently fall back to one."""
    torch.manual_seed(0)
    registered, variant = ADAPTERS[host]
    mom = wrap(registered.example_host().double(), init='random', backend='torch', adapter=variant).train()
    hidden = mom.hidden_size
    x = torch.randn(2, 12, hidden, dtype=torch.float64)
    kwargs = mom._adapter.example_inputs(x)
    if padded:
        if not mom._adapter.convention.padding_mask:
            pytest.skip("the host's layer takes no padding mask")
        kwargs['attention_mask'] = torch.tensor([[0] * 5 + [1] * 7, [1] * 12])
    monkeypatch.setattr(recurrence, 'ALIGN', 2)
    runs = []
    for parts in (1, 3):
        mom.recurrence_parts = parts
        xi = x.clone().requires_grad_()
        with recurrence_calls(mom) as calls:
            y = mom._adapter.convention.outputs(mom(xi, **kwargs))[0]
        assert len(calls) == parts
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()])
        mom.zero_grad()
    names = ['output', 'input grad'] + [n for n, _ in mom.named_parameters()]
    for a, b, n in zip(*runs, names):
        torch.testing.assert_close(b, a, msg=n)


GPU_HOSTS = ['GatedLinearAttention', 'DeltaNet', 'RWKV6Attention', 'RWKV7Attention', 'Mamba2']


@pytest.mark.gpu
@pytest.mark.parametrize('host', GPU_HOSTS)
def test_parts_equal_one_call_on_the_gpu(host):
    """Every other host's triton backend (fla's chunk kernels, or for Mamba2 ours) with the recurrence in 2 calls
    over time against one call, bf16 at bench_layer's sizes (hidden 1024; its autotune cache): the parts hand
    the host kernels' final states and their gradients from one call to the next (GatedDeltaNet: in fp32, in
    tests/test_gpu.py). Errors relative to the one call's norm, output, input gradient and every parameter's."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
    from bench_layer import host_factory, host_kwargs, output

    from mom_wrap import MixtureOfMemories
    torch.manual_seed(0)
    mom = MixtureOfMemories(host_factory(host, 1024, 4, 256)(), num_memories=4, topk=2, shared_memory=True,
                            balance_loss_weight=0.0).to('cuda', torch.bfloat16).train()
    x = torch.randn(2, 1024, 1024, device='cuda', dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    kwargs = host_kwargs(host, x)
    runs = []
    for parts in (1, 2):
        mom.recurrence_parts = parts
        xi = x.clone().requires_grad_()
        with recurrence_calls(mom) as calls:
            y = output(mom(xi, **kwargs))
        y.backward(dy)
        assert len(calls) == parts
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()])
        mom.zero_grad()
    names = ['output', 'input grad'] + [n for n, _ in mom.named_parameters()]
    errs = {n: ((b.float() - a.float()).norm() / a.float().norm().clamp_min(1e-12)).item()
            for a, b, n in zip(*runs, names)}
    print(f"\n{host} 2 parts vs 1 call, relative errors (max):", f"{max(errs.values()):.1e}")
    assert max(errs.values()) < 2e-2, errs
