"""MixtureOfMemories(MultiScaleRetention): fla's RetNet layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent retention kernel, rotary kernel and norms, run by
Triton's interpreter on the CPU, see conftest), and a naive per-memory loop written here from independent pieces
(F.linear, the host's activation modules, fla's rotary tables and ``rotary_embedding_ref``, fla's ``naive_retention``;
nothing of mom_wrap's dispatch, grouped linear, rotary or reference recurrence). Whole models: fla's
``RetNetForCausalLM`` through the shared helpers of tests/test_models.py and tests/test_convert.py. The checks every
host passes alike (cached generation, padding, packing, causality; on RetNet's options in tests/hosts.py's
VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.layers import MultiScaleRetention
from fla.models.utils import Cache
from fla.modules.rotary.ops import rotary_embedding_ref
from fla.ops.retention.naive import naive_retention

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.adapters.retnet import _decode, _encode, retention_decay, retention_reference
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed, routing_rounding
from tests.test_every_host import run_chunks, states
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_rn(**kw):
    cfg = dict(hidden_size=HIDDEN, num_heads=2, layer_idx=0)
    cfg.update(kw)
    host = MultiScaleRetention(**cfg)
    norm = host.g_norm_swish_gate if host.fuse_norm_and_gate else host.g_norm
    if norm.weight is not None:  # fresh norm weights are ones; make them matter
        nn.init.normal_(norm.weight.data, mean=1.0, std=0.3)
    return host


# each host option at least once (the layer's own defaults: expand_v=2, fused swish gate)
VARIANTS = {
    'default': {},
    'kv_heads_relu': dict(num_heads=4, num_kv_heads=2, feature_map='relu', expand_k=1.0, expand_v=1.0),
    'unfused_sigmoid': dict(fuse_norm=False, gate_fn='sigmoid', feature_map='swish', expand_k=0.5),
    'no_output_gate': dict(use_output_gate=False, elementwise_affine=False, norm_eps=1e-3, mode='fused_recurrent'),
    'short_conv': dict(use_short_conv=True, conv_bias=True, expand_v=1.0),
}
LOOP_VARIANTS = [v for v in VARIANTS if v != 'short_conv']  # the naive loop below has no per-memory convs


def mom_rn(variant='default', num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_rn(**VARIANTS[variant]), num_memories, topk, shared, init, backend)


def one_memory(host, backend):
    return MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                             backend=backend).eval()


# ---- the naive per-memory loop -------------------------------------------------------------------------

def rotary_tables(host, position):
    """fla's own rotary tables (the host's RotaryEmbedding cache) at the positions [T] -> cos, sin [T, K/2]."""
    host.rotary._update_cos_sin_cache(int(position.max()) + 1, device=position.device, dtype=torch.float32)
    return host.rotary._cos_cached[position], host.rotary._sin_cached[position]


def rotate(host, x, position):
    """x [T, heads, K] rotated at its tokens' sequence positions [T] by fla's PyTorch rotary reference."""
    cos, sin = rotary_tables(host, position)
    return rotary_embedding_ref(x, cos, sin, interleaved=host.rotary.interleaved)


def rn_memory(host, q, xs, position, wk, wv):
    """One memory's outputs [T, H, V] over its token subsequence xs [T, hidden] (q [T, H, K] read side, rotated;
    position [T]: the tokens' positions in their sequence): k, v projections, feature map and rotary on k, the head
    repeat, fla's naive retention (its decay steps over the memory's own tokens)."""
    T, G = xs.shape[0], host.num_kv_groups
    k = F.linear(xs, wk).view(T, -1, host.head_k_dim)
    if host.feature_map_fn is not None:
        k = host.feature_map_fn(k)
    k = rotate(host, k, position).repeat_interleave(G, 1)
    v = F.linear(xs, wv).view(T, -1, host.head_v_dim).repeat_interleave(G, 1)
    return naive_retention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)


def rn_finish(host, o, x):
    """o [T, H, V] -> [T, hidden]: per-head RMS norm, the output gate (swish fused, or gate_fn), o_proj."""
    norm = host.g_norm_swish_gate if host.fuse_norm_and_gate else host.g_norm
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps)
    y = (y if norm.weight is None else y * norm.weight).flatten(1)
    if host.use_output_gate:
        g = F.linear(x, host.g_proj.weight)
        y = y * (F.silu(g) if host.fuse_norm_and_gate else host.gate_fn(g))
    return F.linear(y, host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M, bank = mom.host, mom.num_memories, mom.memories
    out = []
    for xb in x:
        T = xb.shape[0]
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        position = torch.arange(T)
        q = F.linear(xb, host.q_proj.weight).view(T, host.num_heads, -1)
        q = rotate(host, q if host.feature_map_fn is None else host.feature_map_fn(q), position)
        o = torch.zeros(T, host.num_heads, host.head_v_dim, dtype=xb.dtype)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel].to(xb.dtype)
                o = o.index_add(0, sel, w[:, None, None] * rn_memory(host, q[sel], xb[sel], sel, bank.proj['k'][e],
                                                                     bank.proj['v'][e]))
        if mom.shared_memory:
            o = o + rn_memory(host, q, xb, position, bank.proj['k'][M], bank.proj['v'][M])
        out.append(rn_finish(host, o, xb))
    return torch.stack(out)


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', VARIANTS)
def test_one_memory_wrapper_equals_real_host_layer(variant):
    """M=1 copies, both backends, left padding in one row (rotary positions from the first valid token, as the
    host unpads first): the real layer (its fused_recurrent kernel, rotary kernel, norm and gate)."""
    host = make_rn(**VARIANTS[variant]).eval()
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        expect = copy.deepcopy(host)(x, attention_mask=mask)[0]
        for backend in ('torch', 'triton'):
            close(one_memory(host, backend)(x, attention_mask=mask)[0], expect, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', ['default', 'kv_heads_relu', 'short_conv'])
def test_one_memory_cache_equals_real_host_cache(variant):
    """Prefill, decode step, a chunk through fla's Cache (rotary positions continuing after the cached tokens): the
    host's outputs and its recurrent state [N, H, K, V]; our position pool holds each row's token count."""
    host = make_rn(**VARIANTS[variant]).eval()
    x = torch.randn(2, 12, HIDDEN)
    with torch.no_grad():
        outs = {}
        for name, layer in [('host', host), ('torch', one_memory(host, 'torch')), ('triton', one_memory(host, 'triton'))]:
            cache = Cache()
            o = [layer(x[:, a:b], past_key_values=cache, use_cache=True)[0] for a, b in ((0, 7), (7, 8), (8, 12))]
            outs[name] = torch.cat(o, 1), cache
    want = outs['host'][1][0]['recurrent_state']
    for backend in ('torch', 'triton'):
        mom_cache = outs[backend][1]
        close(outs[backend][0], outs['host'][0], tol=1e-5)
        assert mom_cache[0]['recurrent_state'].shape == (2, 1, *want.shape[1:])  # [N, E, H, K, V]
        close(mom_cache[0]['recurrent_state'][:, 0], want, tol=1e-5)
        assert _decode(mom_cache[0]['conv_state']['read']['position']).tolist() == [12, 12]


@needs_kernels
@pytest.mark.interpreter
def test_packed_sequences_restart_rotary_positions_as_the_host_does():
    """cu_seqlens: every packed sequence's rotary positions start at 0 (fla's rotary kernel restarts at each
    offset): M=1 equals the real layer on the packed input, and each sequence run alone."""
    host = make_rn().eval()
    lengths = [5, 9, 1, 7]
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(1, int(cu[-1]), HIDDEN)
    with torch.no_grad():
        expect = copy.deepcopy(host)(x, cu_seqlens=cu)[0]
        for backend in ('torch', 'triton'):
            got = one_memory(host, backend)(x, cu_seqlens=cu)[0]
            close(got, expect, tol=1e-5)
        for s, e in zip(cu[:-1], cu[1:]):
            close(expect[:, s:e], host(x[:, s:e])[0], tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
def test_packed_sequences_continue_through_the_cache_at_their_own_positions():
    """Packed sequences continued through the cache: each sequence's rotary positions go on after its own tokens
    (the position pool counts per sequence), so each equals its own run through a cache of its own on the real
    layer. (fla's layer itself offsets every packed sequence by the cache's one count, the total: README's known
    host limits.)"""
    host = make_rn().eval()
    first, second = [6, 2, 9], [3, 4, 1]
    xs = [torch.randn(1, a + b, HIDDEN) for a, b in zip(first, second)]
    with torch.no_grad():
        mom, cache, outs = one_memory(host, 'triton'), Cache(), []
        for part, lengths in ((0, first), (1, second)):
            chunk = torch.cat([x[:, :first[i]] if part == 0 else x[:, first[i]:] for i, x in enumerate(xs)], 1)
            cu = torch.tensor([0] + lengths).cumsum(0)
            outs.append((mom(chunk, cu_seqlens=cu, past_key_values=cache, use_cache=True)[0][0], cu))
        assert _decode(cache[0]['conv_state']['read']['position']).tolist() == [9, 6, 10]
        for i, x in enumerate(xs):
            own = Cache()
            want = torch.cat([host(x[:, :first[i]], past_key_values=own, use_cache=True)[0],
                              host(x[:, first[i]:], past_key_values=own, use_cache=True)[0]], 1)[0]
            (o1, cu1), (o2, cu2) = outs
            close(torch.cat([o1[cu1[i]:cu1[i + 1]], o2[cu2[i]:cu2[i + 1]]]), want, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', ['default', 'unfused_sigmoid'])
def test_triton_backend_equals_torch_backend_with_routing_and_cache(variant):
    """fla's varlen fused_recurrent simple_gla kernel with the fixed decay over routed segments from cached states
    (each segment's decay from its own start), with left padding and a padding token inside a decode step (its
    states, the position count included, must stay), against the torch backend."""
    mom = mom_rn(variant).eval()
    x = torch.randn(2, 10, HIDDEN)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[1, 6] = 0
    outs = {}
    with torch.no_grad():
        for backend in ('torch', 'triton'):
            mom.backend = backend
            outs[backend] = run_chunks(mom, x, [6, 1, 1, 2], mask)
            close(mom(x, attention_mask=mask)[0], outs[backend][0], tol=1e-5 + routing_rounding(mom, x))
            assert _decode(states(mom, outs[backend][1])['read_conv']['position']).tolist() == [10, 6]
    close(outs['triton'][0], outs['torch'][0], tol=1e-5)
    close(outs['triton'][1][0]['recurrent_state'], outs['torch'][1][0]['recurrent_state'], tol=1e-5)


# ---- 2. routed memories against the naive loop ---------------------------------------------------------

@pytest.mark.parametrize('variant,shared', [('default', False), ('default', True), *[(v, True) for v in
                                                                                      LOOP_VARIANTS[1:]]])
def test_matches_naive_per_memory_loop(variant, shared):
    """Each memory's k rotated at its tokens' positions in the sequence, its decay stepping over its own tokens."""
    mom = mom_rn(variant, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('variant', ['default', 'kv_heads_relu'])
def test_every_parameter_gets_a_gradient_matching_the_naive_loop(variant):
    mom = mom_rn(variant)  # (fp32: fla's naive_retention computes in fp32 whatever it gets)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    ref = mom_rn(variant)
    ref.load_state_dict(mom.state_dict())
    x2 = x.detach().clone().requires_grad_()
    naive_mom(ref, x2).square().mean().backward()
    close(x.grad, x2.grad, tol=1e-4)
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)


def test_write_side_moves_out_of_the_host():
    mom = mom_rn('short_conv')
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj', 'host.k_conv1d', 'host.v_conv1d')) for n in names)
    assert {'host.q_proj.weight', 'host.g_proj.weight', 'host.o_proj.weight', 'host.q_conv1d.weight'} <= names
    assert mom.memories.proj['k'].shape == (5, 64, HIDDEN) and mom.memories.proj['v'].shape == (5, 64, HIDDEN)
    kv = mom_rn('kv_heads_relu')  # k/v per kv head: 2 of 4 heads
    assert kv.memories.proj['k'].shape == (5, 32, HIDDEN) and kv._adapter.state_shape() == (4, 16, 16)
    assert mom_rn()._adapter.state_shape() == (2, 32, 64)


# ---- the reference recurrence, the position pool, the kernels and the kernel choice -----------------------

def test_decay_is_retnets():
    """gamma_h = 1 - 2^(-5-h): 1 - 1/32, 1 - 1/64, ... (fla's kernels derive the same from the head count)."""
    close(retention_decay(4).exp().double(), 1 - 2.0 ** -torch.arange(5, 9, dtype=torch.float64), tol=1e-7)


def test_reference_recurrence_equals_fla_naive_per_segment_and_carries_states():
    """retention_reference over packed segments against fla's naive_retention per segment; each segment split in
    two, the second part from the first part's final state, gives the same outputs (initial and final states)."""
    lengths, H, K, V = [5, 1, 11], 3, 8, 4
    cu = torch.tensor([0] + lengths).cumsum(0)
    S = int(cu[-1])
    q, k, v = torch.randn(S, H, K, dtype=torch.float64), torch.randn(S, H, K, dtype=torch.float64), \
        torch.randn(S, H, V, dtype=torch.float64)
    position = torch.cat([torch.arange(n) for n in lengths])
    o, _ = retention_reference(q, k, v, cu, position)
    for s, e in zip(cu[:-1], cu[1:]):
        want = naive_retention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        close(o[s:e], want, tol=1e-5)  # (fla's naive retention: fp32)
    cut = [n // 2 for n in lengths]
    parts = []
    for lo in (True, False):
        idx = torch.cat([torch.arange(s, s + c) if lo else torch.arange(s + c, e)
                         for s, e, c in zip(cu[:-1].tolist(), cu[1:].tolist(), cut)])
        sizes = cut if lo else [n - c for n, c in zip(lengths, cut)]
        parts.append((idx, torch.tensor([0] + sizes).cumsum(0), torch.cat([torch.arange(n) for n in sizes])))
    (i1, cu1, p1), (i2, cu2, p2) = parts
    o1, h1 = retention_reference(q[i1], k[i1], v[i1], cu1, p1, output_final_state=True)
    o2, h2 = retention_reference(q[i2], k[i2], v[i2], cu2, p2, initial_state=h1, output_final_state=True)
    _, h = retention_reference(q, k, v, cu, position, output_final_state=True)
    close(o1, o[i1], tol=1e-12)
    close(o2, o[i2], tol=1e-12)
    close(h2, h, tol=1e-12)


@needs_kernels
@pytest.mark.interpreter
def test_triton_recurrence_equals_reference_per_segment_with_states():
    """The adapter's triton path (fla's varlen fused_recurrent simple_gla with g_gamma) on packed segments with
    initial states against retention_reference: outputs and final states."""
    lengths, H, K, V = [5, 1, 9], 2, 32, 32
    cu = torch.tensor([0] + lengths).cumsum(0)
    S = int(cu[-1])
    q, k, v = torch.randn(S, H, K), torch.randn(S, H, K), torch.randn(S, H, V)
    h0 = torch.randn(len(lengths), H, K, V)
    position = torch.cat([torch.arange(n) for n in lengths])
    o, ht = retention_reference(q, k, v, cu, position, h0, True)
    adapter = adapter_for(make_rn(expand_v=1.0))
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    dispatch = plan_dispatch(torch.zeros(S, 1, dtype=torch.long), torch.ones(S, 1), sequence, None, 3, 1)
    with torch.no_grad():
        o_k, h_k = adapter._kernel(q, k, v, dispatch, h0, True)
    close(o_k, o, tol=1e-5)
    close(h_k, ht, tol=1e-5)


def test_position_pool_is_exact_in_bf16():
    """The count's base-256 digits are exact in the pool's dtype, bf16 included (a bf16 count would be off past 256)."""
    counts = torch.tensor([0, 1, 255, 256, 257, 4097, 70001, 2 ** 31 + 12345])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(_decode(_encode(counts, dtype)), counts)
    assert torch.tensor(257.0, dtype=torch.bfloat16).item() != 257  # what the digits avoid


@pytest.mark.parametrize('mode,max_len,grad,state,kernel', [
    ('chunk', 64, False, False, 'fused_recurrent_simple_gla'), ('chunk', 65, False, False, 'chunk_simple_gla'),
    ('fused_chunk', 65, False, True, 'fused_chunk_simple_gla'),
    ('parallel', 65, False, False, 'parallel_simple_gla'), ('parallel', 65, False, True, 'chunk_simple_gla'),
    ('fused_recurrent', 65, False, False, 'fused_recurrent_simple_gla'),
    ('fused_recurrent', 8, True, False, 'chunk_simple_gla')])
def test_triton_backend_kernel_choice(monkeypatch, mode, max_len, grad, state, kernel):
    """The host's rule (chunk whenever gradients are on, else fused_recurrent up to 64 tokens, else its mode's
    kernel; 'parallel', which keeps no state, gives way to chunk where states go in or out), on the longest segment;
    the chunk kernels do not run on the CPU: recorded, not run. Every kernel gets cu_seqlens and RetNet's decay."""
    import fla.ops.simple_gla as ops
    calls = []

    def fake(name):
        def kernel_fn(q, k, v, **kw):
            calls.append((name, kw))
            return torch.zeros_like(v), None
        return kernel_fn

    for name in ('chunk_simple_gla', 'fused_chunk_simple_gla', 'fused_recurrent_simple_gla', 'parallel_simple_gla'):
        monkeypatch.setattr(ops, name, fake(name))
    adapter = adapter_for(make_rn(mode=mode, expand_v=1.0))
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    q, k, v = torch.randn(N, 2, 32), torch.randn(N, 2, 32), torch.randn(N, 2, 32)
    with torch.set_grad_enabled(grad):
        adapter._kernel(q, k, v, dispatch, torch.zeros(2, 2, 32, 32) if state else None, state)
    (name, kw), = calls
    assert name == kernel and kw['cu_seqlens'] is dispatch.cu_seqlens
    decay = kw['g'][0, 0] if kernel == 'parallel_simple_gla' else kw['g_gamma']
    close(decay, torch.log(1 - 2.0 ** torch.tensor([-5.0, -6.0])), tol=1e-7)
    assert (kw.get('cu_seqlens_cpu') is dispatch.cu_seqlens_cpu) == (kernel in ('chunk_simple_gla',
                                                                                'parallel_simple_gla'))


# ---- 3. options the adapter refuses ---------------------------------------------------------------------

def test_refused_rotary_embeddings():
    from fla.modules.rotary import RotaryEmbedding
    host = make_rn()
    host.rotary = RotaryEmbedding(dim=32, scale_base=512)  # XPos
    with pytest.raises(ValueError, match='rotary'):
        wrap(host)
    host.rotary = RotaryEmbedding(dim=64)  # wider than a head
    with pytest.raises(ValueError, match='rotary'):
        wrap(host)
    host.rotary = nn.Identity()
    with pytest.raises(ValueError, match='rotary'):
        wrap(host)


@needs_kernels
@pytest.mark.interpreter
def test_interleaved_and_partial_rotary_equal_the_host():
    """Rotary options the host's own class takes (its constructor does not set them): adjacent pairs, and a rotary
    dim below the head's (the rest of each head unrotated)."""
    from fla.modules.rotary import RotaryEmbedding
    x = torch.randn(2, 10, HIDDEN)
    for rotary in (RotaryEmbedding(dim=32, interleaved=True), RotaryEmbedding(dim=16)):
        host = make_rn().eval()
        host.rotary = rotary
        with torch.no_grad():
            expect = copy.deepcopy(host)(x)[0]
            for backend in ('torch', 'triton'):
                close(one_memory(host, backend)(x)[0], expect, tol=1e-5)
