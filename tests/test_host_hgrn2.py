"""MixtureOfMemories(HGRN2Attention): fla's HGRN2 layer as host.

Oracles: the real fla layer (eval, T <= 64: its fused_recurrent_gla kernel, swish and fused norm + o_proj, run by
Triton's interpreter on the CPU, see conftest), with the ``lower_bound`` its model passes ([forget_dim]) or one per
token, and a naive per-memory loop written here from independent pieces (F.linear, F.conv1d, the lower-bounded gate
written as lb + (1 - lb) sigmoid(f), fla's own ``naive_recurrent_gla``; nothing of mom_wrap's dispatch, grouped
linear, segment conv, gate or reference recurrence). Whole models: ``HGRN2ForCausalLM`` (its per-layer lower bounds
and their gradient, and the model check's reach) here, the shared model lists in tests/test_models.py and
tests/test_convert.py. The checks every host passes alike (cached generation, padding, packing, causality; on
HGRN2's options in tests/hosts.py's VARIANTS): tests/test_every_host.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers import HGRN2Attention
from fla.models.utils import Cache
from fla.ops.gla.naive import naive_recurrent_gla

import mom_wrap.adapters.hgrn2 as hgrn2
from mom_wrap import MixtureOfMemories, testing
from mom_wrap.adapters import adapter_for
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.testing import routed, routing_rounding
from tests.test_every_host import flat_states, run, run_chunks
from tests.test_layer import HIDDEN, close, wrap

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


def make_hgrn2(**kw):
    cfg = dict(hidden_size=HIDDEN, expand_ratio=32, layer_idx=1)
    cfg.update(kw)
    host = HGRN2Attention(**cfg)
    if host.g_norm.weight is not None:  # fresh norm weights are ones; make them matter
        torch.nn.init.normal_(host.g_norm.weight.data, mean=1.0, std=0.3)
    return host


# each host option at least once; layer 0 ignores the lower bound, later layers apply it. The short convs are a
# flag of their own (``conv``): under the interpreter the real layer's conv runs slowly
VARIANTS = {
    'default': {},  # 2 heads of K = V = 32, layer 1
    'heads4': dict(expand_ratio=16),  # 4 heads of K = V = 16
    'num_heads_layer0': dict(expand_ratio=None, num_heads=4, layer_idx=0),
    'one_head_no_affine': dict(expand_ratio=64, elementwise_affine=False, norm_eps=1e-1),  # norm_eps: ignored
    'fused_recurrent': dict(mode='fused_recurrent', expand_ratio=16),
}
CONV = dict(use_short_conv=True, conv_bias=True)


def host_options(variant, conv):
    return {**VARIANTS[variant], **(CONV if conv else {})}


def mom_hgrn2(variant='default', conv=False, num_memories=4, topk=2, shared=True, init='random', backend='torch'):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh
    biases redrawn), no balancing loss."""
    return testing.wrap(make_hgrn2(**host_options(variant, conv)), num_memories, topk, shared, init, backend)


def lower_bound(kind, x=None):
    """None, the model's form [forget_dim] (values in (0, 1)) or one per token [B, T, forget_dim] made from x."""
    if kind == 'none':
        return None
    if kind == 'model':
        return torch.rand(HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    return torch.sigmoid(x.flip(-1) * 2)


# ---- the naive per-memory loop -------------------------------------------------------------------------

def _conv(x, weight, bias):
    """Causal depthwise conv (no activation, as HGRN2's) over one (sub)sequence x [T, D], weight [D, 1, W]."""
    W = weight.shape[-1]
    return F.conv1d(x.t()[None], weight, bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t()


def memory_weights(mom, e):
    """Memory e's write side as plain tensors."""
    bank = mom.memories
    w = dict(f=bank.proj['f'][e], i=bank.proj['i'][e])
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        w[f'{n}_conv_bias'] = bank.conv_bias[n][e] if n in bank.conv_bias else None
    return w


def hgrn2_memory(host, q, xs, w, lb):
    """One memory's outputs [T, H, V] over its token subsequence xs [T, hidden]: its f, i projections (and convs),
    the forget gate lb + (1 - lb) sigmoid(f) (lb: [T, F], or None: sigmoid(f)), k = 1 - gate, fla's naive GLA."""
    T, H = xs.shape[0], host.num_heads
    f, i = F.linear(xs, w['f']), F.linear(xs, w['i'])
    if host.use_short_conv:
        f, i = _conv(f, w['f_conv'], w['f_conv_bias']), _conv(i, w['i_conv'], w['i_conv_bias'])
    gate = torch.sigmoid(f) if lb is None else lb + (1 - lb) * torch.sigmoid(f)
    k, g = (1 - gate).view(T, H, -1), gate.log().view(T, H, -1)
    return naive_recurrent_gla(q[None], k[None], i.view(T, H, -1)[None], g[None])[0][0]


def hgrn2_finish(host, o):
    """o [T, H, V] -> [T, hidden]: RMS norm over the whole value dim (eps 1e-5, fla's rms_norm_linear), o_proj."""
    y = o.flatten(1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    if host.g_norm.weight is not None:
        y = y * host.g_norm.weight
    return F.linear(y, host.o_proj.weight)


def naive_mom(mom, x, lb=None):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``; lb: the
    lower bound ([F] or [B, T, F]), applied after layer 0."""
    host, M = mom.host, mom.num_memories
    out = []
    for b, xb in enumerate(x):
        T = xb.shape[0]
        lbb = None if lb is None or host.layer_idx == 0 else lb.expand(*x.shape[:2], -1)[b]
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)  # the router's rule, ties included
        q = F.linear(xb, host.q_proj.weight)
        if host.use_short_conv:
            q = _conv(q, host.q_conv1d.weight, host.q_conv1d.bias)
        q = F.silu(q).view(T, host.num_heads, -1)
        o = torch.zeros(T, host.num_heads, host.head_i_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                wt = (top_p * (top_i == e)).sum(-1)[sel]
                o = o.index_add(0, sel, wt[:, None, None] * hgrn2_memory(host, q[sel], xb[sel], memory_weights(mom, e),
                                                                         None if lbb is None else lbb[sel]))
        if mom.shared_memory:
            o = o + hgrn2_memory(host, q, xb, memory_weights(mom, M), lbb)
        out.append(hgrn2_finish(host, o))
    return torch.stack(out)


# ---- 1. the real fla layer as oracle ---------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant,conv,lb', [(v, False, 'model') for v in VARIANTS] +
                         [('default', False, 'none'), ('default', True, 'model'), ('heads4', False, 'token')])
def test_one_memory_wrapper_equals_real_host_layer(variant, conv, lb):
    """M=1 copies, both backends: the real layer (fused_recurrent_gla, swish, rms_norm_linear, its convs), with the
    model's lower bound and left padding in one row, or one lower bound per token (the host broadcasts it against
    its gate; it cannot take that with padding), or none."""
    host = make_hgrn2(**host_options(variant, conv)).eval()
    x = torch.randn(2, 12, HIDDEN)
    mask = None
    if lb != 'token':
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :4] = 0
    kw = {} if lb == 'none' else {'lower_bound': lower_bound(lb, x)}
    with torch.no_grad():
        expect = copy.deepcopy(host)(x, attention_mask=mask, **kw)[0]
        for backend in ('torch', 'triton'):
            mom = MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                                    backend=backend).eval()
            close(mom(x, attention_mask=mask, **kw)[0], expect, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
def test_one_memory_cache_equals_real_host_cache():
    """Prefill + decode through fla's Cache with the model's lower bound: the host's outputs and its recurrent
    state [N, H, V, K]."""
    host = make_hgrn2(**VARIANTS['heads4']).eval()
    x = torch.randn(2, 9, HIDDEN)
    lb = lower_bound('model')
    with torch.no_grad():
        outs = {}
        for name, layer in [('host', host)] + [(b, wrap(copy.deepcopy(host), num_memories=1, topk=1,
                                                         shared_memory=False, backend=b).eval())
                                               for b in ('torch', 'triton')]:
            cache = Cache()
            o = [layer(x[:, :7], past_key_values=cache, use_cache=True, lower_bound=lb)[0],
                 layer(x[:, 7:8], past_key_values=cache, use_cache=True, lower_bound=lb)[0],
                 layer(x[:, 8:], past_key_values=cache, use_cache=True, lower_bound=lb)[0]]
            outs[name] = torch.cat(o, 1), cache[1]['recurrent_state']  # (layer 1)
    want = outs['host'][1]
    assert want.shape == (2, 4, 16, 16)
    for backend in ('torch', 'triton'):
        close(outs[backend][0], outs['host'][0], tol=1e-5)
        assert outs[backend][1].shape == (2, 1, *want.shape[1:])  # [N, E, H, V, K]
        close(outs[backend][1][:, 0], want, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('variant,lb', [('default', 'model'), ('heads4', 'token')])
def test_triton_backend_equals_torch_backend_with_routing_and_gradients(variant, lb):
    """fla's fused_recurrent_gla and swish (which the host also trains with up to 64 tokens) over routed segments
    with padding, forward and backward (the lower bound's gradient too), against the torch backend."""
    mom = mom_hgrn2(variant).train()
    x = torch.randn(2, 8, HIDDEN)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    outs, grads = {}, {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.zero_grad()
        bound = lower_bound(lb, x).requires_grad_()
        outs[backend] = mom(x, attention_mask=mask, lower_bound=bound)[0]
        outs[backend].square().sum().backward()
        grads[backend] = {**{n: p.grad.clone() for n, p in mom.named_parameters()}, 'lower_bound': bound.grad}
    close(outs['triton'], outs['torch'], tol=1e-5)
    assert grads['torch']['lower_bound'].abs().sum() > 0
    for name, g in grads['torch'].items():
        close(grads['triton'][name], g, tol=1e-4)



@needs_kernels
@pytest.mark.interpreter
def test_triton_backend_equals_torch_backend_with_convs_padding_and_cache():
    """Short convs (their cached states too), left padding and a padding token inside a decode step, the per-token
    lower bound of ``example_inputs`` chunk by chunk: the triton backend's outputs and states equal the torch
    backend's, and each equals its own full forward (what tests/test_every_host.py checks on the example host)."""
    mom = mom_hgrn2(conv=True).eval()
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

@pytest.mark.parametrize('variant,conv,shared,lb', [
    ('default', False, False, 'model'), ('default', True, True, 'model'), ('default', False, True, 'none'),
    ('heads4', True, False, 'token'), ('num_heads_layer0', False, True, 'model'),
    ('one_head_no_affine', True, True, 'token'), ('fused_recurrent', False, True, 'model')])
def test_matches_naive_per_memory_loop(variant, conv, shared, lb):
    mom = mom_hgrn2(variant, conv=conv, shared=shared)
    x = torch.randn(2, 15, HIDDEN)
    bound = lower_bound(lb, x)
    kw = {} if bound is None else {'lower_bound': bound}
    close(mom(x, **kw)[0], naive_mom(mom, x, bound))


@pytest.mark.parametrize('variant,conv', [('default', True), ('heads4', False)])
def test_every_parameter_and_the_lower_bound_get_the_naive_loops_gradient(variant, conv):
    mom = mom_hgrn2(variant, conv=conv)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    lb = lower_bound('model').requires_grad_()
    mom(x, lower_bound=lb)[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = mom_hgrn2(variant, conv=conv)
    ref.load_state_dict(mom.state_dict())
    ref_lb = lb.detach().clone().requires_grad_()
    naive_mom(ref, x.detach(), ref_lb).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in mom.named_parameters():
        close(p.grad, ref_grads[name].grad, tol=1e-4)
    close(lb.grad, ref_lb.grad, tol=1e-4)


def test_write_side_moves_out_of_the_host():
    mom = mom_hgrn2(conv=True)
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.f_proj', 'host.i_proj', 'host.f_conv1d', 'host.i_conv1d')) for n in names)
    assert {'host.q_proj.weight', 'host.q_conv1d.weight', 'host.g_norm.weight', 'host.o_proj.weight'} <= names
    assert mom.memories.proj['f'].shape == (5, HIDDEN, HIDDEN) and mom.memories.proj['i'].shape == (5, HIDDEN, HIDDEN)
    assert mom._adapter.state_shape() == (2, 32, 32) and mom._adapter.read_conv_shapes() == {'q': (HIDDEN, 4)}


# ---- whole models: per-layer lower bounds ------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
def test_model_lower_bounds_get_the_host_models_gradient():
    """HGRN2ForCausalLM, M=1 copies in training (fused_recurrent_gla's backward up to 64 tokens): the loss and the
    gradient of the model's lower_bounds (which reach layer 1 through its forward argument) are the host model's."""
    from mom_wrap.convert import convert
    make = hgrn2.HGRN2Adapter.example_models()['default']
    ids = torch.randint(0, 64, (2, 12))
    host_model = make().train()
    got = []
    for converted in (False, True):
        model = copy.deepcopy(host_model)
        if converted:
            convert(model, num_memories=1, topk=1, shared_memory=False, init='copy', balance_loss_weight=0.0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        got.append((loss.detach(), model.model.lower_bounds.grad.clone()))
    close(got[1][0], got[0][0], tol=1e-5)
    assert got[0][1].abs().sum() > 0
    close(got[1][1], got[0][1], tol=1e-4)


@needs_kernels
@pytest.mark.interpreter
def test_model_check_sees_the_norm_eps_and_the_lower_bound(monkeypatch):
    """The parity suite's model check (``example_models``) fails an adapter that took g_norm's eps (the config's
    norm_eps, which fla's layer ignores) or dropped the model's lower bounds: errors of 1e-2 and more, measured."""
    def error(label):
        make = hgrn2.HGRN2Adapter.example_models()[label]
        with torch.no_grad():
            return testing.rel_err(*testing._one_memory_model(make, 'cpu', torch.float32, None,
                                                              torch.Generator().manual_seed(0)))
    assert error('norm_eps=1e-2') <= testing.TOL[torch.float32]
    monkeypatch.setattr(hgrn2, 'HOST_NORM_EPS', 1e-2)
    assert error('norm_eps=1e-2') > 100 * testing.TOL[torch.float32]
    monkeypatch.setattr(hgrn2, 'HOST_NORM_EPS', 1e-5)
    monkeypatch.setattr(hgrn2.HGRN2Adapter, 'host_inputs', lambda self, kwargs, layout: {})
    assert error('default') > 100 * testing.TOL[torch.float32]


# ---- the gate and the kernel choice ----------------------------------------------------------------------

def test_lower_bounded_gate_in_the_log_domain():
    """log(lb + (1 - lb) sigmoid(f)) and k = 1 - its exp, finite where sigmoid(f) underflows in fp32 (f = -200)."""
    f = torch.tensor([-200.0, -3.0, 0.0, 4.0], dtype=torch.float64)
    lb = torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=torch.float64)
    g, k = hgrn2.lower_bounded_gate(f, lb)
    close(g, (lb + (1 - lb) * torch.sigmoid(f)).log(), tol=1e-12)
    close(k, 1 - lb - (1 - lb) * torch.sigmoid(f), tol=1e-12)
    g, k = hgrn2.lower_bounded_gate(f.float(), None)
    assert torch.isfinite(g).all() and g[0] == -200.0 and k[0] == 1.0


@pytest.mark.parametrize('mode,max_len,kernel', [('chunk', 64, 'fused_recurrent_gla'), ('chunk', 65, 'chunk_gla'),
                                                 ('fused_chunk', 65, 'chunk_gla'),
                                                 ('fused_recurrent', 65, 'fused_recurrent_gla')])
def test_triton_backend_kernel_choice(monkeypatch, mode, max_len, kernel):
    """The host's rule on the longest segment (the chunk kernels do not run on the CPU: recorded, not run):
    chunk_gla (mode 'fused_chunk' too: fla's fused_chunk_gla only raises) takes g= and the host-side cu_seqlens,
    fused_recurrent_gla gk=; both varlen, V-first states, k = 1 - exp(g)."""
    import fla.ops.gla as ops
    calls = []

    def fake(name):
        def kernel_fn(q, k, v, **kw):
            calls.append((name, k, kw))
            return torch.zeros_like(v), None
        return kernel_fn

    monkeypatch.setattr(ops, 'chunk_gla', fake('chunk_gla'))
    monkeypatch.setattr(ops, 'fused_recurrent_gla', fake('fused_recurrent_gla'))
    adapter = adapter_for(make_hgrn2(mode=mode))
    N = max_len + 5  # two sequences, of max_len and 5 tokens, one memory: two segments
    sequence = (torch.arange(N) >= max_len).long()
    dispatch = plan_dispatch(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1), sequence, None, 2, 1)
    assert dispatch.max_seqlen == max_len
    read = {'q': torch.randn(N, 2, 32)}
    write = {'f': torch.randn(N, HIDDEN), 'i': torch.randn(N, HIDDEN)}
    adapter.recurrence(read, write, dispatch, 'triton')
    (name, k, kw), = calls
    assert name == kernel and kw['state_v_first'] and kw['cu_seqlens'] is dispatch.cu_seqlens
    g = kw['g'] if kernel == 'chunk_gla' else kw['gk']
    close(g[0].flatten(1), F.logsigmoid(write['f']), tol=1e-6)
    close(k, 1 - g.exp(), tol=1e-6)
    assert (kw.get('cu_seqlens_cpu') is dispatch.cu_seqlens_cpu) if kernel == 'chunk_gla' else 'g' not in kw


# ---- 3. what the adapter refuses --------------------------------------------------------------------------

def test_refused_options_and_modules():
    host = make_hgrn2()
    host.mode = 'parallel'  # (the host asserts its mode at construction only)
    with pytest.raises(ValueError, match='mode'):
        wrap(host)
    host = make_hgrn2()
    host.f_proj = torch.nn.Linear(HIDDEN, 32, bias=False)
    with pytest.raises(ValueError, match='f_proj'):
        wrap(host)


def test_bad_lower_bound_is_refused_naming_it():
    mom = mom_hgrn2()
    x = torch.randn(2, 5, HIDDEN)
    for bad, error in [(torch.rand(32), ValueError), (torch.rand(3, 5, HIDDEN), ValueError),
                       (torch.rand(1, 1, 1, HIDDEN), ValueError), (torch.ones(HIDDEN, dtype=torch.long), TypeError),
                       ([0.5] * HIDDEN, TypeError)]:
        with pytest.raises(error, match='lower_bound'):
            mom(x, lower_bound=bad)
    anonymous = wrap(make_hgrn2(layer_idx=None))
    with pytest.raises(ValueError, match='lower_bound'):
        anonymous(x, lower_bound=lower_bound('model'))
    anonymous(x)  # without a lower bound it runs, as the host does
    layer0 = mom_hgrn2('num_heads_layer0')  # layer 0 ignores it, as the host does
    with torch.no_grad():
        close(layer0(x, lower_bound=lower_bound('model'))[0], layer0(x)[0], tol=0)
