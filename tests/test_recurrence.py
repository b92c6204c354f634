"""The recurrence in parts (``mom_wrap.recurrence``, ``Dispatch.split``): the same outputs and gradients as
one call, for every host (torch backend here; the triton backend's split is held to one call on the GPU)."""
import pytest
import torch

import mom_wrap.recurrence as recurrence
import mom_wrap.wrapper as wrapper
from mom_wrap.adapters.base import _REGISTRY
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import wrap

ADAPTERS = {a.host_class.rpartition('.')[2]: a for a in _REGISTRY if a.load_host_class() is not None}


def _plan(memory, valid=None, num_memories=4):
    N, s = memory.shape
    sequence = torch.arange(N) // (N // 2)  # two sequences
    return plan_dispatch(memory, torch.rand(N, s), sequence, valid, 2, num_memories)


def test_split_cuts_at_the_memory_boundaries_nearest_equal_shares():
    # memories 0..3 get 2, 6, 2, 6 slots of the 16 (8 tokens x 2 slots): halves cut at 8 (of ends 2, 8, 10, 16), thirds
    # (targets 5.3 and 10.7) at 8 and 10
    memory = torch.tensor([[0, 1], [0, 1], [1, 3], [1, 3], [1, 3], [1, 3], [2, 3], [2, 3]])
    plan = _plan(memory)
    assert [p.num_slots for p in plan.split(2)] == [8, 8]
    assert [p.num_slots for p in plan.split(3)] == [8, 2, 6]
    assert plan.split(1) == [plan]
    for parts in (2, 3):
        pieces = plan.split(parts)
        assert torch.equal(torch.cat([p.token for p in pieces]), plan.token)
        assert torch.equal(torch.cat([p.position for p in pieces]), plan.position)
        assert sum(p.num_segments for p in pieces) == plan.num_segments
        for p in pieces:  # each part's layout: its own segments, from row 0, one memory per segment
            assert p.cu_seqlens_cpu[0] == 0 and p.cu_seqlens_cpu[-1] == p.num_slots
            assert torch.equal(p.cu_seqlens.cpu(), p.cu_seqlens_cpu)
            starts = p.cu_seqlens_cpu[:-1]
            assert torch.equal(p.memory[starts], p.segment_memory)
            assert p.max_seqlen == int(p.cu_seqlens_cpu.diff().max())
        # every token slot is in exactly one part, under the row its part gives it
        inside = torch.stack([p.restore < p.num_slots for p in pieces])
        assert (inside.sum(0) == 1).all()
        rows = torch.zeros_like(plan.restore)
        offset = 0
        for p, here in zip(pieces, inside):
            rows = torch.where(here, p.restore + offset, rows)
            offset += p.num_slots
        assert torch.equal(rows, plan.restore)


def test_split_of_one_memory_is_the_plan_itself():
    plan = _plan(torch.zeros(8, 1, dtype=torch.long))
    assert plan.split(2) == [plan]


def test_split_with_padding_keeps_padding_out():
    memory = torch.tensor([[0, 1], [2, 3]] * 4)
    valid = torch.tensor([False, True, True, True, False, False, True, True])
    plan = _plan(memory, valid)
    pieces = plan.split(2)
    assert len(pieces) == 2 and sum(p.num_slots for p in pieces) == plan.num_slots == 10
    for p in pieces:
        assert (p.restore[~valid] == p.num_slots).all()  # padding tokens: no slot in any part
        assert (p.token_weight[~valid] == 0).all()


@pytest.mark.parametrize('host', sorted(ADAPTERS))
@pytest.mark.parametrize('padded', [False, True])
def test_parts_equal_one_call(host, padded, monkeypatch):
    """Outputs and every gradient, with the recurrence in 1 and in 3 calls (the wrapper's torch backend makes
    one call: the test routes it through ``run_recurrence`` with the parts it asks for)."""
    torch.manual_seed(0)
    mom = wrap(ADAPTERS[host].example_host().double(), init='random', backend='torch').train()
    hidden = mom.hidden_size
    x = torch.randn(2, 12, hidden, dtype=torch.float64)
    kwargs = mom._adapter.example_inputs(x)
    if padded:
        if not mom._adapter.convention.padding_mask:
            pytest.skip("the host's layer takes no padding mask")
        kwargs['attention_mask'] = torch.tensor([[0] * 5 + [1] * 7, [1] * 12])
    runs = []
    for parts in (1, 3):
        monkeypatch.setattr(wrapper, 'run_recurrence',
                            lambda a, r, w, d, b, _parts, n=parts: recurrence.run_recurrence(a, r, w, d, b, n))
        xi = x.clone().requires_grad_()
        y = mom._adapter.convention.outputs(mom(xi, **kwargs))[0]
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()])
        mom.zero_grad()
    names = ['output', 'input grad'] + [n for n, _ in mom.named_parameters()]
    for a, b, n in zip(*runs, names):
        torch.testing.assert_close(b, a, msg=n)
