"""MixtureOfMemories(GatedSlotAttention): fla's GSA layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent kernels and fused norm + o_proj, run by Triton's
interpreter on the CPU, see conftest), its own cache, and a naive per-memory loop written here from independent
pieces (F.linear, F.conv1d and fla's own ``naive_recurrent_gsa``; nothing of mom_wrap's dispatch, grouped linear,
segment conv or reference recurrence). fla's chunk_gsa does not run under the interpreter (its chunk_fwd_h
kernel fails there): its call is checked, not run (``test_triton_backend_kernel_choice``). The checks every host
passes alike (cached generation, padding, packing, causality; on GSA's options in tests/hosts.py's VARIANTS):
tests/test_every_host.py; the public parity suite on the example host: tests/test_parity.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers import GatedSlotAttention
from fla.models.utils import Cache
from fla.ops.gsa.naive import naive_recurrent_gsa

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.adapters.gsa import from_fla_state, gsa_reference, to_fla_state
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import rel_err, routed
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_gsa(**kw):
    cfg = dict(hidden_size=HIDDEN, expand_k=0.5, num_heads=2, num_slots=8, layer_idx=0)
    no_feature_map = 'feature_map' in kw and kw['feature_map'] is None
    cfg.update({k: v for k, v in kw.items() if not (k == 'feature_map' and v is None)})
    host = GatedSlotAttention(**cfg)
    if no_feature_map:  # the layer's forward skips a None feature map; its constructor offers none
        host.feature_map = None
    if host.g_norm.weight is not None:  # fresh norm weights are ones; make them matter
        torch.nn.init.normal_(host.g_norm.weight.data, mean=1.0, std=0.3)
    return host


# each host option at least once: GQA, the feature maps (t2r has weights of its own, shared by q and every memory's
# k), the default scale 1 and None (K^-0.5), the gate normaliser, slots not a power of two, expand_v with an unscaled
# norm, and the options the layer ignores (norm_eps: its rms_norm_linear takes 1e-5; use_output_gate, use_norm).
# The short convs are a flag of their own (``conv``): under the interpreter the real layer's conv autotunes per width
VARIANTS = {
    'default': {},
    'kv_heads': dict(num_heads=4, num_kv_heads=2),
    'relu_scale': dict(feature_map='relu', scale=None, gate_logit_normalizer=4, num_slots=5),
    't2r': dict(feature_map='t2r'),
    'no_feature_map': dict(feature_map=None, scale=0.3),
    'norm_options': dict(expand_v=2.0, elementwise_affine=False, norm_eps=1e-1, use_output_gate=True, use_norm=False),
}
CONV = dict(use_short_conv=True, conv_bias=True)


def host_options(variant, conv):
    return {**VARIANTS[variant], **(CONV if conv else {})}


def mom_gsa(variant='default', conv=True, num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_gsa(**host_options(variant, conv)), num_memories, topk, shared, init, backend)


# ---- the naive per-memory loop -------------------------------------------------------------------------

def _conv(x, weight, bias):
    """Causal depthwise conv + SiLU over one (sub)sequence x [T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    return F.silu(F.conv1d(x.t()[None], weight, bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t())


def feature_map(host, x):
    """The host's feature map over x [..., K], written with plain torch."""
    fm = type(host.feature_map).__name__
    if host.feature_map is None:
        return x
    if fm == 'SwishFeatureMap':
        return F.silu(x)
    if fm == 'ReLUFeatureMap':
        return F.relu(x)
    assert fm == 'T2RFeatureMap'
    return F.relu(F.linear(x, host.feature_map.layer.weight, host.feature_map.layer.bias))


def memory_weights(mom, e):
    """Memory e's write side as plain tensors."""
    bank = mom.memories
    w = dict(k=bank.proj['k'][e], v=bank.proj['v'][e], f=bank.proj['f'][e])
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        w[f'{n}_conv_bias'] = bank.conv_bias[n][e] if n in bank.conv_bias else None
    return w


def gsa_write(host, x, w):
    """k, v, f logits [T, *] of one memory over its token subsequence x [T, hidden]."""
    k, v = F.linear(x, w['k']), F.linear(x, w['v'])
    if host.use_short_conv:
        k, v = _conv(k, w['k_conv'], w['k_conv_bias']), _conv(v, w['v_conv'], w['v_conv_bias'])
    return k, v, F.linear(x, w['f'])


def gsa_read(host, x):
    """Query [T, H, K] (conv, feature map) of x [T, hidden]."""
    q = F.linear(x, host.q_proj.weight)
    if host.use_short_conv:
        q = _conv(q, host.q_conv1d.weight, host.q_conv1d.bias)
    return feature_map(host, q.view(x.shape[0], host.num_heads, host.head_k_dim))


def gsa_memory(host, q, k, v, f, initial_state=None):
    """One memory's outputs [T, H, V] (and final fla state pair) via fla's naive recurrence, with the host's gate,
    feature map, SiLU on v and head repeat."""
    T, G = q.shape[0], host.num_kv_groups
    k = feature_map(host, k.view(T, -1, host.head_k_dim))
    v = F.silu(v.view(T, -1, host.head_v_dim))
    g = F.logsigmoid(f.view(T, -1, host.num_slots)) / host.gate_logit_normalizer
    s = 1 - g.exp()
    k, v, s, g = (t.repeat_interleave(G, 1) for t in (k, v, s, g))
    o, state = naive_recurrent_gsa(q[None], k[None], v[None], s[None], g[None], scale=host.scale,
                                   initial_state=initial_state, output_final_state=True)
    return o[0], state


def gsa_finish(host, o):
    """o [T, H, V] -> [T, hidden]: SiLU, RMS norm over the value dim (eps 1e-5, as the layer runs it), o_proj."""
    y = F.silu(o.flatten(1))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    if host.g_norm.weight is not None:
        y = y * host.g_norm.weight
    return F.linear(y, host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M = mom.host, mom.num_memories
    out = []
    for xb in x:
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q = gsa_read(host, xb)
        o = torch.zeros(xb.shape[0], host.num_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel]
                o_e, _ = gsa_memory(host, q[sel], *gsa_write(host, xb[sel], memory_weights(mom, e)))
                o = o.index_add(0, sel, w[:, None, None] * o_e)
        if mom.shared_memory:
            o = o + gsa_memory(host, q, *gsa_write(host, xb, memory_weights(mom, M)))[0]
        out.append(gsa_finish(host, o))
    return torch.stack(out)


def test_naive_host_reference_equals_the_real_layer():
    """The naive pieces above are the host's math: against the unwrapped layer (t2r and convs included)."""
    if os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available():
        pytest.skip("fla's kernels need TRITON_INTERPRET=1 or CUDA")
    host = make_gsa(**host_options('t2r', True)).eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        want = host(x)[0]
        got = torch.stack([gsa_finish(host, gsa_memory(host, gsa_read(host, xb), *gsa_write(host, xb, dict(
            k=host.k_proj.weight, v=host.v_proj.weight, f=host.f_proj.weight, k_conv=host.k_conv1d.weight,
            k_conv_bias=host.k_conv1d.bias, v_conv=host.v_conv1d.weight, v_conv_bias=host.v_conv1d.bias)))[0])
            for xb in x])
    close(got, want, tol=1e-5)


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant,conv', [(v, False) for v in VARIANTS] + [('kv_heads', True)])
def test_one_memory_wrapper_equals_real_host_layer(variant, conv):
    """M=1 copies, both backends, left padding in one row: the real layer (its fused_recurrent kernels, its fused
    norm + o_proj, its short convs)."""
    host = make_gsa(**host_options(variant, conv)).eval()
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        expect = copy.deepcopy(host)(x, attention_mask=mask)[0]
        for backend in ('torch', 'triton'):
            mom = MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                                    backend=backend).eval()
            close(mom(x, attention_mask=mask)[0], expect, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('masked', [False, True])
def test_one_memory_cache_equals_real_host_cache(masked):
    """Prefill + decode steps + a chunk through fla's Cache, the real layer's own cached decoding as oracle (without
    a mask its decode steps take fla's one-token kernel, fused_recurrent_gsa_inference): same outputs, and the same
    recurrent states (fla's pair (hk, hv), ours [N, E, H, M, K + V])."""
    # no short conv: under the interpreter fla's conv autotunes its cached-step kernel for long
    host = make_gsa(**VARIANTS['kv_heads']).eval()
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    sizes = [7, 1, 1, 3]
    outs = {}
    with torch.no_grad():
        for name in ('host', 'torch', 'triton'):
            layer = host if name == 'host' else \
                wrap(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, backend=name).eval()
            cache, o, start = Cache(), [], 0
            for n in sizes:
                m = mask[:, :start + n] if masked else None
                o.append(layer(x[:, start:start + n], attention_mask=m, past_key_values=cache, use_cache=True)[0])
                start += n
            outs[name] = torch.cat(o, 1), cache[0]['recurrent_state']
        full = host(x)[0]
    hk, hv = outs['host'][1]
    close(outs['host'][0], full, tol=1e-5)
    for name in ('torch', 'triton'):
        o, state = outs[name]
        close(o, outs['host'][0], tol=1e-5)
        assert state.shape == (2, 1, 4, 8, 8 + 16)  # [N, E, H, M, K + V]
        ours_hk, ours_hv = to_fla_state(state[:, 0], 8)
        close(ours_hk, hk, tol=1e-5)
        close(ours_hv, hv, tol=1e-5)
        close(from_fla_state(hk, hv), state[:, 0], tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
def test_triton_backend_equals_torch_backend_with_routing_and_gradients():
    """fla's fused_recurrent_gsa (which the host also trains with up to 64 tokens) over routed segments with padding,
    forward and backward, against the torch backend; and in 2 parts over time, which carry the states between
    calls (fla's initial-state and final-state gradients, through our state layout)."""
    from mom_wrap import recurrence
    mom = mom_gsa(conv=False).train()
    x = torch.randn(2, 9, HIDDEN)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    outs, grads = {}, {}
    align = recurrence.ALIGN
    try:
        recurrence.ALIGN = 2  # the segments are short: blocks of 2 rows, so that both parts have rows
        for backend, parts in (('torch', 1), ('triton', 1), ('triton', 2)):
            mom.backend, mom.recurrence_parts = backend, parts
            mom.zero_grad()
            xi = x.clone().requires_grad_()
            y = mom(xi, attention_mask=mask)[0]
            y.square().sum().backward()
            outs[backend, parts] = y.detach()
            grads[backend, parts] = {'x': xi.grad, **{n: p.grad.clone() for n, p in mom.named_parameters()}}
    finally:
        recurrence.ALIGN = align
    for run in (('triton', 1), ('triton', 2)):
        close(outs[run], outs['torch', 1], tol=1e-5)
        for name, g in grads['torch', 1].items():
            close(grads[run][name], g, tol=1e-4)


# ---- 2. routed memories against the naive loop, init='preserve', gradients ---------------------------

@pytest.mark.parametrize('variant,conv,shared', [('default', False, False), ('default', True, True),
                                                  ('kv_heads', True, True), ('kv_heads', False, False),
                                                  ('relu_scale', False, True), ('t2r', True, True),
                                                  ('no_feature_map', False, True), ('norm_options', True, False)])
def test_matches_naive_per_memory_loop(variant, conv, shared):
    mom = mom_gsa(variant, conv=conv, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    with torch.no_grad():
        close(mom(x)[0], naive_mom(mom, x))


def test_preserve_silences_the_routed_memories_through_v():
    """init="preserve" zeroes v's last stage (here its conv): a routed memory's value memories stay exactly zero, so
    it reads exactly zero whatever its slot scores (its key memories do fill: only the values are silent)."""
    host = make_gsa(**CONV)
    want_host = copy.deepcopy(host).eval()
    mom = wrap(host, num_memories=3, topk=2, shared_memory=True, init='preserve').eval()
    assert mom._adapter.silent_projection == 'v'
    x = torch.randn(2, 10, HIDDEN)
    with torch.no_grad():
        cache = Cache()
        y = mom(x, past_key_values=cache, use_cache=True)[0]
        if os.environ.get('TRITON_INTERPRET') == '1':
            close(y, want_host(x)[0], tol=1e-6)
    state = cache[0]['recurrent_state']  # [N, E, H, M, K + V]
    K = host.head_k_dim
    assert torch.all(state[:, :3, ..., K:] == 0)  # routed memories: value memories exactly zero
    assert state[:, :3, ..., :K].abs().sum() > 0  # their key memories were written
    assert state[:, 3, ..., K:].abs().sum() > 0  # the shared memory carries the host


@pytest.mark.parametrize('variant', ['kv_heads', 't2r'])
def test_every_parameter_gets_a_gradient_matching_the_naive_loop(variant):
    mom = mom_gsa(variant)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    expected = {'memories.weight', 'memories.conv.k', 'memories.conv.v', 'host.q_proj.weight', 'host.o_proj.weight',
                'host.g_norm.weight', 'router.weight'}
    if variant == 't2r':
        expected.add('host.feature_map.layer.weight')  # one map, read by q and by every memory's k
    assert expected <= {n for n, _ in mom.named_parameters()}
    ref = mom_gsa(variant)
    ref.load_state_dict(mom.state_dict())
    naive_mom(ref, x.detach()).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)


def test_write_side_moves_out_of_the_host():
    mom = mom_gsa()
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj', 'host.f_proj', 'host.k_conv1d', 'host.v_conv1d'))
                   for n in names)
    assert 'host.q_conv1d.weight' in names
    bank = mom.memories
    assert bank.names == ['k', 'v', 'f']
    assert bank.proj['k'].shape == (5, 32, HIDDEN) and bank.proj['f'].shape == (5, 2 * 8, HIDDEN)
    assert bank.conv['v'].shape == (5, 64, 4)


# ---- the reference recurrence and the kernel choice ------------------------------------------------------

def test_reference_recurrence_equals_fla_naive_per_segment():
    """gsa_reference over packed segments with initial states against fla's naive_recurrent_gsa per segment (fla's
    pair of states there, [H, M, K + V] here), and fla's varlen fused_recurrent_gsa on the same packed input."""
    lengths, H, K, V, M = [5, 1, 9], 2, 8, 16, 6
    cu = torch.tensor([0] + lengths).cumsum(0)
    S = int(cu[-1])
    q, k, v = torch.randn(S, H, K), torch.randn(S, H, K), torch.randn(S, H, V)
    g = F.logsigmoid(torch.randn(S, H, M)) / 4
    s = 1 - g.exp()
    h0 = torch.randn(len(lengths), H, M, K + V)
    position = torch.cat([torch.arange(n) for n in lengths])
    o, ht = gsa_reference(q, k, v, s, g, cu, position, scale=0.5, initial_state=h0, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        o_i, (hk_i, hv_i) = naive_recurrent_gsa(q[None, a:b], k[None, a:b], v[None, a:b], s[None, a:b], g[None, a:b],
                                                scale=0.5, initial_state=to_fla_state(h0[i:i + 1], K),
                                                output_final_state=True)
        close(o[a:b], o_i[0], tol=1e-5)
        close(ht[i], from_fla_state(hk_i, hv_i)[0], tol=1e-5)
    if os.environ.get('TRITON_INTERPRET') == '1':
        from fla.ops.gsa import fused_recurrent_gsa
        o_k, (hk, hv) = fused_recurrent_gsa(q[None], k[None], v[None], s[None], g[None], scale=0.5,
                                            initial_state=to_fla_state(h0, K), output_final_state=True, cu_seqlens=cu)
        close(o_k[0], o, tol=1e-5)
        close(from_fla_state(hk, hv), ht, tol=1e-5)


@pytest.mark.parametrize('mode,max_len,kernel', [('chunk', 64, 'fused_recurrent_gsa'), ('chunk', 65, 'chunk_gsa'),
                                                 ('fused_recurrent', 65, 'fused_recurrent_gsa')])
def test_triton_backend_kernel_choice(monkeypatch, mode, max_len, kernel):
    """The host's rule on the longest segment (chunk_gsa does not run under the interpreter: recorded, not run): both
    varlen with cu_seqlens, chunk_gsa with the host-side copy too; initial states as fla's pair, final ones back in
    our layout."""
    import fla.ops.gsa as ops
    calls = []
    G, H, K, V, M = 2, 2, 16, 32, 8

    def fake(name):
        def kernel_fn(q, k, v, s, g, **kw):
            calls.append((name, kw))
            return torch.zeros_like(v), [torch.ones(G, H, K, M), torch.full((G, H, M, V), 2.0)]
        return kernel_fn

    monkeypatch.setattr(ops, 'chunk_gsa', fake('chunk_gsa'))
    monkeypatch.setattr(ops, 'fused_recurrent_gsa', fake('fused_recurrent_gsa'))
    adapter = adapter_for(make_gsa(mode=mode))
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    assert dispatch.max_seqlen == max_len
    read = {'q': torch.randn(N, H, K)}
    write = {'k': torch.randn(N, 32), 'v': torch.randn(N, 64), 'f': torch.randn(N, 16)}
    h0 = torch.randn(G, H, M, K + V)
    _, ht = adapter.recurrence(read, write, dispatch, 'triton', initial_state=h0, output_final_state=True)
    (name, kw), = calls
    assert name == kernel and kw['cu_seqlens'] is dispatch.cu_seqlens and kw['scale'] == 1.0
    assert (kw.get('cu_seqlens_cpu') is dispatch.cu_seqlens_cpu) == (kernel == 'chunk_gsa')
    hk0, hv0 = kw['initial_state']
    assert torch.equal(hk0, h0[..., :K].transpose(-1, -2)) and torch.equal(hv0, h0[..., K:])
    assert ht.shape == (G, H, M, K + V) and torch.all(ht[..., :K] == 1) and torch.all(ht[..., K:] == 2)


# ---- 3. options the adapter refuses ---------------------------------------------------------------------

def test_refused_options():
    with pytest.raises(ValueError, match='mode'):
        wrap(make_gsa(mode='fused_chunk'))
    with pytest.raises(ValueError, match='expand_v'):  # the layer itself fails in its forward (g_norm's size)
        wrap(make_gsa(expand_v=2.0))


def test_refused_replaced_modules():
    host = make_gsa()
    host.feature_map = torch.nn.Tanh()  # not one of the host's feature maps
    with pytest.raises(ValueError, match='feature_map'):
        wrap(host)
    host = make_gsa()
    host.f_proj = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 16))
    with pytest.raises(ValueError, match='f_proj'):
        wrap(host)


# ---- 4. GPU: fla's chunk_gsa (beyond 64 tokens), which the interpreter cannot run ------------------------------
# (the wrapper at T = 256 on both backends: tests/test_every_host.py, with GSA's kv_heads_conv_t2r variant too)

@pytest.mark.gpu
@pytest.mark.parametrize('kernel,lengths,K,V,M', [('chunk', [130, 64, 1, 200, 65], 16, 32, 16),
                                                  ('chunk', [130, 64, 1, 200, 65], 32, 64, 64),
                                                  ('fused_recurrent', [130, 64, 1, 200, 65], 16, 32, 16),
                                                  ('chunk', [130, 1, 70], 16, 32, 24),
                                                  ('fused_recurrent', [130, 1, 70], 16, 32, 5)])
def test_gpu_kernels_varlen_with_states_equal_the_reference(kernel, lengths, K, V, M):
    """fla's varlen GSA kernels with per-segment initial and final states (the layout the adapter passes), forward
    and every gradient, against gsa_reference in fp64 (fp32 inputs, IEEE dots). Slot counts that are no power of
    two: 24 in chunk_gsa, whose backward does not compile for 8 slots or fewer (README, known host limits), and 5
    in fused_recurrent_gsa."""
    from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa
    fn = chunk_gsa if kernel == 'chunk' else fused_recurrent_gsa
    torch.manual_seed(0)
    dev, H = 'cuda', 2
    cu = torch.tensor([0] + lengths, device=dev).cumsum(0)
    S, G = int(cu[-1]), len(lengths)

    def leaf(*shape):
        return torch.randn(*shape, device=dev).requires_grad_()
    q, k, v, fr = leaf(S, H, K), leaf(S, H, K), leaf(S, H, V), leaf(S, H, M)
    h0 = leaf(G, H, M, K + V)
    wo, wh = torch.randn(S, H, V, device=dev), torch.randn(G, H, M, K + V, device=dev)
    position = torch.cat([torch.arange(n, device=dev) for n in lengths])
    res = {}
    for name in ('kernel', 'reference'):
        g = F.logsigmoid(fr) / 8
        s = 1 - g.exp()
        if name == 'kernel':
            extra = {'cu_seqlens_cpu': cu.cpu()} if kernel == 'chunk' else {}
            o, (hk, hv) = fn(q[None], k[None], v[None], s[None], g[None], scale=0.5, initial_state=to_fla_state(h0, K),
                             output_final_state=True, cu_seqlens=cu, **extra)
            o, ht = o[0], from_fla_state(hk, hv)
        else:
            o, ht = gsa_reference(*(t.double() for t in (q, k, v, s, g)), cu, position, scale=0.5,
                                  initial_state=h0.double(), output_final_state=True)
        loss = (o.double() * wo).sum() + (ht.double() * wh).sum()
        res[name] = [o, ht, *torch.autograd.grad(loss, [q, k, v, fr, h0])]
    errs = {n: rel_err(a, b) for n, a, b in zip(['o', 'ht', 'dq', 'dk', 'dv', 'df', 'dh0'], *res.values())}
    assert max(errs.values()) < 5e-3, errs
