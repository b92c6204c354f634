"""MixtureOfMemories(RWKV6Attention): fla's RWKV-6 layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent path, run by Triton's interpreter on the CPU),
and a naive per-memory loop built here from independent pieces (F.linear, an explicit token shift per
sequence, fla's own ``naive_recurrent_rwkv6``): nothing of mom_wrap's dispatch, layout conv, grouped linear or
reference recurrence is used by it. The read side (token shift, mixes) runs over the whole sequence in token
order; each memory's recurrence over the tokens routed to it. The checks every host passes alike (cached
generation, padding, packing, causality, copied memories): tests/test_every_host.py, on the example host
(``RWKV6Adapter.example_host``, the parameters the host initialises to zero redrawn; ``make_host`` here redraws
every one).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers.rwkv6 import RWKV6Attention
from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

from mom_wrap import MixtureOfMemories, supported_hosts
from mom_wrap.adapters.rwkv6 import rwkv6_reference
from mom_wrap.testing import routed
from tests.test_every_host import run_chunks
from tests.test_layer import close

HIDDEN = 64
interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason='needs TRITON_INTERPRET=1 or CUDA')


def make_host(**kw):
    """A small RWKV6Attention with every parameter random: the host's own init zeroes the mixes (mu, x_bias),
    the bonus and the decay LoRA's first stage, under which the token shift and u would go untested."""
    cfg = dict(hidden_size=HIDDEN, num_heads=2, expand_k=0.5, expand_v=1.0, proj_low_rank_dim=8,
               gate_low_rank_dim=16, layer_idx=0)
    cfg.update(kw)
    host = RWKV6Attention(**cfg)
    with torch.no_grad():
        for name, p in host.named_parameters():
            if p.dim() == 2 and name not in ('x_bias', 'bonus'):
                p.normal_(0, p.shape[-1] ** -0.5)  # fan-in scale: projections keep unit size
            else:
                p.normal_(0, 0.5)
        if host.g_norm.weight is not None:
            host.g_norm.weight.add_(1.0)
    return host


def wrap(host=None, num_memories=4, topk=2, shared_memory=True, init='copy', balance_loss_weight=0.0, **kw):
    mom = MixtureOfMemories(host if host is not None else make_host(), num_memories=num_memories, topk=topk,
                            shared_memory=shared_memory, init=init, balance_loss_weight=balance_loss_weight, **kw)
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    return mom


def mom_layer(shared=True, **kw):
    """Routed layer whose memories differ: init='random' makes fresh write-side weights per memory."""
    return wrap(init='random', shared_memory=shared, backend='torch', **kw)


# ---------------------------------------------------------------------------------------------------------------
# the naive reference, one sequence and one memory at a time


def token_shift_delta(x):
    """x [T, D] of one sequence -> x_{t-1} - x_t, with a zero before the first token."""
    return F.pad(x, (0, 0, 1, 0))[:-1] - x


def host_read(host, x):
    """Read side over one whole sequence x [T, hidden]: r [T, H, K], g [T, value_dim] and the mixes
    {'r', 'w', 'k', 'v', 'g'} [T, hidden] the projections read."""
    T = x.shape[0]
    delta = token_shift_delta(x)
    lerp = host.x_proj[0]
    low = torch.tanh(F.linear(x + delta * lerp.mu, lerp.linear.weight)).view(T, 5, -1)
    out = host.x_proj[2].weight.view(HIDDEN, 5, -1)
    mu = torch.stack([F.linear(low[:, i], out[:, i]) for i in range(5)], 1) + host.x_bias  # each mix its slice
    mixes = {name: x + delta * mu[:, i] for i, name in enumerate('rwkvg')}
    r = F.linear(mixes['r'], host.r_proj.linear.weight).view(T, host.num_heads, host.head_k_dim)
    g = F.linear(mixes['g'], host.g_proj.linear.weight)
    return r, g, mixes


def host_write(host, mixes, weights):
    """One memory's write side on its tokens: k [T, H, K], v [T, H, V], log decay w [T, H, K]."""
    H = host.num_heads
    k = F.linear(mixes['k'], weights['k']).view(-1, H, host.head_k_dim)
    v = F.linear(mixes['v'], weights['v']).view(-1, H, host.head_v_dim)
    w = F.linear(torch.tanh(F.linear(mixes['w'], weights['w1'])), weights['w2'], weights['w2_bias'])
    return k, v, -w.exp().view(-1, H, host.head_k_dim)


def memory_out(host, r, k, v, w):
    """fla's naive RWKV-6 recurrence over one memory's tokens ([T, H, *] in, [T, H, V] out; scale 1 as the host)."""
    o, _ = naive_recurrent_rwkv6(*(t.transpose(0, 1)[None] for t in (r, k, v, w)), host.bonus, scale=1.0)
    return o[0].transpose(0, 1)


def host_finish(host, o, g):
    """o [T, H, V] -> [T, hidden]: per-head norm (mean and variance), affine, swish(g), o_proj."""
    n = host.g_norm
    o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + n.eps)
    o = o.flatten(1) * n.weight + n.bias
    return F.linear(o * F.silu(g), host.o_proj.weight)


def memory_weights(mom, e):
    bank = mom.memories
    return dict(k=bank.proj['k'][e], v=bank.proj['v'][e], w1=bank.proj['w'][e], w2=bank.second['w'][e],
                w2_bias=bank.second_bias['w'][e])


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``: fp32, all
    B * T tokens in one call as the layer routes a forward (another row count rounds the weights ~1e-7 apart)."""
    host, M = mom.host, mom.num_memories
    probs = F.linear(x.flatten(0, 1).float(), mom.router.weight.float()).softmax(-1).view(*x.shape[:2], -1)
    out = []
    for xb, pb in zip(x, probs):
        top_p, top_i = routed(pb, mom.topk)  # the router's rule, ties included
        r, g, mixes = host_read(host, xb)
        o = torch.zeros(xb.shape[0], host.num_heads, host.head_v_dim, dtype=x.dtype)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel].to(x.dtype)
                sub = {n: t[sel] for n, t in mixes.items()}
                o[sel] += w[:, None, None] * memory_out(host, r[sel], *host_write(host, sub, memory_weights(mom, e)))
        if mom.shared_memory:
            o += memory_out(host, r, *host_write(host, mixes, memory_weights(mom, M)))
        out.append(host_finish(host, o, g))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# the torch backend's recurrence


def test_reference_recurrence_equals_fla_naive_per_segment():
    """rwkv6_reference over packed segments with initial states = fla's naive recurrence segment by segment."""
    H, K, V = 2, 8, 4
    lengths = [5, 1, 9, 3]
    S = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    position = torch.cat([torch.arange(n) for n in lengths])
    r, k, w = torch.randn(S, H, K), torch.randn(S, H, K), -torch.randn(S, H, K).exp()
    v, u, h0 = torch.randn(S, H, V), torch.randn(H, K), torch.randn(len(lengths), H, K, V)
    o, ht = rwkv6_reference(r, k, v, w, u, cu, position, scale=0.5, initial_state=h0, output_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        o_i, ht_i = naive_recurrent_rwkv6(*(t[s:e].transpose(0, 1)[None] for t in (r, k, v, w)), u, scale=0.5,
                                          initial_state=h0[i:i + 1], output_final_state=True)
        close(o[s:e], o_i[0].transpose(0, 1), tol=1e-5)
        close(ht[i], ht_i[0], tol=1e-5)


@interpreter
def test_reference_recurrence_equals_fla_fused_recurrent_varlen():
    from fla.ops.rwkv6 import fused_recurrent_rwkv6
    H, K, V = 2, 16, 16
    lengths = [4, 1, 7]
    cu = torch.tensor([0] + lengths).cumsum(0)
    position = torch.cat([torch.arange(n) for n in lengths])
    S = sum(lengths)
    r, k, w = torch.randn(S, H, K), torch.randn(S, H, K), -torch.randn(S, H, K).exp()
    v, u, h0 = torch.randn(S, H, V), torch.randn(H, K), torch.randn(len(lengths), H, K, V)
    o, ht = rwkv6_reference(r, k, v, w, u, cu, position, initial_state=h0, output_final_state=True)
    o_k, ht_k = fused_recurrent_rwkv6(r[None], k[None], v[None], w[None], u, scale=1.0, initial_state=h0,
                                      output_final_state=True, cu_seqlens=cu)
    close(o, o_k[0], tol=1e-5)
    close(ht, ht_k, tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# one memory = the real fla layer


VARIANT = dict(gate_fn='sigmoid', elementwise_affine=False, expand_k=1.0, num_heads=4, mode='fused_recurrent')


@interpreter
@pytest.mark.parametrize('host_kw', [{}, VARIANT], ids=['default', 'variant'])
def test_one_memory_equals_real_host_layer(host_kw):
    """Both backends against the host's eval forward (variant: sigmoid gate, GroupNorm without affine,
    K = V = 16 with 4 heads, mode='fused_recurrent')."""
    host = make_host(**host_kw).eval()
    x = torch.randn(2, 16, HIDDEN)
    with torch.no_grad():
        expect = copy.deepcopy(host)(x)[0]
        mom = wrap(host, num_memories=1, topk=1, shared_memory=False).eval()
        for backend in ('torch', 'triton'):
            mom.backend = backend
            close(mom(x)[0], expect, tol=1e-5)


@interpreter
def test_one_memory_padding_and_packing_equal_real_host_layer():
    """fla's token shift with cu_seqlens and its masking of left padding against our layout conv."""
    host = make_host().eval()
    ref = copy.deepcopy(host)
    mom = wrap(host, num_memories=1, topk=1, shared_memory=False, backend='torch').eval()
    lengths = [12, 5, 1]
    T = max(lengths)
    x = torch.randn(3, T, HIDDEN)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    packed = torch.cat([x[b, T - n:] for b, n in enumerate(lengths)])[None]
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        want, got = ref(x, attention_mask=mask)[0], mom(x, attention_mask=mask)[0]
        valid = mask.bool()
        close(got[valid], want[valid], tol=1e-5)
        close(mom(packed, cu_seqlens=cu)[0], ref(packed, cu_seqlens=cu)[0], tol=1e-5)


@interpreter
def test_one_memory_cache_equals_real_host_cache():
    """Prefill, decode and chunked prefill next to the real layer's own cache: same outputs and recurrent states
    (ours [N, 1, H, K, V], the host's [N, H, K, V]), same seen-token count."""
    host = make_host().eval()
    ref = copy.deepcopy(host)
    mom = wrap(host, num_memories=1, topk=1, shared_memory=False, backend='torch').eval()
    x = torch.randn(2, 15, HIDDEN)
    sizes = [9, 1, 4, 1]
    with torch.no_grad():
        got, cache = run_chunks(mom, x, sizes)
        want, ref_cache = run_chunks(ref, x, sizes)
    close(got, want, tol=1e-5)
    close(cache[0]['recurrent_state'][:, 0], ref_cache[0]['recurrent_state'], tol=1e-5)
    # the shift's cached window ends with the last token, the host's conv_state
    close(cache[0]['conv_state']['read']['shift'][..., -1], ref_cache[0]['conv_state'], tol=0)
    assert cache.get_seq_length(0) == ref_cache.get_seq_length(0) == sum(sizes)


# ---------------------------------------------------------------------------------------------------------------
# routed memories = the naive per-memory loop


@pytest.mark.parametrize('shared,backend', [(False, 'torch'), (True, 'torch'),
                                            pytest.param(True, 'triton', marks=interpreter)])
def test_matches_naive_per_memory_loop(shared, backend):
    mom = mom_layer(shared).eval()
    mom.backend = backend
    x = torch.randn(2, 19, HIDDEN)
    with torch.no_grad():
        got = mom(x)[0]
        # the routing spreads tokens over every memory, so that each one's segments are tested
        assert set(mom.router_logits.topk(2, -1).indices.flatten().tolist()) == {0, 1, 2, 3}
        close(got, naive_mom(mom, x), tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# gradients


def test_every_parameter_gets_the_naive_loops_gradient():
    """fp64, torch backend: every parameter (the host's token shift, mixes and bonus among them) a finite nonzero
    gradient, the naive loop's (directional finite differences, parameter by parameter: tests/test_every_host.py)."""
    mom = mom_layer().double()
    x = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    target = torch.randn_like(x)
    (mom(x)[0] - target).square().mean().backward()
    params = dict(mom.named_parameters())
    assert {'memories.input_weight.k', 'memories.input_weight.v', 'memories.input_weight.w',
            'memories.second.w', 'memories.second_bias.w', 'host.x_proj.0.mu', 'host.x_bias', 'host.bonus',
            'host.r_proj.linear.weight', 'host.g_proj.linear.weight', 'host.g_norm.weight'} <= set(params)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    ref = copy.deepcopy(mom)
    ref.zero_grad()
    (naive_mom(ref, x) - target).square().mean().backward()
    for name, p in ref.named_parameters():  # fp64, but the same fp32 routing, whose backward is fp32 (~1e-7)
        close(params[name].grad, p.grad, tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the triton backend's kernels


@interpreter
def test_triton_backend_kernel_choice(monkeypatch):
    """chunk_rwkv6 whenever gradients flow or in training (fla's fused_recurrent_rwkv6 backward drops the final
    state's gradient) and for eval segments longer than 64; fused_recurrent_rwkv6 for short eval inputs.
    fla's chunk kernels do not run on the CPU, and the outputs are not checked here: the stubs check each call
    against the real function's signature and return zeros."""
    import inspect

    import fla.ops.rwkv6 as rwkv6_ops
    calls = []

    def stub(name, real):
        def run(r, k, v, w, u, **kwargs):
            inspect.signature(real).bind(r, k, v, w, u, **kwargs)
            assert kwargs['scale'] == 1.0 and kwargs['cu_seqlens'] is not None
            calls.append(name)
            return torch.zeros_like(v), None
        return run

    monkeypatch.setattr(rwkv6_ops, 'chunk_rwkv6', stub('chunk', rwkv6_ops.chunk_rwkv6))
    monkeypatch.setattr(rwkv6_ops, 'fused_recurrent_rwkv6', stub('fused_recurrent', rwkv6_ops.fused_recurrent_rwkv6))

    mom = mom_layer().eval()
    mom.backend = 'triton'
    x = torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        mom(x)
        mom(torch.randn(1, 65, HIDDEN))  # the shared memory's segment holds all 65 tokens
    mom(x)  # eval, but with autograd
    with torch.no_grad():
        mom.train()(x)
    assert calls == ['fused_recurrent', 'chunk', 'chunk', 'chunk']


# ---------------------------------------------------------------------------------------------------------------
# options and the host's modules


def test_write_side_moves_out_of_the_host_and_the_state_dict_stays_clean():
    mom = wrap()
    assert 'fla.layers.rwkv6.RWKV6Attention' in supported_hosts()
    assert not any(hasattr(mom.host, n) for n in ('k_proj', 'v_proj', 'w_proj'))
    assert mom.memories.weight is None  # every projection reads its own mix, none reads x
    assert set(mom.memories.input_weight) == {'k', 'v', 'w'} and set(mom.memories.second) == {'w'}
    # the shift's constant conv weight is a non-persistent buffer: not trained, not saved
    assert not any('shift' in n for n in mom.state_dict())
    assert all('shift' not in n for n, _ in mom.named_parameters())


def test_bf16_autocast_and_bf16_weights_run_close_to_fp32():
    """The shift's constant weight follows .to(bf16) (a buffer) and picks the previous token exactly there too."""
    mom = mom_layer()
    x = torch.randn(2, 16, HIDDEN)
    want = mom(x)[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = mom(x)[0]
        got.float().square().mean().backward()
    assert got.dtype == torch.bfloat16 and ((got.float() - want).norm() / want.norm()).item() < 3e-2
    low = copy.deepcopy(mom).to(torch.bfloat16)
    got = low(x.bfloat16())[0]
    assert got.dtype == torch.bfloat16 and ((got.float() - want).norm() / want.norm()).item() < 3e-2


def test_bias_gelu_gate_is_refused():
    with pytest.raises(ValueError, match='gate_fn'):
        wrap(make_host(gate_fn='bias_gelu'))
