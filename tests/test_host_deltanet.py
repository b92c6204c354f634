"""MixtureOfMemories(DeltaNet): fla's DeltaNet layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent kernel, short convs and fused norms, run by
Triton's interpreter on the CPU, see conftest), and a naive per-memory loop written here from independent
pieces (F.linear, F.conv1d and fla's own ``delta_rule_recurrence``; nothing of mom_wrap's dispatch, grouped
linear, segment conv or reference recurrence). Sizes stay small: the interpreter runs a kernel program per
(sequence, head, 8 value channels) and step. The checks every host passes alike (cached generation, padding,
packing, causality; on DeltaNet's options in tests/hosts.py's VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers import DeltaNet
from fla.models.utils import Cache
from fla.ops.delta_rule.naive import delta_rule_recurrence

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters.deltanet import DeltaNetAdapter, delta_rule_reference
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


@pytest.fixture(autouse=True, scope='module')
def _first_autotune_config_only():
    """Under the interpreter, conftest's autotuner runs each config once, times them all 0 and keeps the first;
    pruning to the first config picks the same one without running the others (which otherwise take most of
    this file's time: fla's conv kernel alone has dozens of configs per shape)."""
    if os.environ.get('TRITON_INTERPRET') != '1':
        yield
        return
    from triton.runtime.autotuner import Autotuner
    prune = Autotuner.prune_configs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Autotuner, 'prune_configs', lambda self, kwargs: prune(self, kwargs)[:1])
        yield


def make_dn(**kw):
    # K = 32 != V = 16: a state stored [V, K] instead of the host's [K, V] cannot pass
    cfg = dict(hidden_size=HIDDEN, expand_k=1.0, expand_v=0.5, num_heads=2, layer_idx=0)
    cfg.update(kw)
    return DeltaNet(**cfg)


# every host option at least once (qk_activation: silu by default, the three others below)
VARIANTS = {
    'default': {},
    'no_beta_sum_relu_gate': dict(use_beta=False, qk_norm='sum', qk_activation='relu', use_gate=True),
    'neg_eigval_elu_conv_bias': dict(allow_neg_eigval=True, qk_activation='elu', conv_bias=True),
    'no_conv_identity': dict(use_short_conv=False, qk_activation='identity', use_gate=True),
    'no_conv_silu_sum_neg': dict(use_short_conv=False, qk_norm='sum', allow_neg_eigval=True, use_beta=False),
}


def mom_dn(variant='default', num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_dn(**VARIANTS[variant]), num_memories, topk, shared, init, backend)


# ---- the naive per-memory loop -------------------------------------------------------------------------

def _conv(x, weight, bias, silu):
    """Causal depthwise conv (+ SiLU) over one (sub)sequence x [T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    y = F.conv1d(x.t()[None], weight, bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t()
    return F.silu(y) if silu else y


def _features(host, x, w, conv_w, conv_b):
    """q or k [T, H, K] of one (sub)sequence x [T, hidden], as DeltaNet.forward makes them (before L2)."""
    y = F.linear(x, w)
    silu = host.qk_activation == 'silu'
    y = _conv(y, conv_w, conv_b, silu) if host.use_short_conv else (F.silu(y) if silu else y)
    if host.qk_activation == 'relu':
        y = y.relu()
    elif host.qk_activation == 'elu':
        y = F.elu(y) + 1
    y = y.view(-1, host.num_heads, host.head_k_dim)
    if host.qk_norm == 'sum':
        y = y / y.abs().sum(-1, keepdim=True).clamp_min(1e-6)
    return y


def memory_weights(mom, e):
    """Memory e's write side as plain tensors."""
    bank = mom.memories
    w = dict(k=bank.proj['k'][e], v=bank.proj['v'][e])
    if 'b' in bank.names:
        w['b'] = bank.proj['b'][e]
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        w[f'{n}_conv_bias'] = bank.conv_bias[n][e] if n in bank.conv_bias else None
    return w


def host_weights(host):
    w = dict(k=host.k_proj.weight, v=host.v_proj.weight)
    if host.use_beta:
        w['b'] = host.b_proj.weight
    if host.use_short_conv:
        for n in ('k', 'v'):
            conv = getattr(host, f'{n}_conv1d')
            w[f'{n}_conv'], w[f'{n}_conv_bias'] = conv.weight, conv.bias
    return w


def dn_write(host, x, w):
    """k [T, H, K], v [T, H, V], beta [T, H] of one memory over its token subsequence x [T, hidden]."""
    k = _features(host, x, w['k'], w.get('k_conv'), w.get('k_conv_bias'))
    v = F.linear(x, w['v'])
    v = _conv(v, w['v_conv'], w['v_conv_bias'], True) if host.use_short_conv else F.silu(v)
    beta = F.linear(x, w['b']).sigmoid() if host.use_beta else x.new_ones(x.shape[0], host.num_heads)
    return k, v.view(-1, host.num_heads, host.head_v_dim), beta * (2.0 if host.allow_neg_eigval else 1.0)


def dn_read(host, x):
    """q [T, H, K] and output gate [T, H, V] (or None) of one sequence x [T, hidden]."""
    conv = host.q_conv1d if host.use_short_conv else None
    q = _features(host, x, host.q_proj.weight, conv and conv.weight, conv and conv.bias)
    gate = F.linear(x, host.g_proj.weight).view(-1, host.num_heads, host.head_v_dim) if host.use_gate else None
    return q, gate


def dn_memory(host, q, k, v, beta, h0=None):
    """One memory over its subsequence through fla's naive recurrence -> o [T, H, V], state [H, K, V]."""
    if host.qk_norm == 'l2':  # fla's in-kernel L2 norm
        q, k = (t * torch.rsqrt(t.square().sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    o, s = delta_rule_recurrence(*(t.transpose(0, 1)[None] for t in (q, k, v, beta)),
                                 initial_state=None if h0 is None else h0[None])
    return o[0].transpose(0, 1), s[0]


def dn_finish(host, o, gate):
    """o [T, H, V] -> [T, hidden]: the host's (gated) RMS norm and output projection."""
    n = host.o_norm
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight
    if host.use_gate:
        y = y * F.silu(gate)
    return F.linear(y.flatten(1), host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M = mom.host, mom.num_memories
    out = []
    for xb in x:
        probs = F.linear(xb, mom.router.weight).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q, gate = dn_read(host, xb)
        o = torch.zeros(xb.shape[0], host.num_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel]
                o_e, _ = dn_memory(host, q[sel], *dn_write(host, xb[sel], memory_weights(mom, e)))
                o[sel] += w[:, None, None] * o_e
        if mom.shared_memory:
            o += dn_memory(host, q, *dn_write(host, xb, memory_weights(mom, M)))[0]
        out.append(dn_finish(host, o, gate))
    return torch.stack(out)


# ---- 1. M = 1 against the real fla layer -----------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_memory_wrapper_equals_real_host_layer(variant):
    """Output with both backends, and the prefill's states against the host's own cache entry: recurrent
    state in the host's layout [B, H, K, V], conv states [B, D, W] (q: read side; k, v: memory 0)."""
    host = make_dn(**VARIANTS[variant]).eval()
    if host.use_short_conv and host.conv_bias:  # fresh conv biases are tiny; make them matter
        for conv in (host.q_conv1d, host.k_conv1d, host.v_conv1d):
            torch.nn.init.normal_(conv.bias.data, std=0.3)
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        host_cache = Cache()
        expect = copy.deepcopy(host)(x, past_key_values=host_cache, use_cache=True)[0]
        mom = MixtureOfMemories(host, num_memories=1, topk=1, shared_memory=False, backend='torch').eval()
        close(mom(x)[0], expect, tol=1e-5)
        cache = Cache()
        close(mom(x, past_key_values=cache, use_cache=True)[0], expect, tol=1e-5)
        close(cache[0]['recurrent_state'][:, 0], host_cache[0]['recurrent_state'], tol=1e-5)
        if host.use_short_conv:
            conv = cache[0]['conv_state']
            for ours, theirs in zip((conv['read']['q'], conv['write']['k'][:, 0], conv['write']['v'][:, 0]),
                                    host_cache[0]['conv_state']):
                close(ours, theirs, tol=1e-6)
        mom.backend = 'triton'
        close(mom(x)[0], expect, tol=1e-5)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_memory_wrapper_equals_naive_host_math(variant):
    """The plain layer's math from the naive pieces (no interpreter); with the test above it ties those pieces,
    which the routing tests below rely on, to the real layer."""
    host = make_dn(**VARIANTS[variant])
    ref = copy.deepcopy(host)
    x = torch.randn(2, 13, HIDDEN)
    mom = wrap(host, num_memories=1, topk=1, shared_memory=False)
    expect = []
    for xb in x:
        q, gate = dn_read(ref, xb)
        expect.append(dn_finish(ref, dn_memory(ref, q, *dn_write(ref, xb, host_weights(ref)))[0], gate))
    close(mom(x)[0], torch.stack(expect))


def test_reference_recurrence_equals_fla_naive_on_packed_segments():
    """delta_rule_reference over packed segments with initial states = fla's naive rule segment by segment."""
    H, K, V = 2, 8, 4
    lengths = [5, 1, 9]
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, k = torch.randn(sum(lengths), H, K), torch.randn(sum(lengths), H, K)
    v, beta = torch.randn(sum(lengths), H, V), torch.rand(sum(lengths), H)
    h0 = torch.randn(len(lengths), H, K, V)
    position = torch.cat([torch.arange(n) for n in lengths])
    o, state = delta_rule_reference(q, k, v, beta, cu, position, qk_l2norm=False, initial_state=h0,
                                    output_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        want = delta_rule_recurrence(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v, beta)),
                                     initial_state=h0[i:i + 1])
        close(o[s:e], want[0][0].transpose(0, 1), tol=1e-6)
        close(state[i], want[1][0], tol=1e-6)


# ---- 2. routing against the naive per-memory loop ---------------------------------------------------------

@pytest.mark.parametrize('shared', [False, True])
def test_matches_naive_per_memory_loop(shared):
    mom = mom_dn(shared=shared)
    x = torch.randn(3, 23, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('variant', list(VARIANTS)[1:])
def test_host_variants_match_naive_per_memory_loop(variant):
    mom = mom_dn(variant, num_memories=3, topk=2)
    x = torch.randn(2, 19, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@needs_kernels
@pytest.mark.interpreter
def test_triton_backend_with_routing_matches_naive_loop():
    mom = mom_dn(backend='triton').eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        close(mom(x)[0], naive_mom(mom, x), tol=1e-5)


# ---- 3. the cached state (the checks every host passes alike: tests/test_every_host.py) --------------------

def test_cached_state_continues_like_the_naive_recurrence():
    """The cached recurrent state of the shared memory after a prefill is fla's naive final state."""
    mom = mom_dn(num_memories=2, topk=1).eval()
    x = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        cache = Cache()
        mom(x, past_key_values=cache, use_cache=True)
        q, _ = dn_read(mom.host, x[0])
        _, want = dn_memory(mom.host, q, *dn_write(mom.host, x[0], memory_weights(mom, 2)))
    close(cache[0]['recurrent_state'][0, 2], want, tol=1e-5)


# ---- 4. gradients and the chunk path ----------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['neg_eigval_elu_conv_bias', 'no_beta_sum_relu_gate'])
def test_every_parameter_gets_a_gradient_matching_the_naive_loop(variant):
    mom = mom_dn(variant)
    if mom.host.q_conv1d.bias is not None:
        torch.nn.init.normal_(mom.host.q_conv1d.bias.data, std=0.3)
    x = torch.randn(2, 16, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, g in mom.memories.split(mom.memories.weight.grad).items():  # each fused projection on its own
        assert g.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    ref = copy.deepcopy(mom)
    ref.zero_grad()
    naive_mom(ref, x.detach()).square().mean().backward()
    for (name, p), q in zip(mom.named_parameters(), ref.parameters()):
        close(p.grad, q.grad, tol=1e-4)


@needs_kernels
@pytest.mark.interpreter
def test_chunk_path_wiring_in_fp32_training(monkeypatch):
    """With gradients the triton backend takes the chunk path (fla's chunk kernels do not run in the
    interpreter, so their two entry points are replaced by fla's naive rule, segment by segment). Checks what
    the adapter owns: fp32 passes (no 'use bfloat16' assertion), the chunk indices it uploads are fla's, the
    in-kernel L2 norm and fla's backward wiring; output and gradients equal the torch backend's."""
    import fla.ops.delta_rule.chunk as fla_chunk
    from fla.ops.utils.index import prepare_chunk_indices

    calls = []

    def segments(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens):
        """fla's naive rule per segment of the packed [1, S, ...] inputs (its own scale is K^-0.5)."""
        q = q * (scale * q.shape[-1] ** 0.5)
        outs, states = [], []
        for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            o, h = delta_rule_recurrence(*(t[0, s:e].transpose(0, 1)[None] for t in (q, k, v, beta)),
                                         initial_state=None if initial_state is None else initial_state[i:i + 1])
            outs.append(o[0].transpose(0, 1))
            states.append(h[0])
        return torch.cat(outs)[None], (torch.stack(states) if output_final_state else None)

    def naive_fwd(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_size):
        assert q.dtype == torch.float32 and chunk_size == 64
        assert torch.equal(chunk_indices, prepare_chunk_indices(cu_seqlens, chunk_size))
        calls.append('fwd')
        o, ht = segments(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)
        return o, None, ht

    def naive_bwd(q, k, v, beta, A, scale, initial_state, do, dht, cu_seqlens, chunk_indices, chunk_size):
        calls.append('bwd')
        leaves = [t.detach().requires_grad_() for t in (q, k, v, beta)]
        h0 = None if initial_state is None else initial_state.detach().requires_grad_()
        with torch.enable_grad():
            o, ht = segments(*leaves, scale, h0, dht is not None, cu_seqlens)
            loss = (o * do).sum() + ((ht * dht).sum() if dht is not None else 0)
            grads = torch.autograd.grad(loss, leaves + ([h0] if h0 is not None else []))
        return (*grads[:4], grads[4] if h0 is not None else None)

    monkeypatch.setattr(fla_chunk, 'chunk_delta_rule_fwd', naive_fwd)
    monkeypatch.setattr(fla_chunk, 'chunk_delta_rule_bwd', naive_bwd)
    mom = mom_dn(num_memories=3, topk=2)
    x = torch.randn(2, 8, HIDDEN)
    grads = {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.zero_grad()
        out = mom(x)[0]
        out.square().mean().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in mom.named_parameters()})
    assert calls == ['fwd', 'bwd']
    close(grads['triton'][0], grads['torch'][0], tol=1e-5)
    for name, g in grads['triton'][1].items():
        close(g, grads['torch'][1][name], tol=1e-4)

    # segments longer than a chunk (the indices then depend on the chunk size): the recurrence alone, on a
    # plan of its own; qk_norm='sum' keeps every interpreted kernel out of it
    adapter = DeltaNetAdapter(make_dn(qk_norm='sum'))
    h = adapter.host
    lengths = [70, 5]
    n = sum(lengths)
    dispatch = plan_dispatch(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1),
                             torch.arange(2).repeat_interleave(torch.tensor(lengths)), None, 2, 1)
    read = {'q': torch.randn(n, h.num_heads, h.head_k_dim)}
    write = {'k': torch.randn(n, h.key_dim), 'v': torch.randn(n, h.value_dim), 'b': torch.randn(n, h.num_heads)}
    h0 = torch.randn(2, *adapter.state_shape())
    want = adapter.recurrence(read, write, dispatch, 'torch', initial_state=h0, output_final_state=True)
    got = adapter.recurrence(read, write, dispatch, 'triton', initial_state=h0, output_final_state=True)
    assert calls == ['fwd', 'bwd', 'fwd']
    close(got[0], want[0], tol=1e-5)
    close(got[1], want[1], tol=1e-5)


def test_mode_rule():
    """chunk whenever gradients may flow or segments are long, fused_recurrent for short eval inputs; a host
    built with mode='fused_recurrent' keeps it (fla's layer trains with it too)."""
    adapter = mom_dn().eval()._adapter
    with torch.no_grad():
        assert not adapter._use_chunk(64) and adapter._use_chunk(65)
    assert adapter._use_chunk(3)  # grad enabled
    adapter.host.train()
    with torch.no_grad():
        assert adapter._use_chunk(3)
    recurrent = wrap(make_dn(mode='fused_recurrent'))._adapter
    assert not recurrent._use_chunk(3) and not recurrent._use_chunk(4096)


# ---- 5. options the adapter refuses -----------------------------------------------------------------------

@pytest.mark.parametrize('option,value', [('qk_activation', 'gelu'), ('qk_norm', 'l1'), ('mode', 'fused_chunk'),
                                          ('use_output_norm', False)])
def test_bad_options_name_the_option(option, value):
    host = make_dn()
    setattr(host, option, value)  # fla asserts these at construction only
    with pytest.raises(ValueError, match=option):
        wrap(host)


def test_wrapping_twice_is_refused():
    host = make_dn()
    wrap(host)
    with pytest.raises(ValueError, match='host: this layer was already wrapped by mom_wrap'):
        wrap(host)


def test_adapter_is_registered_for_deltanet_only():
    from mom_wrap.adapters import adapter_for
    assert isinstance(adapter_for(make_dn()), DeltaNetAdapter)
    assert 'fla.layers.delta_net.DeltaNet' in __import__('mom_wrap').supported_hosts()
