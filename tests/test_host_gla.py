"""MixtureOfMemories(GatedLinearAttention): fla's GLA layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent kernel and fused norm, run by Triton's
interpreter on the CPU, see conftest), and a naive per-memory loop written here from independent pieces
(F.linear, F.conv1d and fla's own ``naive_recurrent_gla``; nothing of mom_wrap's dispatch, grouped linear,
segment conv or reference recurrence). The checks every host passes alike (cached generation, padding, packing,
causality; on GLA's options in tests/hosts.py's VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers import GatedLinearAttention
from fla.models.utils import Cache
from fla.modules.activations import ACT2FN
from fla.ops.gla.naive import naive_recurrent_gla

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.adapters.gla import TORCH_ACTIVATIONS, gla_reference
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_gla(**kw):
    cfg = dict(hidden_size=HIDDEN, expand_k=0.5, expand_v=1.0, num_heads=2, layer_idx=0)
    cfg.update(kw)
    host = GatedLinearAttention(**cfg)
    norm = host.g_norm_swish_gate if host.fuse_norm_and_gate else host.g_norm
    if norm.weight is not None:  # fresh norm weights are ones; make them matter
        torch.nn.init.normal_(norm.weight.data, mean=1.0, std=0.3)
    return host


# each host option at least once (clamp_min binds for about half the gate entries at normalizer 8); the short
# convs are a flag of their own (``conv``): under the interpreter the real layer's conv autotunes per width
VARIANTS = {
    'default': {},
    'kv_heads': dict(num_heads=4, num_kv_heads=2, expand_v=2.0),
    'feature_map_clamp': dict(feature_map='relu', clamp_min=-0.09, gate_logit_normalizer=8, gate_low_rank_dim=8),
    'unfused_gate_fn': dict(fuse_norm=False, gate_fn='sigmoid', feature_map='swish'),
    'no_output_gate': dict(use_output_gate=False, elementwise_affine=False, norm_eps=1e-3),
}
CONV = dict(use_short_conv=True, conv_bias=True)


def host_options(variant, conv):
    return {**VARIANTS[variant], **(CONV if conv else {})}


def mom_gla(variant='default', conv=True, num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_gla(**host_options(variant, conv)), num_memories, topk, shared, init, backend)


# ---- the naive per-memory loop -------------------------------------------------------------------------

# the test's own PyTorch versions of the fla activations the variants use, keyed by fla's functions
TEST_ACT = {ACT2FN['relu']: F.relu, ACT2FN['swish']: F.silu, ACT2FN['sigmoid']: torch.sigmoid}


def _conv(x, weight, bias):
    """Causal depthwise conv + SiLU over one (sub)sequence x [T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    return F.silu(F.conv1d(x.t()[None], weight, bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t())


def memory_weights(mom, e):
    """Memory e's write side as plain tensors."""
    bank = mom.memories
    w = dict(k=bank.proj['k'][e], v=bank.proj['v'][e], gk0=bank.proj['gk'][e], gk1=bank.second['gk'][e],
             gk1_bias=bank.second_bias['gk'][e])
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        w[f'{n}_conv_bias'] = bank.conv_bias[n][e] if n in bank.conv_bias else None
    return w


def gla_write(host, x, w):
    """k, v, raw gate [T, *] of one memory over its token subsequence x [T, hidden]."""
    k, v = F.linear(x, w['k']), F.linear(x, w['v'])
    if host.use_short_conv:
        k, v = _conv(k, w['k_conv'], w['k_conv_bias']), _conv(v, w['v_conv'], w['v_conv_bias'])
    gk = F.linear(F.linear(x, w['gk0']), w['gk1'], w['gk1_bias'])
    return k, v, gk


def gla_read(host, x):
    """Query [T, H, K] (conv, feature map) and output-gate input [T, value_dim] (or None) of x [T, hidden]."""
    q = F.linear(x, host.q_proj.weight)
    if host.use_short_conv:
        q = _conv(q, host.q_conv1d.weight, host.q_conv1d.bias)
    if host.feature_map_fn is not None:
        q = TEST_ACT[host.feature_map_fn](q)
    g = F.linear(x, host.g_proj.weight) if host.use_output_gate else None
    return q.view(x.shape[0], host.num_heads, host.head_k_dim), g


def gla_memory(host, q, k, v, gk):
    """One memory's outputs [T, H, V] via fla's naive recurrence, the host's gate, feature map and head repeat."""
    T, G = q.shape[0], host.num_kv_groups
    k, gk = k.view(T, -1, host.head_k_dim), gk.view(T, -1, host.head_k_dim)
    v = v.view(T, -1, host.head_v_dim)
    gk = F.logsigmoid(gk) / host.gate_logit_normalizer
    if host.clamp_min is not None:
        gk = gk.clamp_min(host.clamp_min)
    if host.feature_map_fn is not None:
        k = TEST_ACT[host.feature_map_fn](k)
    k, gk, v = (t.repeat_interleave(G, 1) for t in (k, gk, v))
    return naive_recurrent_gla(q[None], k[None], v[None], gk[None])[0][0]


def gla_finish(host, o, g):
    """o [T, H, V], g [T, value_dim] or None -> [T, hidden]: per-head RMS norm, output gate, o_proj."""
    n = host.g_norm_swish_gate if host.fuse_norm_and_gate else host.g_norm
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + n.eps)
    if n.weight is not None:
        y = y * n.weight
    if host.fuse_norm_and_gate:
        y = y * F.silu(g.view_as(y))
    y = y.flatten(1)
    if host.use_output_gate and not host.fuse_norm_and_gate:
        y = y * TEST_ACT[host.gate_fn](g)
    return F.linear(y, host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M = mom.host, mom.num_memories
    out = []
    for xb in x:
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q, g = gla_read(host, xb)
        o = torch.zeros(xb.shape[0], host.num_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel]
                o = o.index_add(0, sel, w[:, None, None] * gla_memory(host, q[sel], *gla_write(host, xb[sel],
                                                                                             memory_weights(mom, e))))
        if mom.shared_memory:
            o = o + gla_memory(host, q, *gla_write(host, xb, memory_weights(mom, M)))
        out.append(gla_finish(host, o, g))
    return torch.stack(out)


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant,conv', [(v, False) for v in VARIANTS] + [('default', True)])
def test_one_memory_wrapper_equals_real_host_layer(variant, conv):
    """M=1 copies, both backends, left padding in one row: the real layer (its fused_recurrent kernel, its
    norms, its short convs)."""
    host = make_gla(**host_options(variant, conv)).eval()
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
def test_one_memory_cache_equals_real_host_cache():
    """Prefill + decode through fla's Cache: same outputs and the same recurrent state, in the host's layout."""
    # no short conv: under the interpreter fla's conv autotunes its cached-step kernel for long
    host = make_gla(**VARIANTS['kv_heads']).eval()
    x = torch.randn(2, 9, HIDDEN)
    mom = wrap(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, backend='torch').eval()
    with torch.no_grad():
        outs = {}
        for name, layer in (('host', host), ('mom', mom)):
            cache = Cache()
            o = [layer(x[:, :8], past_key_values=cache, use_cache=True)[0],
                 layer(x[:, 8:], past_key_values=cache, use_cache=True)[0]]
            outs[name] = torch.cat(o, 1), cache[0]['recurrent_state']
    close(outs['mom'][0], outs['host'][0], tol=1e-5)
    assert outs['mom'][1].shape == (2, 1, *outs['host'][1].shape[1:])  # [N, E, H, V, K]
    close(outs['mom'][1][:, 0], outs['host'][1], tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
def test_triton_backend_equals_torch_backend_with_routing_and_gradients():
    """fla's fused_recurrent_gla (which the host also trains with up to 64 tokens) over routed segments with
    padding, forward and backward, against the torch backend."""
    mom = mom_gla(conv=False).train()
    x = torch.randn(2, 8, HIDDEN)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    outs, grads = {}, {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.zero_grad()
        outs[backend] = mom(x, attention_mask=mask)[0]
        outs[backend].square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in mom.named_parameters()}
    close(outs['triton'], outs['torch'], tol=1e-5)
    for name, g in grads['torch'].items():
        close(grads['triton'][name], g, tol=1e-4)


# ---- 2. routed memories against the naive loop ---------------------------------------------------------

@pytest.mark.parametrize('variant,conv,shared', [('default', False, False), ('default', True, False),
                                                  ('default', True, True), ('kv_heads', True, True),
                                                  ('kv_heads', False, False), ('feature_map_clamp', False, True),
                                                  ('unfused_gate_fn', True, True), ('no_output_gate', False, True)])
def test_matches_naive_per_memory_loop(variant, conv, shared):
    mom = mom_gla(variant, conv=conv, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('variant', ['kv_heads', 'unfused_gate_fn'])
def test_every_parameter_gets_a_gradient_matching_the_naive_loop(variant):
    mom = mom_gla(variant)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert {'memories.weight', 'memories.second.gk', 'memories.second_bias.gk', 'host.q_proj.weight',
            'host.o_proj.weight', 'router.weight'} <= {n for n, _ in mom.named_parameters()}
    ref = mom_gla(variant)
    ref.load_state_dict(mom.state_dict())
    naive_mom(ref, x.detach()).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)


def test_write_side_moves_out_of_the_host():
    mom = mom_gla()
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj', 'host.gk_proj', 'host.k_conv1d', 'host.v_conv1d'))
                   for n in names)
    assert 'host.q_conv1d.weight' in names
    assert mom.memories.proj['gk'].shape == (5, 16, HIDDEN) and mom.memories.second['gk'].shape == (5, 32, 16)


# ---- the reference recurrence and the kernel choice ------------------------------------------------------

def test_reference_recurrence_equals_fla_naive_per_segment():
    """gla_reference over packed segments with initial states against fla's naive_recurrent_gla per segment
    ([K, V] states there, [V, K] here)."""
    lengths, H, K, V = [5, 1, 9], 2, 8, 16
    cu = torch.tensor([0] + lengths).cumsum(0)
    S = int(cu[-1])
    q, k, v = torch.randn(S, H, K), torch.randn(S, H, K), torch.randn(S, H, V)
    gk = F.logsigmoid(torch.randn(S, H, K))
    h0 = torch.randn(len(lengths), H, V, K)
    position = torch.cat([torch.arange(n) for n in lengths])
    o, ht = gla_reference(q, k, v, gk, cu, position, initial_state=h0, output_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        o_i, h_i = naive_recurrent_gla(q[None, s:e], k[None, s:e], v[None, s:e], gk[None, s:e],
                                       initial_state=h0[i:i + 1].transpose(-1, -2), output_final_state=True)
        close(o[s:e], o_i[0], tol=1e-5)
        close(ht[i], h_i[0].transpose(-1, -2), tol=1e-5)
    if os.environ.get('TRITON_INTERPRET') == '1':  # and fla's varlen kernel on the same packed input
        from fla.ops.gla import fused_recurrent_gla
        o_k, h_k = fused_recurrent_gla(q[None], k[None], v[None], gk=gk[None], initial_state=h0,
                                       output_final_state=True, state_v_first=True, cu_seqlens=cu)
        close(o_k[0], o, tol=1e-5)
        close(h_k, ht, tol=1e-5)


def test_torch_activations_equal_their_definitions():
    x = torch.randn(100)
    close(TORCH_ACTIVATIONS['gelu'](x), F.gelu(x, approximate='tanh'), tol=1e-5)
    close(TORCH_ACTIVATIONS['sqrelu'](x), F.relu(x) ** 2, tol=1e-6)


@pytest.mark.parametrize('mode,max_len,kernel', [('chunk', 64, 'fused_recurrent_gla'), ('chunk', 65, 'chunk_gla'),
                                                 ('fused_chunk', 65, 'chunk_gla'),
                                                 ('fused_recurrent', 65, 'fused_recurrent_gla')])
def test_triton_backend_kernel_choice(monkeypatch, mode, max_len, kernel):
    """The host's rule on the longest segment (the chunk kernels do not run on the CPU: recorded, not run):
    chunk_gla takes g= and the host-side cu_seqlens, fused_recurrent_gla gk=; both varlen, V-first states."""
    import fla.ops.gla as ops
    calls = []

    def fake(name):
        def kernel_fn(q, k, v, **kw):
            calls.append((name, kw))
            return torch.zeros_like(v), None
        return kernel_fn

    monkeypatch.setattr(ops, 'chunk_gla', fake('chunk_gla'))
    monkeypatch.setattr(ops, 'fused_recurrent_gla', fake('fused_recurrent_gla'))
    adapter = adapter_for(make_gla(mode=mode))
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    assert dispatch.max_seqlen == max_len
    read = {'q': torch.randn(N, 2, 16)}
    write = {'k': torch.randn(N, 32), 'v': torch.randn(N, 64), 'gk': torch.randn(N, 32)}
    adapter.recurrence(read, write, dispatch, 'triton')
    (name, kw), = calls
    assert name == kernel and kw['state_v_first'] and kw['cu_seqlens'] is dispatch.cu_seqlens
    assert ('g' in kw and kw.get('cu_seqlens_cpu') is dispatch.cu_seqlens_cpu) if kernel == 'chunk_gla' \
        else ('gk' in kw and 'g' not in kw)


# ---- 3. options the adapter refuses ---------------------------------------------------------------------

@pytest.mark.parametrize('kw,match', [
    (dict(feature_map='bias_gelu'), 'feature_map'),
    (dict(fuse_norm=False, gate_fn='bias_gelu'), 'gate_fn'),
])
def test_refused_options(kw, match):
    with pytest.raises(ValueError, match=match):
        wrap(make_gla(**kw))


def test_refused_replaced_modules():
    host = make_gla()
    host.feature_map_fn = torch.tanh  # not one of fla's feature maps
    with pytest.raises(ValueError, match='feature_map'):
        wrap(host)
    host = make_gla()
    host.gk_proj = torch.nn.Linear(HIDDEN, 32)
    with pytest.raises(ValueError, match='gk_proj'):
        wrap(host)
    # bias_gelu as gate_fn is harmless where the layer never calls it (no output gate)
    wrap(make_gla(fuse_norm=False, gate_fn='bias_gelu', use_output_gate=False))
