"""MixtureOfMemories(fla's Mamba2): fla's port of the SSD layer as host (``fla.layers.mamba2.Mamba2``), without
mamba-ssm (nothing here needs it).

Oracles: the real fla layer (eval; on the CPU its PyTorch path, its gated RMSNorm through Triton's interpreter, see
conftest) over its options, its full forward and its own decode steps through fla's Cache (with n_groups > 1 only its
decode steps: its PyTorch full forward groups the heads otherwise, README "Known host limits"); and a naive
per-memory loop written here from independent pieces (F.linear, F.conv1d, a per-step recurrence
S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t, the gated RMSNorm written out; nothing of
mom_wrap's dispatch, grouped linear, segment conv, scalar-decay reference or norm). The checks every host passes alike
(cached generation, padding, packing, causality, gradients against finite differences; on the options of
tests/hosts.py's VARIANTS['fla.Mamba2']): tests/test_every_host.py; the model lists: tests/test_models.py,
tests/test_convert.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.layers.mamba2 import Mamba2
from fla.models.utils import Cache

from mom_wrap import MixtureOfMemories, testing
from mom_wrap.testing import routed, routing_rounding
from tests.test_every_host import flat_states, run_chunks
from tests.test_layer import HIDDEN, assert_gradients_of_naive_loop, close

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="fla's gated norm needs TRITON_INTERPRET=1 or CUDA")

# each of the layer's options at least once (8 heads of 16 and state 16 unless named)
OPTIONS = {
    'default': {},
    'D_has_hdim': dict(D_has_hdim=True),
    'no_rmsnorm': dict(rmsnorm=False),
    'norm_before_gate_eps': dict(norm_before_gate=True, norm_eps=1e-2),
    'dt_limit': dict(dt_limit=(0.01, 0.05)),
    'use_bias_no_conv_bias': dict(use_bias=True, use_conv_bias=False),
    'conv2_expand1_heads4': dict(conv_kernel=2, expand=1, num_heads=4),
    'swish_chunk8_state8': dict(hidden_act='swish', chunk_size=8, state_size=8),
}
GROUPS = {  # against the layer's decode steps only
    'n_groups2': dict(n_groups=2),
    'n_groups4_D_has_hdim_no_rmsnorm': dict(n_groups=4, D_has_hdim=True, rmsnorm=False),
    'n_groups2_norm_before_gate': dict(n_groups=2, norm_before_gate=True),
}


def make_host(**kw):
    """fla's Mamba2 (hidden 64, 8 heads of 16, state 16, chunk 16, layer 0) with its constant parameters (D and the
    norm's weight: ones; biases: zeros) redrawn: at a constant, a check could not see them."""
    cfg = dict(hidden_size=HIDDEN, head_dim=16, state_size=16, chunk_size=16, layer_idx=0)
    cfg.update(kw)
    torch.manual_seed(0)
    host = Mamba2(**cfg)
    with torch.no_grad():
        for p in host.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.3 * torch.randn_like(p))
    return host.eval()


def mom_mamba2(num_memories=4, topk=2, shared=True, **kw):
    """The host wrapped with random memories (``mom_wrap.testing.wrap``: a router spread to route, fresh biases
    redrawn), no balancing loss."""
    return testing.wrap(make_host(**kw), num_memories, topk, shared)


def copies(host, backend):
    return MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                             backend=backend).eval()


def host_steps(host, x):
    """x [B, T, hidden] through the real layer's decode path (its per-token code) one token at a time from zero
    states: a prompt of one token makes the cache entry, whose states are then zeroed."""
    cache = Cache()
    host(x[:, :1], past_key_values=cache, use_cache=True)
    entry = cache[host.layer_idx]
    entry['recurrent_state'].zero_()
    entry['conv_state'].zero_()
    return torch.cat([host(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(x.shape[1])], 1)


# ---- 1. the real fla layer as oracle -------------------------------------------------------------------------

@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('option', OPTIONS)
def test_one_memory_equals_real_host(option):
    """M=1 copies, both backends: the layer's full forward, and with left padding in one row (fla's layer zeroes
    the padding's inputs and conv outputs: what the wrapper's layout does)."""
    host = make_host(**OPTIONS[option])
    x = torch.randn(2, 20, HIDDEN)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        want = copy.deepcopy(host)(x)[0]
        want_padded = copy.deepcopy(host)(x, attention_mask=mask)[0]
        for backend in ('torch', 'triton'):
            mom = copies(host, backend)
            close(mom(x)[0], want, tol=1e-5)
            close(mom(x, attention_mask=mask)[0][mask.bool()], want_padded[mask.bool()], tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('option', ['default', 'D_has_hdim', *GROUPS])
def test_one_memory_equals_real_host_decode_steps(option):
    """The layer's own per-token path from zero states, token by token (the oracle of n_groups > 1)."""
    host = make_host(**{**OPTIONS, **GROUPS}[option])
    x = torch.randn(2, 12, HIDDEN)
    with torch.no_grad():
        want = host_steps(copy.deepcopy(host), x)
        if option in OPTIONS:  # the oracle agrees with the layer's full forward where that one is right
            close(want, copy.deepcopy(host)(x)[0], tol=1e-5)
        for backend in ('torch', 'triton'):
            close(copies(host, backend)(x)[0], want, tol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('option', ['default', 'use_bias_no_conv_bias', 'conv2_expand1_heads4'])
def test_generation_through_fla_cache_equals_real_host_generation(option):
    """A prompt then one token per call through fla's Cache (what the layer itself takes): the M=1 wrapper's outputs
    are the layer's, its states in the cache the layer's (recurrent [N, E=1, H, P, N]; the conv states: the layer's
    [N, x | B | C, W] split into the write side's x and B and the read side's C)."""
    host = make_host(**OPTIONS[option])
    x = torch.randn(2, 10, HIDDEN)
    sizes = [7, 1, 1, 1]
    with torch.no_grad():
        layers = {'host': copy.deepcopy(host), 'torch': copies(host, 'torch'), 'triton': copies(host, 'triton')}
        outs = {name: run_chunks(layer, x, sizes) for name, layer in layers.items()}
    want, cache = outs['host']
    d, gn = host.intermediate_size, host.n_groups * host.ssm_state_size
    conv = cache[0]['conv_state']
    for backend in ('torch', 'triton'):
        got, mine = outs[backend]
        close(got, want, tol=1e-5)
        entry = mine[0]
        assert entry['recurrent_state'].shape == (2, 1, 8 if option != 'conv2_expand1_heads4' else 4, 16, 16)
        close(entry['recurrent_state'][:, 0], cache[0]['recurrent_state'], tol=1e-5)
        write, read = entry['conv_state']['write'], entry['conv_state']['read']
        close(write['x'][:, 0], conv[:, :d], tol=0)
        close(write['B'][:, 0], conv[:, d:d + gn], tol=0)
        close(read['C'], conv[:, d + gn:], tol=0)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('option', ['default', 'dt_limit', 'use_bias_no_conv_bias'])
def test_triton_backend_equals_torch_backend_with_routing_padding_cache_and_gradients(option):
    """Our chunk_scalar_decay (and its step kernel on decode) against the torch backend over routed segments: a
    training forward and backward with padding, and a cached sequence (chunks, decode steps, a padding token inside
    one) with its states."""
    mom = mom_mamba2(**OPTIONS[option]).train()
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    outs, grads = {}, {}
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.zero_grad()
        outs[backend] = mom(x, attention_mask=mask)[0]
        outs[backend].square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in mom.named_parameters()}
    close(outs['triton'], outs['torch'], tol=1e-5)
    for name, g in grads['torch'].items():
        assert g.abs().sum() > 0, name
        close(grads['triton'][name], g, tol=1e-4)
    mask[1, 6] = 0
    cached = {}
    mom.eval()
    with torch.no_grad():
        for backend in ('torch', 'triton'):
            mom.backend = backend
            cached[backend] = run_chunks(mom, x, [6, 1, 1, 4], mask)
    close(cached['triton'][0], cached['torch'][0], tol=1e-5)
    for a, b in zip(flat_states(mom, cached['triton'][1]), flat_states(mom, cached['torch'][1])):
        close(a, b, tol=1e-5)
    close(cached['torch'][0][mask.bool()], mom(x, attention_mask=mask)[0][mask.bool()],
          tol=1e-5 + routing_rounding(mom, x))


# ---- 2. routed memories against the naive loop ---------------------------------------------------------------

def _conv_silu(u, weight, bias):
    """Causal depthwise conv over one subsequence u [T, D] (weight [D, W]), then SiLU."""
    W = weight.shape[-1]
    return F.silu(F.conv1d(u.t()[None], weight[:, None], bias, padding=W - 1, groups=u.shape[1])[0, :, :u.shape[0]].t())


def memory_output(host, mom, e, xs, C):
    """Memory e over its token subsequence xs [T, hidden] (C [T, G, N] read once per token): [T, H, P], a plain
    per-step recurrence in fp64."""
    bank, T = mom.memories, xs.shape[0]
    H, P, G, N = host.num_heads, host.head_dim, host.n_groups, host.ssm_state_size
    u = {n: F.linear(xs, bank.proj[n][e], bank.proj_bias[n][e] if n in bank.proj_bias else None)
         for n in ('x', 'B', 'dt')}
    x = _conv_silu(u['x'], bank.conv['x'][e], bank.conv_bias['x'][e] if 'x' in bank.conv_bias else None)
    B = _conv_silu(u['B'], bank.conv['B'][e], bank.conv_bias['B'][e] if 'B' in bank.conv_bias else None)
    dt = F.softplus(u['dt'].double() + host.dt_bias.double()).clamp(*host.dt_limit)
    A = -host.A_log.double().exp()
    x, B, C = x.double().view(T, H, P), B.double().view(T, G, N), C.double().view(T, G, N)
    D = host.D.double().view(H, P) if host.D_has_hdim else host.D.double()[:, None]
    group = torch.arange(H) // (H // G)  # heads 0 .. H/G - 1 read group 0, ...
    S = torch.zeros(H, P, N, dtype=torch.float64)
    out = []
    for t in range(T):
        S = (dt[t] * A).exp()[:, None, None] * S + (dt[t][:, None] * x[t])[:, :, None] * B[t, group][:, None, :]
        out.append(S @ C[t, group][:, :, None] + (D * x[t])[:, :, None])
    return torch.stack(out)[..., 0]


def finish(host, y, z):
    """y, z [T, d_ssm] -> [T, hidden]: the gated RMSNorm (groups of d_ssm / n_groups) or the silu gate, out_proj."""
    y, z = y.double(), z.double()
    if host.rmsnorm:
        n = host.norm
        if not n.norm_before_gate:
            y = y * F.silu(z)
        g = y.view(y.shape[0], host.n_groups, -1)
        y = (g / (g.square().mean(-1, keepdim=True) + n.eps).sqrt()).flatten(1) * n.weight.double()
        if n.norm_before_gate:
            y = y * F.silu(z)
    else:
        y = y * F.silu(z)
    return F.linear(y.to(host.out_proj.weight.dtype), host.out_proj.weight, host.out_proj.bias)


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing written out (``routed``)."""
    host, M = mom.host, mom.num_memories
    d, gn = host.intermediate_size, host.n_groups * host.ssm_state_size
    out = []
    for xb in x:
        T = xb.shape[0]
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        top_p, top_i = routed(probs, mom.topk)
        z, c = F.linear(xb, host.mom_read_proj.weight, host.mom_read_proj.bias).split([d, gn], -1)
        C = _conv_silu(c, host.mom_c_conv.weight[:, 0], host.mom_c_conv.bias)
        o = torch.zeros(T, host.num_heads, host.head_dim, dtype=torch.float64)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel():
                wt = (top_p * (top_i == e)).sum(-1)[sel].double()
                o = o.index_add(0, sel, wt[:, None, None] * memory_output(host, mom, e, xb[sel], C[sel]))
        if mom.shared_memory:
            o = o + memory_output(host, mom, M, xb, C)
        out.append(finish(host, o.flatten(1), z))
    return torch.stack(out)


@pytest.mark.parametrize('option,shared', [
    ('default', True), ('default', False), ('D_has_hdim', True), ('no_rmsnorm', False),
    ('norm_before_gate_eps', True), ('dt_limit', True), ('use_bias_no_conv_bias', True),
    ('conv2_expand1_heads4', False), ('n_groups2', True), ('n_groups4_D_has_hdim_no_rmsnorm', True)])
def test_matches_naive_per_memory_loop(option, shared):
    mom = mom_mamba2(shared=shared, **{**OPTIONS, **GROUPS}[option])
    x = torch.randn(2, 15, HIDDEN)
    with torch.no_grad():
        close(mom(x)[0], naive_mom(mom, x))


@pytest.mark.parametrize('option', ['default', 'n_groups4_D_has_hdim_no_rmsnorm', 'use_bias_no_conv_bias'])
def test_every_parameter_gets_the_naive_loops_gradient(option):
    mom = mom_mamba2(**{**OPTIONS, **GROUPS}[option]).train()
    x = torch.randn(2, 9, HIDDEN)
    assert_gradients_of_naive_loop(mom, lambda m: m(x)[0], lambda m: naive_mom(m, x))


def test_torch_backend_is_exact_in_fp64():
    """fp64 stays fp64 throughout (A, dt, the scan, the gated norm): the naive loop to fp64's precision."""
    mom = mom_mamba2(**GROUPS['n_groups2_norm_before_gate']).double()
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        close(mom(x)[0], naive_mom(mom, x), tol=1e-12)


# ---- 3. the split and the refusals ---------------------------------------------------------------------------

def test_write_side_moves_out_of_the_host():
    mom = mom_mamba2(**OPTIONS['use_bias_no_conv_bias'])
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith(('host.in_proj', 'host.conv1d')) for n in names)
    assert mom.host.mom_read_proj.out_features == 128 + 16 and mom.host.mom_read_proj.bias is not None
    assert set(mom.memories.conv) == {'x', 'B'} and mom.memories.out_features == [128, 16, 8]
    assert set(mom.memories.proj_bias) == {'x', 'B', 'dt'} and not mom.memories.conv_bias
    assert mom._adapter.state_shape() == (8, 16, 16) and mom._adapter.read_conv_shapes() == {'C': (16, 4)}


@needs_kernels
@pytest.mark.interpreter
def test_runs_without_mamba_ssm(monkeypatch):
    """With mamba-ssm unimportable (as where it is not installed; fla's layer imports it where it is): wrapping,
    training forwards and cached decoding on both backends import nothing of it."""
    import sys
    for name in [m for m in sys.modules if m == 'mamba_ssm' or m.startswith('mamba_ssm.')] + ['mamba_ssm']:
        monkeypatch.setitem(sys.modules, name, None)  # (an import of it raises ImportError)
    mom = mom_mamba2()
    x = torch.randn(2, 6, HIDDEN)
    for backend in ('torch', 'triton'):
        mom.backend = backend
        mom.train()(x)[0].sum().backward()
        with torch.no_grad():
            run_chunks(mom.eval(), x, [4, 1, 1])


def test_refused_options_name_themselves():
    host = make_host()
    host.activation = 'gelu'  # as hidden_act='gelu' sets it
    with pytest.raises(ValueError, match='hidden_act'):
        MixtureOfMemories(host, num_memories=2, topk=1)
    host = make_host()
    host.in_proj = torch.nn.Linear(HIDDEN, host.in_proj.out_features + 2 * 32)  # gated-MLP rows, as mamba-ssm's d_mlp
    with pytest.raises(ValueError, match='in_proj'):
        MixtureOfMemories(host, num_memories=2, topk=1)


def test_namesakes_each_take_their_own_host():
    from mom_wrap.adapters import adapter_for
    from mom_wrap.adapters.mamba2 import Mamba2Adapter
    from mom_wrap.adapters.mamba2_fla import FlaMamba2Adapter
    assert type(adapter_for(make_host())) is FlaMamba2Adapter
    with pytest.raises(ValueError, match='does not take a Mamba2 host'):
        adapter_for(make_host(), Mamba2Adapter)
