"""The recurrence in parts over time (``mom_wrap.recurrence``, ``Dispatch.time_parts``): the parts' layout, and
the same outputs and gradients as one call for every host (torch backend here, fp64; the triton backend's
parts are held to one call on the GPU, tests/test_gpu.py)."""
import pytest
import torch

import mom_wrap.recurrence as recurrence
from mom_wrap.dispatch import Dispatch, plan_dispatch
from mom_wrap.fla_mom import FlaMomAdapter
from mom_wrap.testing import recurrence_calls, wrap
from tests import hosts

ADAPTERS = {name: (a, None) for name, a in hosts.ADAPTERS.items()}
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


@pytest.mark.parametrize('host', [*hosts.params(), 'GatedDeltaNet/FlaMomAdapter'])
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


GPU_HOSTS = hosts.params(['GatedLinearAttention', 'DeltaNet', 'RWKV6Attention', 'RWKV7Attention', 'Mamba2'])


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


# ------------------------------------------------------------------ the backward in groups of whole segments

@pytest.mark.parametrize('parts', [2, 3])
def test_segment_groups_cut_at_the_boundaries_nearest_to_even_shares(parts):
    from fla.ops.utils.index import prepare_chunk_indices
    torch.manual_seed(0)
    memory = torch.stack([torch.randperm(4)[:2] for _ in range(200)])  # two sequences, top-2 of 4: 8 segments
    plan = _plan(memory)
    cu = plan.cu_seqlens_cpu
    S = plan.num_slots
    groups = plan.segment_groups(parts, 16)
    assert len(groups) == parts
    assert groups[0].start == 0 and groups[-1].stop == S
    for i, g in enumerate(groups):
        if i:
            assert g.start == groups[i - 1].stop
        # each cut: the segment boundary nearest to i * S / parts
        target = S * (i + 1) / parts
        if i + 1 < parts:
            assert abs(g.stop - target) == (cu.double() - target).abs().min()
        first = int(torch.searchsorted(cu, g.start))
        assert cu[first] == g.start  # whole segments
        assert torch.equal(g.cu_seqlens_cpu, cu[first:first + g.cu_seqlens_cpu.numel()] - g.start)
        assert g.cu_seqlens_cpu[-1] == g.stop - g.start
        assert torch.equal(g.cu_seqlens.cpu(), g.cu_seqlens_cpu)
        assert torch.equal(g.chunk_indices.cpu(), prepare_chunk_indices(g.cu_seqlens_cpu, 16))


def test_segment_groups_give_way_to_a_segment_too_long_to_balance():
    # one sequence, top-2 of 2 + shared: three segments of 40 slots, no cut near the middle
    memory = torch.tensor([[0, 1]] * 40)
    sequence = torch.zeros(40, dtype=torch.long)
    plan = plan_dispatch(torch.cat([memory, torch.full((40, 1), 2)], 1), torch.ones(40, 3), sequence, None, 1, 3)
    assert plan.cu_seqlens_cpu.tolist() == [0, 40, 80, 120]
    assert plan.segment_groups(2, 64) == []  # 80 | 40 or 40 | 80: over 1.25 x 120 / 2
    assert [(g.start, g.stop) for g in plan.segment_groups(2, 64, slack=1.5)] == [(0, 80), (80, 120)]  # (a tie)
    assert [(g.start, g.stop) for g in plan.segment_groups(3, 64)] == [(0, 40), (40, 80), (80, 120)]
    assert plan.segment_groups(1, 64) == []
    one = plan_dispatch(torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), torch.zeros(8, dtype=torch.long),
                        None, 1, 1)
    assert one.segment_groups(2, 64) == []  # a single segment


def _naive_gated_delta(q, k, v, beta, a, A_log, dt_bias, scale, cu_seqlens, initial_state=None):
    """fla's naive recurrent gated delta rule per segment of [1, S, ...] inputs (q, k normalised, beta after its
    sigmoid, the gate made from its raw input a as fla's in-kernel gate does), from initial_state [G, HV, V, K]
    (the adapter's state_v_first layout) or zeros. Returns o [1, S, HV, V] and the final states [G, HV, V, K]."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    g = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias.float())
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i:i + 1].transpose(-1, -2)
        o, h = naive_recurrent_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], g[:, s:e],
                                                scale=scale, initial_state=h0, output_final_state=True)
        outs.append(o)
        states.append(h[0].transpose(-1, -2))
    return torch.cat(outs, 1), torch.stack(states)


def _marker(k):
    """What the naive forward saves as fla's A [1, S, H, 64]: a function of each row of k, so that the backward can
    check it got the rows of its own group."""
    return k.float().sum(-1, keepdim=True).expand(*k.shape[:-1], 64).contiguous()


def _naive_chunk_functions(monkeypatch, calls):
    """fla's ``chunk_gated_delta_rule_fwd`` / ``_bwd`` (which its chunk kernels run, and which do not run in the
    interpreter) replaced by its naive rule per segment, the backward by autograd through it; each call logged in
    ``calls`` as (direction, rows). The backward checks that the saved tensors it gets are its own rows."""
    import fla.ops.gated_delta_rule.chunk as fla_chunk
    from fla.ops.utils.index import prepare_chunk_indices

    def naive_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                  chunk_indices, use_gate_in_kernel, A_log, dt_bias, chunk_size, cp_context=None):
        assert state_v_first and use_gate_in_kernel
        assert torch.equal(chunk_indices, prepare_chunk_indices(cu_seqlens, chunk_size))
        calls.append(('fwd', q.shape[1]))
        o, ht = _naive_gated_delta(q, k, v, beta, g, A_log, dt_bias, scale, cu_seqlens, initial_state)
        return g.float() * 3, o, _marker(k), ht if output_final_state else None, initial_state, g

    def naive_bwd(q, k, v, g, beta, A, scale, initial_state, do, dht, state_v_first, cu_seqlens, chunk_indices,
                  use_gate_in_kernel, g_input, A_log, dt_bias, chunk_size, cp_context=None):
        assert torch.equal(chunk_indices, prepare_chunk_indices(cu_seqlens, chunk_size))
        assert cu_seqlens[-1] == q.shape[1]
        assert torch.equal(A, _marker(k)) and torch.equal(g, g_input.float() * 3)  # the call's own rows
        calls.append(('bwd', q.shape[1]))
        leaves = [t.detach().requires_grad_() for t in (q, k, v, beta, g_input, A_log, dt_bias)]
        h0 = None if initial_state is None else initial_state.detach().requires_grad_()
        with torch.enable_grad():
            o, ht = _naive_gated_delta(*leaves[:4], *leaves[4:], scale, cu_seqlens, h0)
            loss = (o * do).sum() + ((ht * dht).sum() if dht is not None else 0)
            grads = torch.autograd.grad(loss, leaves + ([h0] if h0 is not None else []))
        dq, dk, dv, db, dg, dA, ddt = grads[:7]
        return dq, dk, dv, db, dg, grads[7] if h0 is not None else None, dA, ddt

    monkeypatch.setattr(fla_chunk, 'chunk_gated_delta_rule_fwd', naive_fwd)
    monkeypatch.setattr(fla_chunk, 'chunk_gated_delta_rule_bwd', naive_bwd)


def _backends_agree(mom, runs_of):
    """Output, input gradient and every parameter gradient of ``mom`` for each (backend, parts) of ``runs_of``
    (after each run, ``runs_of``'s callback checks the calls), all against the torch backend in one call."""
    x = torch.randn(2, 24, mom.hidden_size)
    dy = torch.randn(2, 24, mom.hidden_size)
    runs = {}
    for (backend, parts), check in runs_of.items():
        mom.backend, mom.recurrence_parts = backend, parts
        xi = x.clone().requires_grad_()
        y = mom(xi)[0]
        y.backward(dy)
        runs[backend, parts] = [y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()]
        mom.zero_grad()
        check(backend, parts)
    names = ['output', 'input grad'] + [n for n, _ in mom.named_parameters()]
    reference = runs['torch', 1]
    for key, run in runs.items():
        for a, b, n in zip(reference, run, names):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f'{key}: {n}')


@pytest.mark.interpreter
def test_backward_in_groups_wiring(monkeypatch):
    """The triton backend's GatedDeltaNet in training with ``recurrence_parts`` 1, 2 and 3, fla's chunk functions
    replaced by its naive rule (``_naive_chunk_functions``). What this holds: one forward call and one backward call
    per group (cut where ``segment_groups`` says), each on its own rows of what the forward saved, fla's L2 norms
    and beta sigmoid around them (real, interpreted), the groups' gradients put together, A_log's and dt_bias's
    summed; outputs and every gradient equal the torch backend's."""
    calls = []
    _naive_chunk_functions(monkeypatch, calls)
    made, segment_groups = [], Dispatch.segment_groups
    monkeypatch.setattr(Dispatch, 'segment_groups', lambda *a, **k: made.append(segment_groups(*a, **k)) or made[-1])
    registered, _ = ADAPTERS['GatedDeltaNet']
    mom = wrap(registered.example_host(), init='random', backend='torch', num_memories=4, topk=2).train()
    S = 3 * 2 * 24

    def check(backend, parts):
        if backend == 'triton':
            rows = [S] if parts == 1 else [g.stop - g.start for g in made.pop()]
            assert len(rows) == parts and not made
            assert calls == [('fwd', S)] + [('bwd', n) for n in rows]
        calls.clear()
    _backends_agree(mom, {('torch', 1): check, ('triton', 1): check, ('triton', 2): check, ('triton', 3): check})


@pytest.mark.interpreter
def test_backward_in_groups_gives_way_to_the_parts_over_time(monkeypatch):
    """Where the segments do not split evenly (``segment_groups`` says []), the triton backend's GatedDeltaNet
    runs the parts over time instead (fla's chunk function per part, states carried): the norms the groups' path
    queued before it asked are dropped, and outputs and gradients still equal the torch backend's."""
    calls = []
    _naive_chunk_functions(monkeypatch, calls)
    monkeypatch.setattr(Dispatch, 'segment_groups', lambda *a, **k: [])
    monkeypatch.setattr(recurrence, 'ALIGN', 2)  # (short segments: blocks of 2 rows, as test_parts_equal_one_call)
    registered, _ = ADAPTERS['GatedDeltaNet']
    mom = wrap(registered.example_host(), init='random', backend='torch', num_memories=4, topk=2).train()

    def check(backend, parts):
        if backend == 'triton':  # two forward calls over time, and their two backward calls
            assert [c[0] for c in calls] == ['fwd', 'fwd', 'bwd', 'bwd'] and sum(n for _, n in calls[:2]) == 144
        calls.clear()
    _backends_agree(mom, {('torch', 1): check, ('triton', 2): check})
