"""MixtureOfMemories(KimiDeltaAttention): fla's KDA layer (Kimi Linear's gated delta rule, a gate per key channel)
as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent_kda kernel with the gate and beta in-kernel, its
short convs and FusedRMSNormGated, run by Triton's interpreter on the CPU, see conftest) over its options, its cache
too; and a naive per-memory loop written here from independent pieces (F.linear, F.conv1d, fla's own
``naive_kda_gate`` / ``naive_kda_lowerbound_gate`` and ``naive_recurrent_kda``, the gated RMS norm written out;
nothing of mom_wrap's dispatch, grouped linear, segment conv, gate or reference recurrence), outputs and gradients.
fla's chunk_kda (the host's kernel whenever gradients flow) does not run under the interpreter (README, known host
limits): the triton backend's training path is checked on a GPU only (``gpu``); here its choice and arguments are
recorded. Whole models: ``example_models`` (the parity suite), tests/test_models.py and tests/test_convert.py. The
checks every host passes alike (cached generation, padding, packing, causality; on KDA's options in tests/hosts.py's
VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers import KimiDeltaAttention
from fla.models.utils import Cache
from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
from fla.ops.kda.naive import naive_recurrent_kda

import mom_wrap.adapters.kda as kda
from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed, routing_rounding
from tests.test_every_host import flat_states, run, run_chunks
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_kda(**kw):
    cfg = dict(hidden_size=HIDDEN, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)
    cfg.update(kw)
    host = KimiDeltaAttention(**cfg)
    torch.nn.init.normal_(host.o_norm.weight.data, mean=1.0, std=0.3)  # fresh norm weights are ones
    return host


# each host option at least once (K = 16; V = 32 unless expand_v says otherwise)
VARIANTS = {
    'default': {},  # 2 heads, short convs
    'gva': dict(num_v_heads=4, expand_v=1),  # 4 value heads on 2 q/k heads
    'no_conv_neg_eigval': dict(use_short_conv=False, allow_neg_eigval=True),
    'lower_bound': dict(lower_bound=-2.0, conv_bias=True, norm_eps=1e-2),
    'safe_gate_fused_recurrent': dict(safe_gate=True, lower_bound=-5.0, mode='fused_recurrent', conv_size=2),
}


def mom_kda(variant='default', num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_kda(**VARIANTS[variant]), num_memories, topk, shared, init, backend)


# ---- the naive per-memory loop -------------------------------------------------------------------------

def _conv_silu(x, weight, bias):
    """Causal depthwise conv + SiLU (fla's ShortConvolution) over one (sub)sequence x [T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    return F.silu(F.conv1d(x.t()[None], weight, bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t())


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def memory_weights(mom, e):
    """Memory e's write side as plain tensors."""
    bank = mom.memories
    w = dict(k=bank.proj['k'][e], v=bank.proj['v'][e], f0=bank.proj['f'][e], f1=bank.second['f'][e],
             b=bank.proj['b'][e])
    assert 'f' not in bank.second_bias  # (fla's f_proj has no biases)
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        w[f'{n}_conv_bias'] = bank.conv_bias[n][e] if n in bank.conv_bias else None
    return w


def kda_memory(host, q, xs, w):
    """One memory's outputs [T, HV, V] over its token subsequence xs [T, hidden] (q [T, H, K] after its conv):
    k, v (and convs), the gate from fla's naive gate functions, beta, L2 norms, fla's naive_recurrent_kda."""
    T, H, HV, K = xs.shape[0], host.num_heads, host.num_v_heads, host.head_k_dim
    k, v = F.linear(xs, w['k']), F.linear(xs, w['v'])
    if host.use_short_conv:
        k, v = _conv_silu(k, w['k_conv'], w['k_conv_bias']), _conv_silu(v, w['v_conv'], w['v_conv_bias'])
    else:
        k, v = F.silu(k), F.silu(v)
    f = F.linear(F.linear(xs, w['f0']), w['f1']).view(T, HV, K)
    if host.lower_bound is None:
        g = naive_kda_gate(f, host.A_log, host.dt_bias)
    else:
        g = naive_kda_lowerbound_gate(f, host.A_log, host.dt_bias, lower_bound=host.lower_bound)
    beta = torch.sigmoid(F.linear(xs, w['b'])) * (2 if host.allow_neg_eigval else 1)
    o, _ = naive_recurrent_kda(_l2(q)[None], _l2(k.view(T, H, K))[None], v.view(T, HV, -1)[None], g[None], beta[None])
    return o[0]


def kda_finish(host, o, x):
    """o [T, HV, V] -> [T, hidden]: RMS norm per value head, times the norm weight and sigmoid(g_proj(x)), o_proj."""
    gate = F.linear(F.linear(x, host.g_proj[0].weight), host.g_proj[1].weight, host.g_proj[1].bias)
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + host.o_norm.eps) * host.o_norm.weight
    y = y * torch.sigmoid(gate.view_as(o))
    return F.linear(y.flatten(1), host.o_proj.weight)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host, M = mom.host, mom.num_memories
    out = []
    for xb in x:
        T = xb.shape[0]
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q = F.linear(xb, host.q_proj.weight)
        q = _conv_silu(q, host.q_conv1d.weight, host.q_conv1d.bias) if host.use_short_conv else F.silu(q)
        q = q.view(T, host.num_heads, -1)
        o = torch.zeros(T, host.num_v_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                wt = (top_p * (top_i == e)).sum(-1)[sel]
                o = o.index_add(0, sel, wt[:, None, None] * kda_memory(host, q[sel], xb[sel], memory_weights(mom, e)))
        if mom.shared_memory:
            o = o + kda_memory(host, q, xb, memory_weights(mom, M))
        out.append(kda_finish(host, o, xb))
    return torch.stack(out)


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_memory_wrapper_equals_real_host_layer(variant):
    """M=1 copies, both backends, left padding in one row: the real layer (fused_recurrent_kda with the gate,
    beta and L2 norms in-kernel, its convs, FusedRMSNormGated)."""
    host = make_kda(**VARIANTS[variant]).eval()
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
@pytest.mark.parametrize('variant', ['default', 'gva'])
def test_one_memory_cache_equals_real_host_cache(variant):
    """Prefill + decode through fla's Cache: the host's outputs, its recurrent state [N, HV, V, K] and its conv
    states."""
    host = make_kda(**VARIANTS[variant]).eval()
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
    want = outs['host'][1]
    assert want.shape == (2, host.num_v_heads, host.head_v_dim, 16)
    for backend in ('torch', 'triton'):
        close(outs[backend][0], outs['host'][0], tol=1e-5)
        assert outs[backend][1].shape == (2, 1, *want.shape[1:])  # [N, E, HV, V, K]
        close(outs[backend][1][:, 0], want, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant', ['default', 'gva', 'safe_gate_fused_recurrent'])
def test_triton_backend_equals_torch_backend_with_routing_padding_and_cache(variant):
    """fla's fused_recurrent_kda (eval) over routed segments with per-segment initial and final states: left
    padding, a padding token inside a decode step, chunk by chunk; outputs and every state equal the torch
    backend's, and each backend's equal its own full forward."""
    mom = mom_kda(variant).eval()
    x = torch.randn(2, 10, HIDDEN)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[1, 6] = 0
    outs = {}
    with torch.no_grad():
        for backend in ('torch', 'triton'):
            mom.backend = backend
            outs[backend] = run_chunks(mom, x, [6, 1, 1, 2], mask)
            close(run(mom, x, attention_mask=mask), outs[backend][0], tol=1e-5 + routing_rounding(mom, x))
    close(outs['triton'][0], outs['torch'][0], tol=1e-5)
    for a, b in zip(flat_states(mom, outs['triton'][1]), flat_states(mom, outs['torch'][1])):
        close(a, b, tol=1e-5)


# ---- 2. routed memories against the naive loop ---------------------------------------------------------

@pytest.mark.parametrize('variant,shared', [('default', False), ('default', True), ('gva', True),
                                            ('no_conv_neg_eigval', False), ('lower_bound', True),
                                            ('safe_gate_fused_recurrent', True)])
def test_matches_naive_per_memory_loop(variant, shared):
    mom = mom_kda(variant, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('variant', ['default', 'gva', 'lower_bound'])
def test_every_parameter_gets_the_naive_loops_gradient(variant):
    """Every parameter (A_log and dt_bias too, shared by the memories) and the input: the naive loop's gradient."""
    mom = mom_kda(variant)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    ref = mom_kda(variant)
    ref.load_state_dict(mom.state_dict())
    ref_x = x.detach().clone().requires_grad_()
    naive_mom(ref, ref_x).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)
    close(x.grad, ref_x.grad, tol=1e-4)


def test_reference_recurrence_in_fp64_equals_fla_naive_with_initial_states():
    """kda_reference on packed segments of unequal lengths, GVA, initial states, fp64: each segment's outputs and
    final state are fla's naive_recurrent_kda's on it alone (its [K, V] state transposed to the host's [V, K])."""
    H, HV, K, V = 2, 4, 8, 6
    lengths = [5, 1, 7]
    S = sum(lengths)
    cu = torch.tensor([0, 5, 6, 13])
    position = torch.cat([torch.arange(n) for n in lengths])
    dt = torch.float64
    q, k = torch.randn(S, H, K, dtype=dt), torch.randn(S, H, K, dtype=dt)
    v, f, b = torch.randn(S, HV, V, dtype=dt), torch.randn(S, HV, K, dtype=dt), torch.randn(S, HV, dtype=dt)
    A_log, dt_bias, h0 = torch.randn(HV, dtype=dt), torch.randn(HV * K, dtype=dt), torch.randn(3, HV, V, K, dtype=dt)
    for lower_bound, neg in [(None, False), (-3.0, True)]:
        o, ht = kda.kda_reference(q, k, v, f, b, A_log, dt_bias, cu, position, lower_bound, neg, initial_state=h0,
                                  output_final_state=True)
        assert o.dtype == dt and ht.dtype == dt
        g = naive_kda_gate(f, A_log, dt_bias, output_dtype=dt) if lower_bound is None else \
            naive_kda_lowerbound_gate(f, A_log, dt_bias, lower_bound=lower_bound, output_dtype=dt)
        beta = b.sigmoid() * (2 if neg else 1)
        for i in range(3):
            s = slice(cu[i], cu[i + 1])
            # (fla's naive casts to fp32: compare at fp32's precision)
            o_i, h_i = naive_recurrent_kda(_l2(q[s])[None], _l2(k[s])[None], v[s][None], g[s][None], beta[s][None],
                                           initial_state=h0[i:i + 1].transpose(-1, -2), output_final_state=True)
            close(o[s], o_i[0].double(), tol=1e-5)
            close(ht[i], h_i[0].transpose(-1, -2).double(), tol=1e-5)


def test_write_side_moves_out_of_the_host():
    mom = mom_kda('gva')
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.k_proj', 'host.v_proj', 'host.f_proj', 'host.b_proj', 'host.k_conv1d',
                                 'host.v_conv1d')) for n in names)
    assert {'host.q_proj.weight', 'host.q_conv1d.weight', 'host.g_proj.0.weight', 'host.g_proj.1.bias',
            'host.o_norm.weight', 'host.o_proj.weight', 'host.A_log', 'host.dt_bias'} <= names
    bank = mom.memories
    assert bank.proj['f'].shape == (5, 16, HIDDEN) and bank.second['f'].shape == (5, 64, 16)  # rank V = 16
    assert bank.proj['b'].shape == (5, 4, HIDDEN) and bank.proj['v'].shape == (5, 64, HIDDEN)
    assert mom._adapter.state_shape() == (4, 16, 16) and mom._adapter.read_conv_shapes() == {'q': (32, 4)}


# ---- the kernel choice and the model's norm eps ------------------------------------------------------------

@pytest.mark.parametrize('mode,training,grad,max_len,kernel', [
    ('chunk', False, False, 64, 'fused_recurrent_kda'), ('chunk', False, False, 65, 'chunk_kda'),
    ('fused_recurrent', False, False, 65, 'fused_recurrent_kda'), ('fused_recurrent', False, True, 5, 'chunk_kda'),
    ('fused_recurrent', True, False, 5, 'chunk_kda')])
def test_triton_backend_kernel_choice(monkeypatch, mode, training, grad, max_len, kernel):
    """The host's rule on the longest segment (chunk_kda does not run on the CPU: recorded, not run): chunk_kda
    whenever gradients flow or in training, fused_recurrent_kda for eval up to 64 tokens, else the mode's kernel;
    the raw gate and beta logits with the host's A_log, dt_bias, lower bound (and safe_gate for chunk, in fla's
    graph mode, which builds its chunk indices on the device: no host-side cu_seqlens), varlen, V-first states."""
    import fla.ops.kda as ops
    calls = []

    def fake(name):
        def kernel_fn(q, k, v, g, beta, **kw):
            calls.append((name, g, beta, kw))
            return torch.zeros_like(v), None
        return kernel_fn

    monkeypatch.setattr(ops, 'chunk_kda', fake('chunk_kda'))
    monkeypatch.setattr(ops, 'fused_recurrent_kda', fake('fused_recurrent_kda'))
    host = make_kda(mode=mode, safe_gate=True, lower_bound=-4.0, allow_neg_eigval=True).train(training)
    adapter = adapter_for(host)
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    assert dispatch.max_seqlen == max_len
    read = {'q': torch.randn(N, 2, 16)}
    write = {'k': torch.randn(N, 32), 'v': torch.randn(N, 64), 'f': torch.randn(N, 32), 'b': torch.randn(N, 2)}
    with torch.set_grad_enabled(grad):
        adapter.recurrence(read, write, dispatch, 'triton')
    (name, g, beta, kw), = calls
    assert name == kernel and kw['state_v_first'] and kw['cu_seqlens'] is dispatch.cu_seqlens
    assert kw['use_gate_in_kernel'] and kw['use_beta_sigmoid_in_kernel'] and kw['use_qk_l2norm_in_kernel']
    assert kw['A_log'] is host.A_log and kw['dt_bias'] is host.dt_bias and kw['lower_bound'] == -4.0
    assert kw['allow_neg_eigval']
    assert torch.equal(g[0].flatten(1), write['f']) and torch.equal(beta[0], write['b'])
    if kernel == 'chunk_kda':
        assert kw['safe_gate'] and kw['use_graph'] and 'cu_seqlens_cpu' not in kw and 'max_num_seqs' not in kw
    else:
        assert 'safe_gate' not in kw and 'use_graph' not in kw


@needs_kernels
@pytest.mark.interpreter
def test_model_check_sees_the_norm_eps(monkeypatch):
    """The parity suite's model check (``example_models``) fails an adapter whose output norm took another eps
    than the model's norm_eps (the layer's default, 1e-5, for the model's 1e-2): 5e-3 relative, measured."""
    def error():
        make = kda.KimiDeltaAttentionAdapter.example_models()['norm_eps=1e-2']
        with torch.no_grad():
            return testing.rel_err(*testing._one_memory_model(make, 'cpu', torch.float32, None,
                                                              torch.Generator().manual_seed(0)))
    assert error() <= testing.TOL[torch.float32]
    real = kda.rms_norm_gated
    monkeypatch.setattr(kda, 'rms_norm_gated', lambda o, g, w, b, eps, act: real(o, g, w, b, 1e-5, act))
    assert error() > 10 * testing.TOL[torch.float32]


# ---- 3. what the adapter refuses --------------------------------------------------------------------------

def test_refused_options_and_modules():
    host = make_kda()
    host.mode = 'fused_chunk'  # (the host asserts its mode at construction only)
    with pytest.raises(ValueError, match='mode'):
        wrap(host)
    for lower_bound in (None, -6.0, 0.0):  # fla's chunk_kda raises on these whenever the host trains
        with pytest.raises(ValueError, match='safe_gate'):
            wrap(make_kda(safe_gate=True, lower_bound=lower_bound))
    host = make_kda()
    host.f_proj = torch.nn.Linear(HIDDEN, 32, bias=False)  # a full-rank gate projection is not the host's
    with pytest.raises(ValueError, match='f_proj'):
        wrap(host)
    host = make_kda()
    host.g_proj[1] = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match='g_proj'):
        wrap(host)


# ---- 4. fla's chunk kernels, forward and backward (GPU) ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize('variant', ['gva', 'lower_bound', 'safe_gate_fused_recurrent'])
def test_triton_backend_equals_torch_backend_in_training(variant):
    """chunk_kda (every training forward; segments past 64 tokens, two chunks and more) against the torch backend,
    fp32 (5e-3 relative, set for TF32 dot products), outputs and every gradient, at head_dim 64: grouped
    value heads, the lower-bounded gate with and without safe_gate (the example host at T = 256:
    tests/test_every_host.py)."""
    torch.manual_seed(0)
    cfg = {'num_heads': 2, **VARIANTS[variant], 'hidden_size': 256, 'head_dim': 64}  # gva: 4 value heads on 2
    mom = MixtureOfMemories(KimiDeltaAttention(**cfg), num_memories=4, topk=2, init='random').cuda().train()
    torch.nn.init.normal_(mom.router.weight, std=0.05)
    x = torch.randn(2, 200, 256, device='cuda')
    mask = torch.ones(2, 200, dtype=torch.long, device='cuda')
    mask[1, :37] = 0
    runs = {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        xi = x.clone().requires_grad_()
        y = mom(xi, attention_mask=mask)[0]
        y.square().mean().backward()
        runs[backend] = [y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()]
        mom.zero_grad()
    for a, b in zip(runs['triton'], runs['torch']):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_one_host_device_sync_per_training_forward_none_per_decode_step(dtype):
    """A training forward and its backward sync once, the plan's (the segment lengths). chunk_kda took no chunk
    indices from the caller and uploaded the ones it made from the host-side cu_seqlens with a blocking copy, a
    second sync (counted on an H100, 2026-12-07); in fla's graph mode (use_graph) it builds them on the device. A
    decode step (fused_recurrent_kda on the gathered states) reads back nothing."""
    from fla.models.utils import Cache
    from mom_wrap.testing import host_syncs
    mom = MixtureOfMemories(KimiDeltaAttention(hidden_size=256, head_dim=64, num_heads=4, layer_idx=0),
                            num_memories=4, topk=2).to('cuda', dtype).train()
    x = torch.randn(2, 200, 256, device='cuda', dtype=dtype)
    mom(x)[0].sum().backward()  # warm-up: first-call probes and autotuning may sync
    syncs = host_syncs(lambda: mom(x))
    assert syncs == ['torch.cuda.Event.synchronize'], syncs
    syncs = host_syncs(lambda: mom(x)[0].sum().backward())
    assert syncs == ['torch.cuda.Event.synchronize'], syncs
    mom.eval()
    with torch.no_grad():
        cache = Cache()
        mom(x, past_key_values=cache, use_cache=True)
        step = x[:, :1]
        mom(step, past_key_values=cache, use_cache=True)  # warm-up of the decode kernels
        assert host_syncs(lambda: mom(step, past_key_values=cache, use_cache=True)) == []
