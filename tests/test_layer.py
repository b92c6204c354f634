"""MixtureOfMemories(GatedDeltaNet) on the CPU (torch backend) against independent references. The checks every host
passes alike (causal, batch rows, left padding, packed sequences, gradients against finite differences):
tests/test_every_host.py."""
import copy

import pytest
import torch
from fla.layers import GatedDeltaNet
from hypothesis import HealthCheck, given, settings, strategies as st

from mom_wrap import MixtureOfMemories, load_balancing_loss, supported_hosts
from tests.reference import gdn_host_reference, naive_mom
from mom_wrap.testing import routing_rounding

HIDDEN = 64


def make_host(**kw):
    cfg = dict(hidden_size=HIDDEN, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)
    cfg.update(kw)
    return GatedDeltaNet(**cfg)


def wrap(host=None, num_memories=4, topk=2, shared_memory=True, init='copy', balance_loss_weight=0.0, **kw):
    """The tests compare gradients with references that have no balancing loss: off unless asked for."""
    return MixtureOfMemories(host if host is not None else make_host(), num_memories=num_memories, topk=topk,
                             shared_memory=shared_memory, init=init, balance_loss_weight=balance_loss_weight, **kw)


def close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (ref max {scale:.3e})"


def assert_gradients_of_naive_loop(mom, run, naive, tol=1e-4):
    """run(mom).square().mean() gives every parameter of ``mom`` a finite nonzero gradient, equal to the one
    naive(copy of mom) gives (but the router's: a naive loop routes in fp32 without the router's straight path)."""
    run(mom).square().mean().backward()
    ref = copy.deepcopy(mom)
    ref.zero_grad()
    naive(ref).square().mean().backward()
    want = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        if name != 'router.weight':
            close(p.grad, want[name].grad, tol=tol)


HOST_VARIANTS = [{}, dict(num_v_heads=4), dict(use_gate=False), dict(allow_neg_eigval=True),
                 dict(conv_bias=True), dict(use_short_conv=False)]


@pytest.mark.parametrize('host_kw', HOST_VARIANTS)
def test_one_memory_reproduces_host_math(host_kw):
    host = make_host(**host_kw)
    ref_host = copy.deepcopy(host)
    mom = wrap(host, num_memories=1, topk=1, shared_memory=False)
    x = torch.randn(3, 21, HIDDEN)
    close(mom(x)[0], gdn_host_reference(ref_host, x))


@pytest.mark.parametrize('host_kw', HOST_VARIANTS[1:])
def test_host_variants_match_naive_per_memory_loop(host_kw):
    mom = wrap(make_host(**host_kw), num_memories=3, topk=2, init='random')
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    if host_kw.get('conv_bias'):  # fresh conv biases start at zero-ish; make them matter
        for b in mom.memories.conv_bias.values():
            torch.nn.init.normal_(b.data)
    x = torch.randn(2, 19, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


def test_all_memories_copied_without_shared_reproduce_host_math():
    host = make_host()
    expect = gdn_host_reference(copy.deepcopy(host), x := torch.randn(2, 17, HIDDEN))
    mom = wrap(host, num_memories=4, topk=4, shared_memory=False)
    torch.nn.init.normal_(mom.router.weight)  # uneven weights; they sum to 1 and every copy agrees
    close(mom(x)[0], expect)


@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('num_memories,topk', [(4, 2), (3, 1), (5, 3)])
def test_matches_naive_per_memory_loop(shared, num_memories, topk):
    mom = wrap(num_memories=num_memories, topk=topk, shared_memory=shared, init='random')
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    x = torch.randn(3, 23, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


def test_random_init_differs_per_memory_and_copy_init_copies():
    host = make_host()
    k = host.k_proj.weight.detach().clone()
    copied = wrap(copy.deepcopy(host), init='copy')
    assert all(torch.equal(copied.memories.proj['k'][e], k) for e in range(5))
    fresh = wrap(host, init='random')
    w = fresh.memories.proj['k']
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[0], k)
    # the host's own init (kaiming uniform, bound 1/sqrt(fan_in)) rather than anything of ours
    assert w.abs().max() <= HIDDEN ** -0.5 + 1e-6


def test_gradients_reach_router_memories_and_read_side():
    mom = wrap(init='random')
    x = torch.randn(2, 16, HIDDEN, requires_grad=True)
    o, _, _ = mom(x)
    o.square().mean().backward()
    named = dict(mom.named_parameters())
    grads = {n: p.grad for n, p in named.items()}
    grads.update({f'memories.proj.{n}': g for n, g in mom.memories.split(grads['memories.weight']).items()})
    for name in ['router.weight', 'memories.proj.k', 'memories.proj.v', 'memories.proj.a', 'memories.proj.b',
                 'memories.conv.k', 'memories.conv.v', 'host.q_proj.weight', 'host.o_proj.weight',
                 'host.A_log', 'host.dt_bias']:
        g = grads[name]
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the routed memories' gradients match the naive loop's
    ref = wrap(init='random')
    ref.load_state_dict(mom.state_dict())
    x2 = x.detach().clone()
    naive_mom(ref, x2).square().mean().backward()
    mom.zero_grad()
    mom(x2)[0].square().mean().backward()
    for name in ['router.weight', 'memories.weight', 'memories.conv.v', 'host.q_proj.weight']:
        close(named[name].grad, dict(ref.named_parameters())[name].grad, tol=1e-4)


def test_write_side_moves_out_of_the_host():
    mom = wrap()
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj', 'host.a_proj', 'host.b_proj', 'host.k_conv1d'))
                   for n in names)


def test_router_logits_and_balance_loss():
    mom = wrap(init='random')
    x = torch.randn(2, 10, HIDDEN)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    mom(x, attention_mask=mask)
    assert mom.router_logits.shape == (2, 10, 4) and mom.router_logits.dtype == torch.float32
    logits = mom.router_logits[mask.bool()]
    probs = logits.softmax(-1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == e).float().sum() for e in range(4)]) / (logits.shape[0] * 2)
    expect = 4 * (f * probs.mean(0)).sum()
    close(load_balancing_loss(mom), expect, tol=1e-6)
    # averaged over layers
    outer = torch.nn.ModuleList([mom, wrap(init='random')])
    outer[1](x)
    close(load_balancing_loss(outer), (mom.balance_loss + outer[1].balance_loss) / 2, tol=1e-6)
    # uniform routing gives exactly 1
    uniform = wrap(num_memories=4, topk=4, init='random')
    torch.nn.init.zeros_(uniform.router.weight)
    uniform(x)
    close(load_balancing_loss(uniform), torch.tensor(1.0), tol=1e-6)


@pytest.mark.parametrize('kw,match', [
    (dict(num_memories=2, topk=3), 'topk'),
    (dict(num_memories=0, topk=1), 'num_memories'),
    (dict(num_memories=4, topk=0), 'topk'),
    (dict(init='zeros'), 'init'),
    (dict(backend='cuda'), 'backend'),
    (dict(init='preserve', shared_memory=False), "init: 'preserve' needs shared_memory=True"),
    (dict(recurrence_parts=0), 'recurrence_parts'),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        wrap(**kw)


def test_bad_types_and_inputs():
    with pytest.raises(TypeError, match='num_memories'):
        wrap(num_memories=2.0)
    with pytest.raises(TypeError, match='recurrence_parts'):
        wrap(recurrence_parts=1.5)
    mom = wrap()
    mom.recurrence_parts = 0  # settable at any time: checked where used
    with pytest.raises(ValueError, match='recurrence_parts'):
        mom(torch.randn(2, 5, HIDDEN))
    mom.recurrence_parts = 1
    with pytest.raises(ValueError, match='hidden_states'):
        mom(torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(ValueError, match='hidden_states'):
        mom(torch.randn(5, HIDDEN))
    with pytest.raises(TypeError, match='hidden_states'):
        mom([[0.0] * HIDDEN])
    with pytest.raises(ValueError, match='attention_mask'):
        mom(torch.randn(2, 5, HIDDEN), attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match='cu_seqlens'):
        mom(torch.randn(2, 5, HIDDEN), cu_seqlens=torch.tensor([0, 5]))
    for bad in ([0, 3, 4], [1, 3, 5], [0, 4, 2, 5]):
        with pytest.raises(ValueError, match='cu_seqlens'):
            mom(torch.randn(1, 5, HIDDEN), cu_seqlens=torch.tensor(bad))
    with pytest.raises(TypeError, match='cu_seqlens'):
        mom(torch.randn(1, 5, HIDDEN), cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match='load_balancing|no MixtureOfMemories'):
        load_balancing_loss(torch.nn.Linear(2, 2))


def test_unsupported_host_lists_supported_hosts():
    with pytest.raises(ValueError, match='host') as err:
        MixtureOfMemories(torch.nn.Linear(4, 4), num_memories=2, topk=1)
    for name in supported_hosts():
        assert name in str(err.value)


def test_all_padding_gives_zeros():
    mom = wrap()
    out = mom(torch.randn(2, 6, HIDDEN), attention_mask=torch.zeros(2, 6, dtype=torch.long))[0]
    assert out.shape == (2, 6, HIDDEN) and torch.all(out == 0)


def test_autocast_bf16_runs_close_to_fp32_with_fp32_router():
    mom = wrap(init='random')
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    x = torch.randn(2, 16, HIDDEN)
    want = mom(x)[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = mom(x)[0]
        assert mom.router_logits.dtype == torch.float32
        got.float().square().mean().backward()
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 3e-2, err
    assert mom.memories.weight.grad.dtype == torch.float32 and mom.router.weight.grad is not None


def test_memory_without_tokens_still_gets_a_gradient_tensor():
    """Stacked parameters: a memory no token chose still has a (zero) gradient, as DDP without
    find_unused_parameters needs."""
    mom = wrap(num_memories=4, topk=1, shared_memory=False, init='random')
    with torch.no_grad():
        mom.router.weight.zero_()
        mom.router.weight[0] = 10.0  # x . w0 dominates for inputs with a positive sum
    x = torch.rand(2, 12, HIDDEN)
    mom(x)[0].square().mean().backward()
    assert torch.all(mom.router_logits.argmax(-1) == 0)
    for g in mom.memories.split(mom.memories.weight.grad).values():
        assert g[0].abs().sum() > 0 and torch.all(g[1:] == 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_property_any_routing_shape_matches_naive_loop(data):
    M = data.draw(st.integers(1, 5), label='M')
    k = data.draw(st.integers(1, M), label='topk')
    shared = data.draw(st.booleans(), label='shared')
    lengths = data.draw(st.lists(st.integers(1, 11), min_size=1, max_size=3), label='lengths')
    mom = wrap(num_memories=M, topk=k, shared_memory=shared, init='random')
    torch.nn.init.normal_(mom.router.weight, std=data.draw(st.sampled_from([0.05, 1.0, 5.0]), label='router std'))
    T = max(lengths)
    x = torch.randn(len(lengths), T, HIDDEN)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    out = mom(x, attention_mask=mask)[0]
    for b, n in enumerate(lengths):
        # fp32, and the naive loop routes the sequence's rows alone: fp32 weights rounded for another row count
        # (tests/routing_rounding.py: up to ~4e-5 at router std 5)
        close(out[b, T - n:], naive_mom(mom, x[b:b + 1, T - n:])[0], tol=2e-5 + routing_rounding(mom, x[b, T - n:]))
