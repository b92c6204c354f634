"""MixtureOfMemories(LinearAttention): fla's LinearAttention layer (host of the MoM authors' reference code) as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent kernel, normalisation and RMSNorm, run by Triton's
interpreter on the CPU, see conftest), and a naive per-memory loop written here from independent pieces (F.linear,
the host's feature-map modules, fla's own ``naive_recurrent_linear_attn``; nothing of mom_wrap's dispatch, grouped
linear or reference recurrence). Whole models: fla's ``LinearAttentionForCausalLM`` through the shared helpers of
tests/test_models.py and tests/test_convert.py. The checks every host passes alike (cached generation, padding,
packing, causality; on LinearAttention's options in tests/hosts.py's VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.layers import LinearAttention
from fla.models.utils import Cache
from fla.modules.activations import elu_p1
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.adapters.linear_attention import linear_attn_reference
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed, routing_rounding
from tests.test_every_host import run_chunks
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_la(**kw):
    cfg = dict(hidden_size=HIDDEN, num_heads=2, layer_idx=0)
    cfg.update(kw)
    host = LinearAttention(**cfg)
    if getattr(host.norm, 'weight', None) is not None:  # fresh norm weights are ones; make them matter
        nn.init.normal_(host.norm.weight.data, mean=1.0, std=0.3)
    return host


# each host option at least once; the normalised variants use positive feature maps (hedgehog, elu + 1), whose
# denominators stay away from zero (a signed map's can come near it and magnify rounding without bound)
VARIANTS = {
    'default': {},  # elementwise_product (learnable), rmsnorm
    'hedgehog_norm': dict(feature_map='hedgehog', do_feature_map_norm=True),
    'kv_heads_t2r_tied': dict(num_heads=4, num_kv_heads=2, expand_v=2.0, feature_map='t2r', tie_feature_map_qk=True,
                              norm_q=True, norm_k=True),
    'dpfp_identity': dict(feature_map='dpfp', expand_k=0.5, output_norm='identity'),
    'elu_norm': dict(feature_map='elu', do_feature_map_norm=True, norm_k=True, elementwise_affine=False,
                     norm_eps=1e-3),
    'relu_kv_heads': dict(num_heads=4, num_kv_heads=2, feature_map='relu', mode='fused_chunk'),
    'identity': dict(feature_map='identity', mode='fused_recurrent'),
}


def mom_la(variant='default', num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_la(**VARIANTS[variant]), num_memories, topk, shared, init, backend)


# ---- the naive per-memory loop -------------------------------------------------------------------------

def features(host, x, side):
    """x [T, heads, K] through the host's feature map of ``side`` (fla's Triton elu_p1 written out here) and
    its sum normalisation."""
    fm = getattr(host, f'feature_map_{side}')
    x = F.elu(x) + 1 if fm is elu_p1 else fm(x)
    return x / (x.sum(-1, keepdim=True) + 1e-4) if getattr(host, f'norm_{side}') else x


def la_memory(host, q, xs, wk, wv):
    """One memory's outputs [T, H, V] over its token subsequence xs [T, hidden] (q [T, H, K'] read side):
    its k, v projections, the shared key feature map, the head repeat, fla's naive recurrence."""
    T, G = xs.shape[0], host.num_kv_groups
    k = features(host, F.linear(xs, wk).view(T, -1, host.head_k_dim), 'k').repeat_interleave(G, 1)
    v = F.linear(xs, wv).view(T, -1, host.head_v_dim).repeat_interleave(G, 1)
    return naive_recurrent_linear_attn(q[None], k[None], v[None], normalize=host.do_feature_map_norm)[0][0]


def la_finish(host, o):
    """o [T, H, V] -> [T, hidden]: per-head RMS norm (or none), o_proj."""
    if isinstance(host.norm, nn.Identity):
        y = o
    else:
        y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + host.norm.eps)
        y = y if host.norm.weight is None else y * host.norm.weight
    return F.linear(y.flatten(1), host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M, bank = mom.host, mom.num_memories, mom.memories
    out = []
    for xb in x:
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q = features(host, F.linear(xb, host.q_proj.weight).view(xb.shape[0], host.num_heads, -1), 'q')
        o = torch.zeros(xb.shape[0], host.num_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                w = (top_p * (top_i == e)).sum(-1)[sel]
                o = o.index_add(0, sel, w[:, None, None] * la_memory(host, q[sel], xb[sel], bank.proj['k'][e],
                                                                     bank.proj['v'][e]))
        if mom.shared_memory:
            o = o + la_memory(host, q, xb, bank.proj['k'][M], bank.proj['v'][M])
        out.append(la_finish(host, o))
    return torch.stack(out)


def packed_host_state(state):
    """The host's cached state in ours: [N, H, K', V], or its (kv, z [N, 1, H, K']) pair as [N, H, K', V + 1]."""
    return torch.cat([state[0], state[1][:, 0, ..., None]], -1) if isinstance(state, tuple) else state


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', VARIANTS)
def test_one_memory_wrapper_equals_real_host_layer(variant):
    """M=1 copies, both backends, left padding in one row: the real layer (its fused_recurrent kernel, feature
    maps, normalisation, norm)."""
    host = make_la(**VARIANTS[variant]).eval()
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
@pytest.mark.parametrize('variant', ['default', 'hedgehog_norm', 'kv_heads_t2r_tied'])
def test_one_memory_cache_equals_real_host_cache(variant):
    """Prefill + decode through fla's Cache: the host's outputs and its recurrent state (with
    do_feature_map_norm its (kv, key sum) pair, packed as ours is)."""
    host = make_la(**VARIANTS[variant]).eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        outs = {}
        for name, layer in [('host', host)] + [(b, wrap(copy.deepcopy(host), num_memories=1, topk=1,
                                                         shared_memory=False, backend=b).eval())
                                               for b in ('torch', 'triton')]:
            cache = Cache()
            o = [layer(x[:, :7], past_key_values=cache, use_cache=True)[0],
                 layer(x[:, 7:8], past_key_values=cache, use_cache=True)[0],
                 layer(x[:, 8:], past_key_values=cache, use_cache=True)[0]]
            outs[name] = torch.cat(o, 1), cache[0]['recurrent_state']
    want = packed_host_state(outs['host'][1])
    for backend in ('torch', 'triton'):
        close(outs[backend][0], outs['host'][0], tol=1e-5)
        assert outs[backend][1].shape == (2, 1, *want.shape[1:])  # [N, E, H, K', V (+1)]
        close(outs[backend][1][:, 0], want, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', ['hedgehog_norm', 'relu_kv_heads'])
def test_triton_backend_equals_torch_backend_with_routing_and_cache(variant):
    """fla's varlen fused_recurrent kernel (and its normalisation) over routed segments from cached states, with
    left padding and a padding token inside a decode step (its states must stay), against the torch backend."""
    mom = mom_la(variant).eval()
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
    close(outs['triton'][0], outs['torch'][0], tol=1e-5)
    close(outs['triton'][1][0]['recurrent_state'], outs['torch'][1][0]['recurrent_state'], tol=1e-5)


# ---- 2. routed memories against the naive loop ---------------------------------------------------------

@pytest.mark.parametrize('variant,shared', [('default', False), ('default', True), ('hedgehog_norm', True),
                                            ('kv_heads_t2r_tied', True), ('dpfp_identity', False),
                                            ('elu_norm', True), ('relu_kv_heads', False), ('identity', True)])
def test_matches_naive_per_memory_loop(variant, shared):
    mom = mom_la(variant, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('variant', ['hedgehog_norm', 'kv_heads_t2r_tied', 'default'])
def test_every_parameter_gets_a_gradient_matching_the_naive_loop(variant):
    mom = mom_la(variant)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = mom_la(variant)
    ref.load_state_dict(mom.state_dict())
    naive_mom(ref, x.detach()).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)


def test_write_side_moves_out_of_the_host_and_the_feature_maps_stay_shared():
    mom = mom_la('default')
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj')) for n in names)
    assert {'memories.weight', 'host.q_proj.weight', 'host.o_proj.weight', 'host.norm.weight',
            'host.feature_map_q.layer1.weight', 'host.feature_map_k.layer2.bias'} <= names
    assert mom.memories.proj['k'].shape == (5, 64, HIDDEN) and mom.memories.proj['v'].shape == (5, 64, HIDDEN)
    tied = mom_la('kv_heads_t2r_tied')  # tie_feature_map_qk: one module, its parameters once
    assert tied.host.feature_map_q is tied.host.feature_map_k
    assert tied.memories.proj['k'].shape == (5, 32, HIDDEN) and tied.memories.proj['v'].shape == (5, 64, HIDDEN)


@pytest.mark.parametrize('variant', ['default', 'hedgehog_norm', 'kv_heads_t2r_tied', 'dpfp_identity', 'elu_norm'])
def test_state_shape(variant):
    """A memory's state per sequence: [H, K', V], K' the feature map's size (hedgehog 2K, dpfp 8K), with
    do_feature_map_norm one more value column, the key sum (the real host's states: the cache test above)."""
    mom = mom_la(variant)
    K, V = mom.host.head_k_dim, mom.host.head_v_dim
    shape = {'default': (2, K, V), 'hedgehog_norm': (2, 2 * K, V + 1), 'kv_heads_t2r_tied': (4, K, V),
             'dpfp_identity': (2, 8 * K, V), 'elu_norm': (2, K, V + 1)}[variant]
    assert mom._adapter.state_shape() == shape


# ---- the reference recurrence, the kernels and the kernel choice ------------------------------------------

@pytest.mark.parametrize('normalize', [False, True])
def test_reference_recurrence_equals_fla_naive_and_kernel_per_segment(normalize):
    """linear_attn_reference over packed segments with initial states against fla's naive_recurrent_linear_attn
    per segment ((kv, z) pair there, z as the last value column here), and the adapter's triton path (fla's varlen
    fused_recurrent kernel and normalisation) on the same segments."""
    lengths, H, K, V = [5, 1, 9], 2, 8, 16
    cu = torch.tensor([0] + lengths).cumsum(0)
    S = int(cu[-1])
    q, k, v = torch.rand(S, H, K), torch.rand(S, H, K), torch.randn(S, H, V)
    h0 = torch.randn(len(lengths), H, K, V + normalize)
    if normalize:
        h0[..., V] = torch.rand(len(lengths), H, K)  # a key sum of positive keys
    position = torch.cat([torch.arange(n) for n in lengths])
    o, ht = linear_attn_reference(q, k, v, cu, position, h0, True, normalize)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        init = (h0[i:i + 1, ..., :V], h0[i:i + 1, ..., V][:, None]) if normalize else h0[i:i + 1]
        o_i, h_i = naive_recurrent_linear_attn(q[None, s:e], k[None, s:e], v[None, s:e], initial_state=init,
                                               output_final_state=True, normalize=normalize)
        close(o[s:e], o_i[0], tol=1e-5)
        close(ht[i], packed_host_state(h_i)[0] if normalize else h_i[0], tol=1e-5)
    if os.environ.get('TRITON_INTERPRET') == '1':
        adapter = adapter_for(make_la(num_heads=H, expand_k=H * K / HIDDEN, expand_v=H * V / HIDDEN,
                                      feature_map='identity', do_feature_map_norm=normalize))
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        dispatch = plan_dispatch(torch.zeros(S, 1, dtype=torch.long), torch.ones(S, 1), sequence, None, 3, 1)
        with torch.no_grad():
            o_k, h_k = adapter.recurrence({'q': q}, {'k': k.flatten(1), 'v': v.flatten(1)}, dispatch, 'triton',
                                          initial_state=h0, output_final_state=True)
        close(o_k, o, tol=1e-5)
        close(h_k, ht, tol=1e-5)


@pytest.mark.parametrize('mode,max_len,grad,kernel', [
    ('chunk', 64, False, 'fused_recurrent_simple_gla'), ('chunk', 65, False, 'chunk_simple_gla'),
    ('fused_chunk', 65, False, 'fused_chunk_simple_gla'),
    ('fused_recurrent', 65, False, 'fused_recurrent_simple_gla'), ('fused_recurrent', 8, True, 'chunk_simple_gla')])
def test_triton_backend_kernel_choice(monkeypatch, mode, max_len, grad, kernel):
    """The host's rule (chunk whenever gradients are on, else fused_recurrent up to 64 tokens, else its mode's
    kernel), on the longest segment; the chunk kernels do not run on the CPU: recorded, not run. Every kernel
    gets cu_seqlens, no gate and the scale of the mapped keys; chunk also the host-side cu_seqlens."""
    import fla.ops.simple_gla as ops
    calls = []

    def fake(name):
        def kernel_fn(q, k, v, **kw):
            calls.append((name, kw))
            return torch.zeros_like(v), None
        return kernel_fn

    for name in ('chunk_simple_gla', 'fused_chunk_simple_gla', 'fused_recurrent_simple_gla'):
        monkeypatch.setattr(ops, name, fake(name))
    adapter = adapter_for(make_la(mode=mode, feature_map='hedgehog'))
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    assert dispatch.max_seqlen == max_len
    read = {'q': torch.randn(N, 2, 64)}
    write = {'k': torch.randn(N, 64), 'v': torch.randn(N, 64)}
    with torch.set_grad_enabled(grad):
        adapter.recurrence(read, write, dispatch, 'triton')
    (name, kw), = calls
    assert name == kernel and kw['cu_seqlens'] is dispatch.cu_seqlens and kw['scale'] == 64 ** -0.5
    assert 'g' not in kw and 'g_gamma' not in kw
    assert (kw.get('cu_seqlens_cpu') is dispatch.cu_seqlens_cpu) == (kernel == 'chunk_simple_gla')



@pytest.mark.gpu
@pytest.mark.parametrize('variant', ['default', 'hedgehog_norm', 'kv_heads_t2r_tied', 'elu_norm', 'relu_kv_heads'])
def test_gpu_chunk_kernels_equal_the_host_and_the_torch_backend(variant):
    """On CUDA (fp32, dots in IEEE fp32: tests/conftest.py; in TF32 they were 2-11e-4 off), past 64 tokens, where
    the CPU cannot go: the host's mode kernel in eval (chunk_simple_gla, fused_chunk_simple_gla) and
    chunk_simple_gla in training, normalisation included. M=1 copies equal the host (output, input and parameter gradients); routed
    memories on the triton backend equal the torch backend (output, every gradient); cached chunks across the
    64-token switch equal the full forward."""
    host = make_la(**VARIANTS[variant]).cuda()
    x = torch.randn(2, 200, HIDDEN, device='cuda')
    with torch.no_grad():
        mom = MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                                backend='triton').eval()
        close(mom(x)[0], copy.deepcopy(host).eval()(x)[0], tol=1e-4)
    ref = copy.deepcopy(host).train()
    mom = wrap(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, backend='triton').train()
    runs = []
    for layer in (ref, mom):
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        y.square().mean().backward()
        runs.append((y.detach(), xi.grad, ref.o_proj.weight.grad if layer is ref else mom.host.o_proj.weight.grad))
    for got, want in zip(runs[1], runs[0]):
        close(got, want, tol=1e-4)
    mom = mom_la(variant).cuda().train()
    outs = {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.zero_grad()
        xi = x.clone().requires_grad_()
        y = mom(xi)[0]
        y.square().mean().backward()
        outs[backend] = [y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()]
    for got, want in zip(outs['triton'], outs['torch']):
        close(got, want, tol=1e-4)
    mom.eval()
    with torch.no_grad():
        close(run_chunks(mom, x, [130, 1, 69])[0], mom(x)[0], tol=1e-4)

# ---- 3. options the adapter refuses ---------------------------------------------------------------------

def test_refused_replaced_modules():
    from fla.modules.feature_map import LearnableOuterProductFeatureMap
    host = make_la(feature_map='elu')  # (elu's map is a function, the others modules)
    host.feature_map_k = torch.tanh  # not one of the feature maps LinearAttention builds
    with pytest.raises(ValueError, match='feature_map'):
        wrap(host)
    host = make_la()
    host.feature_map_k = nn.Tanh()
    with pytest.raises(ValueError, match='feature_map'):
        wrap(host)
    host = make_la()
    host.feature_map_q = LearnableOuterProductFeatureMap(32, 8)
    with pytest.raises(ValueError, match='feature_map'):
        wrap(host)
    host = make_la()
    host.norm = nn.LayerNorm(32)
    with pytest.raises(ValueError, match='output_norm'):
        wrap(host)
    with pytest.raises(ValueError, match='preserve'):  # the core's own refusals reach this host too
        wrap(make_la(), init='preserve', shared_memory=False)
