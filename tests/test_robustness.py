"""Bad input and extreme routing (issue 12, the CPU side): clear errors, nothing lost.

* every bad input is a ValueError / TypeError that names the argument, for fla's convention (the GatedDeltaNet
  example host) and mamba-ssm's (Mamba2) where it applies;
* T = 0 and B = 0 give empty outputs, with and without a cache, on both backends (nothing is launched);
* a NaN / Inf in one sequence reaches no other sequence's output, cached states or input gradient: dense,
  left-padded and packed batches, and through the cache pools in decode; padding content never matters,
  in the backward neither;
* extreme routing (all tokens to one memory, a memory starved for a whole batch, topk = M, M = 16 and 32)
  is finite and equals the naive per-memory loop (``mom_wrap.testing.naive_mom``) in fp32 and fp64;
* determinism: reruns are bit-identical (outputs, gradients, cache pools); routing ties go to the lower
  memory index, every time (``Router.route``);
* property-based (hypothesis): the torch backend equals the naive loop over shapes, M, top-k, masks and
  packing, for every registered host, with no Triton kernel launched (the torch backends are pure PyTorch).
"""
import contextlib
import copy
import os

import pytest
import torch
from fla.layers import DeltaNet, GatedDeltaNet
from fla.models.utils import Cache
from hypothesis import HealthCheck, given, settings, strategies as st

from mom_wrap.testing import TOL, naive_mom, rel_err, routed, wrap
from tests import hosts
from mom_wrap.testing import routing_rounding

needs_mamba = pytest.mark.mamba_ssm  # skipped without mamba-ssm (tests/conftest.py)
interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason='needs TRITON_INTERPRET=1 or CUDA')
HOSTS = ['gdn', pytest.param('mamba2', marks=needs_mamba)]
ARG = {'gdn': 'hidden_states', 'mamba2': 'u'}
CACHE_ARG = {'gdn': 'past_key_values', 'mamba2': 'inference_params'}
H = 64


def make_host(name, hidden=H, **kw):
    """The fla example host (GatedDeltaNet) or mamba-ssm's Mamba2, hidden 64 (or smaller), layer 0."""
    torch.manual_seed(0)
    if name == 'gdn':
        cfg = dict(hidden_size=hidden, head_dim=16, num_heads=2, expand_v=2 if hidden >= 64 else 1, layer_idx=0)
        return GatedDeltaNet(**{**cfg, **kw})
    from mamba_ssm.modules.mamba2 import Mamba2
    cfg = dict(d_model=hidden, d_state=16 if hidden >= 64 else 8, headdim=16, chunk_size=16, layer_idx=0,
               use_mem_eff_path=False)
    host = Mamba2(**{**cfg, **kw})
    with torch.no_grad():  # D and the norm's weight start at ones: make them count
        host.D.add_(0.3 * torch.randn_like(host.D))
        host.norm.weight.add_(0.3 * torch.randn_like(host.norm.weight))
    return host


def layer(name, hidden=H, host_kw=None, dtype=torch.float32, balance=0.0, **kw):
    """A wrapped host (torch backend, memories initialised apart, router spread), M=4 top-2 + shared unless
    told; fixed seed."""
    mom = wrap(make_host(name, hidden, **(host_kw or {})), backend='torch', **kw).to(dtype)
    mom.balance_loss_weight = balance
    return mom


def out(mom, x, **kw):
    """The output tensor of either convention."""
    return mom._adapter.convention.outputs(mom(x, **kw))[0]


def feed(mom, x, sizes, mask=None, cache=None):
    """x through one cache of the layer's family in chunks of ``sizes`` -> (outputs, cache)."""
    conv = mom._adapter.convention
    cache = conv.new_cache(x.shape[0], x.shape[1]) if cache is None else cache
    outs, start = [], 0
    for n in sizes:
        kw = {} if mask is None else {'attention_mask': mask[:, :start + n]}
        outs.append(conv.call_cached(mom, x[:, start:start + n], cache, **kw))
        start += n
    return torch.cat(outs, 1), cache


def pools(cache, layer_idx=0):
    """Every state pool of a layer in either cache, by name."""
    if isinstance(cache, Cache):
        e = cache[layer_idx]
        state = {'recurrent': e['recurrent_state'], 'read_conv': e['conv_state']['read'],
                 'write_conv': e['conv_state']['write']}
    else:
        state = cache.key_value_memory_dict[layer_idx]
    return {'recurrent': state['recurrent'], **{f'read.{n}': t for n, t in state['read_conv'].items()},
            **{f'write.{n}': t for n, t in state['write_conv'].items()}}


def snapshot(cache):
    return {n: t.clone() for n, t in pools(cache).items()}


def assert_close(got, want, tol=1e-5):
    err = rel_err(got, want)
    assert err <= tol, f"max rel err {err:.3e} > {tol:.1e}"


def positive(*shape, dtype=torch.float32):
    """Inputs with a positive sum along every row, so that a router row of ones ranks first."""
    return (torch.randn(*shape).abs() + 0.1).to(dtype)


@contextlib.contextmanager
def no_triton_launch():
    """Any Triton kernel launch (interpreted or compiled) fails inside: the torch backend must need none."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    def refuse(*args, **kwargs):
        raise AssertionError('a Triton kernel was launched on the torch backend')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interp.GridExecutor, '__call__', refuse)
        mp.setattr(jit.JITFunction, 'run', refuse)
        yield


# ================================================================================================ 1. bad input

@pytest.mark.parametrize('name', HOSTS)
def test_wrong_hidden_size_and_rank_name_the_input(name):
    mom = layer(name)
    for bad in (torch.randn(2, 5, H + 1), torch.randn(2, 5, H - 1), torch.randn(5, H), torch.randn(1, 2, 5, H)):
        with pytest.raises(ValueError, match=f'^{ARG[name]}: expected shape'):
            mom(bad)
    with pytest.raises(TypeError, match=f'^{ARG[name]}'):
        mom(torch.randn(2, 5, H).tolist())


@pytest.mark.parametrize('name', HOSTS)
def test_dtype_unlike_the_weights_is_a_type_error(name):
    mom = layer(name)
    x = torch.randn(2, 5, H)
    for bad in (x.double(), x.bfloat16(), x.half()):
        with pytest.raises(TypeError, match=f'^{ARG[name]}: dtype {bad.dtype} differs from the layer'):
            mom(bad)
    with pytest.raises(TypeError, match=f'^{ARG[name]}: expected a floating-point tensor'):
        mom(x.long())
    with pytest.raises(TypeError, match=f'^{ARG[name]}: dtype'):
        layer(name, dtype=torch.float64)(x)
    # under autocast the input's dtype may differ from the weights' (autocast casts both)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = out(mom, x.bfloat16())
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_attention_mask_of_wrong_type_rank_shape_or_values():
    mom = layer('gdn')
    x = torch.randn(2, 5, H)
    for bad in (torch.ones(5), torch.ones(2, 5, 1), torch.ones(1, 2, 5), torch.ones(3, 5), torch.ones(2, 4),
                torch.ones(1, 5)):
        with pytest.raises(ValueError, match=r'^attention_mask: expected a 0/1 padding mask of shape \[2, >=5\]'):
            mom(x, attention_mask=bad)
    for bad in (torch.full((2, 5), 2), torch.full((2, 5), 0.5), torch.tensor([[1, 1, 1, 1, -1]] * 2)):
        with pytest.raises(ValueError, match='^attention_mask: expected a 0/1 padding mask'):
            mom(x, attention_mask=bad)
    with pytest.raises(TypeError, match='^attention_mask: expected a torch.Tensor'):
        mom(x, attention_mask=[[1] * 5] * 2)
    with pytest.raises(ValueError, match='attention_mask and cu_seqlens'):
        mom(x[:1], attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5]))
    # bool, int and float 0/1 masks are one and the same
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = out(mom, x, attention_mask=mask)
    for m in (mask.bool(), mask.float(), mask.double()):
        assert torch.equal(out(mom, x, attention_mask=m), want)


@needs_mamba
def test_mamba_convention_takes_no_attention_mask_and_checks_its_own_arguments():
    mom = layer('mamba2')
    x = torch.randn(2, 6, H)
    with pytest.raises(TypeError, match='attention_mask'):
        mom(x, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match='^seqlen: must be >= 1'):
        mom(x.reshape(12, H), seqlen=0)
    with pytest.raises(TypeError, match='^seqlen: expected an int'):
        mom(x.reshape(12, H), seqlen=6.0)
    with pytest.raises(TypeError, match='^seq_idx: expected an integer tensor'):
        mom(x, seq_idx=torch.zeros(2, 6))
    with pytest.raises(ValueError, match='^seq_idx: expected shape'):
        mom(x, seq_idx=torch.zeros(2, 5, dtype=torch.int32))


@pytest.mark.parametrize('name', HOSTS)
def test_malformed_cu_seqlens(name):
    mom = layer(name)
    x = torch.randn(1, 7, H)
    for bad in ([0, 4, 3, 7], [1, 4, 7], [0, 4, 6], [0, 4, 8], [-1, 7]):
        with pytest.raises(ValueError, match='^cu_seqlens: expected non-decreasing offsets from 0 to seq_len=7'):
            mom(x, cu_seqlens=torch.tensor(bad))
    for bad in (torch.tensor([[0, 7]]), torch.tensor([0]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match=r'^cu_seqlens: expected shape \[N\+1\]'):
            mom(x, cu_seqlens=bad)
    for bad in (torch.tensor([0.0, 7.0]), torch.tensor([False, True])):
        with pytest.raises(TypeError, match='^cu_seqlens: expected an integer tensor'):
            mom(x, cu_seqlens=bad)
    with pytest.raises(TypeError, match='^cu_seqlens: expected a torch.Tensor'):
        mom(x, cu_seqlens=[0, 7])
    with pytest.raises(ValueError, match='^cu_seqlens: packed input needs batch size 1'):
        mom(torch.randn(2, 7, H), cu_seqlens=torch.tensor([0, 7]))
    # int32 offsets and an empty sequence are well-formed: each sequence as its own run
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    y = out(mom, x, cu_seqlens=cu)
    assert_close(y[:, :3], out(mom, x[:, :3]))
    assert_close(y[:, 3:], out(mom, x[:, 3:]))


def host_style_entry(batch):
    """What the unwrapped GatedDeltaNet stores in fla's Cache: a [B, HV, V, K] state and a tuple of conv states."""
    return dict(recurrent_state=torch.zeros(batch, 2, 32, 16),
                conv_state=(torch.zeros(batch, 32, 4), torch.zeros(batch, 32, 4), torch.zeros(batch, 64, 4)))


def test_fla_cache_of_another_layer_configuration_memories_or_batch_size():
    x = torch.randn(2, 5, H)
    mom = layer('gdn').eval()
    with torch.no_grad():
        _, cache = feed(mom, x, [4])
    before = snapshot(cache)
    others = {
        'batch size': (mom, torch.randn(3, 1, H), 'hold 2 sequences, this input has 3'),
        'fewer memories': (layer('gdn', num_memories=3), x[:, 4:], 'num_memories=4, shared_memory=True; this'),
        # M + 1 routed memories without the shared one: pools of the same shape, other memories
        'no shared memory': (layer('gdn', num_memories=5, shared=False), x[:, 4:], 'shared_memory=True; this'),
        'grouped value heads': (layer('gdn', host_kw=dict(num_v_heads=4)), x[:, 4:], 'recurrent has shape'),
        'no short convs': (layer('gdn', host_kw=dict(use_short_conv=False)), x[:, 4:], 'have the pools'),
        'conv width': (layer('gdn', host_kw=dict(conv_size=3)), x[:, 4:], r'read_conv.q has shape \(2, 32, 4\)'),
        'another host': (wrap(DeltaNet(hidden_size=H, num_heads=2, layer_idx=0), backend='torch'), x[:, 4:],
                         'host adapter GatedDeltaNetAdapter'),
    }
    for what, (other, xi, match) in others.items():
        for use_cache in (True, False):
            with pytest.raises(ValueError, match=f'^past_key_values: the states stored for layer 0.*{match}'):
                other(xi, past_key_values=cache, use_cache=use_cache)
    assert all(torch.equal(t, before[n]) for n, t in pools(cache).items()), 'a refused call changed the cache'
    # the unwrapped host's own entry at this layer_idx
    host_cache = Cache()
    host_cache.update(**host_style_entry(2), layer_idx=0, offset=4)
    with pytest.raises(ValueError, match='^past_key_values: .* not made by a MixtureOfMemories layer'):
        mom(x[:, 4:], past_key_values=host_cache, use_cache=True)
    for bad in ({}, [], object()):
        with pytest.raises(TypeError, match="^past_key_values: expected fla's Cache"):
            mom(x, past_key_values=bad, use_cache=True)


@needs_mamba
def test_inference_params_of_another_layer_configuration_memories_or_batch_size():
    from mamba_ssm.utils.generation import InferenceParams
    x = torch.randn(2, 5, H)
    mom = layer('mamba2').eval()
    with torch.no_grad():
        _, params = feed(mom, x, [4])
    before = snapshot(params)
    others = {
        'batch size': (mom, torch.randn(3, 1, H), 'hold 2 sequences, this input has 3'),
        'fewer memories': (layer('mamba2', num_memories=3), x[:, 4:], 'num_memories=4'),
        'no shared memory': (layer('mamba2', num_memories=5, shared=False), x[:, 4:], 'shared_memory=True; this'),
        'd_state': (layer('mamba2', host_kw=dict(d_state=8)), x[:, 4:], 'recurrent has shape'),
        'conv width': (layer('mamba2', host_kw=dict(d_conv=3)), x[:, 4:], 'has shape'),
    }
    for what, (other, xi, match) in others.items():
        with pytest.raises(ValueError, match=f'^inference_params: the states stored for layer 0.*{match}'):
            other(xi, inference_params=params)
    assert all(torch.equal(t, before[n]) for n, t in pools(params).items()), 'a refused call changed the cache'
    # the unwrapped Mamba2's own (conv_state, ssm_state) at this layer_idx, at a new prompt and in decode
    for offset in (0, 4):
        host_params = InferenceParams(max_seqlen=8, max_batch_size=2, seqlen_offset=offset)
        host_params.key_value_memory_dict[0] = (torch.zeros(2, 160, 4), torch.zeros(2, 8, 16, 16))
        with pytest.raises(ValueError, match='^inference_params: .* not made by a MixtureOfMemories layer'):
            mom(x[:, :1], inference_params=host_params)
    for bad in ({}, object()):
        with pytest.raises(TypeError, match="^inference_params: expected mamba-ssm's InferenceParams"):
            mom(x, inference_params=bad)


def test_fla_decode_on_a_cache_without_states_it_needs():
    mom = layer('gdn').eval()
    x = torch.randn(2, 6, H)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        # a cache that counted 5 tokens (use_cache=False stores no state), then a decode step from it
        cache = Cache()
        mom(x[:, :5], past_key_values=cache, use_cache=False)
        with pytest.raises(ValueError, match='^past_key_values: it has seen 5 tokens at layer 0 but holds no state'):
            mom(x[:, 5:], past_key_values=cache, use_cache=True)
        # a fresh cache, with the mask of 5 earlier tokens: their states are nowhere
        for use_cache in (True, False):
            with pytest.raises(ValueError, match='^attention_mask: covers 5 earlier tokens, but past_key_values'):
                mom(x[:, 5:], attention_mask=mask, past_key_values=Cache(), use_cache=use_cache)
        # earlier columns that are all padding need nothing; without a cache a wider mask is as documented
        pad = mask.clone()
        pad[:, :5] = 0
        want = out(mom, x[:, 5:])
        assert_close(out(mom, x[:, 5:], attention_mask=pad, past_key_values=Cache(), use_cache=True), want)
        assert_close(out(mom, x[:, 5:], attention_mask=mask), want)


@needs_mamba
def test_mamba_decode_without_stored_states_is_refused():
    from mamba_ssm.utils.generation import InferenceParams
    mom = layer('mamba2').eval()
    params = InferenceParams(max_seqlen=8, max_batch_size=2, seqlen_offset=5)
    with pytest.raises(ValueError, match='^inference_params: seqlen_offset=5 continues from stored states, but '
                                         'none are stored for layer 0'):
        mom(torch.randn(2, 1, H), inference_params=params)
    assert not params.key_value_memory_dict
    # allocated up front (mamba-ssm's CUDA-graph decoding), it runs
    params.key_value_memory_dict[0] = mom.allocate_inference_cache(2, 8)
    with torch.no_grad():
        assert out(mom, torch.randn(2, 1, H), inference_params=params).shape == (2, 1, H)


@pytest.mark.parametrize('name', HOSTS)
def test_triton_backend_with_cpu_input_needs_the_interpreter(name, monkeypatch):
    mom = layer(name)
    mom.backend = 'triton'
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match="^backend: 'triton' runs the host's Triton kernels and needs CUDA"):
        mom(torch.randn(2, 5, H))
    mom.backend = 'auto'  # the torch path on the CPU
    assert out(mom, torch.randn(2, 5, H)).shape == (2, 5, H)


@pytest.mark.parametrize('name', HOSTS)
def test_non_contiguous_and_strided_inputs_equal_contiguous_ones(name):
    mom = layer(name, balance=0.01)
    x = torch.randn(2, 9, H)
    views = {'transposed': x.transpose(0, 1).contiguous().transpose(0, 1),
             'strided time': torch.stack([x, x], 2).flatten(1, 2)[:, ::2],
             'sliced hidden': torch.cat([x, torch.randn(2, 9, 5)], -1)[..., :H],
             'expanded batch': x[:1].expand(2, -1, -1)}

    def fwd_bwd(inp, **kw):
        xi = inp.detach().requires_grad_()  # a leaf with the view's strides
        mom.zero_grad()
        y = out(mom, xi, **kw)
        y.backward(torch.ones_like(y))
        return y.detach(), xi.grad, [p.grad.clone() for p in mom.parameters()]

    for what, v in views.items():
        assert not v.is_contiguous(), what
        got, want = fwd_bwd(v), fwd_bwd(v.contiguous())
        for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
            assert_close(a, b, 1e-6)
    # packed input, a strided cu_seqlens and (fla) a strided mask
    cu_wide = torch.tensor([0, 0, 4, 4, 9, 9])
    assert not cu_wide[::2].is_contiguous()
    assert_close(out(mom, views['strided time'][:1], cu_seqlens=cu_wide[::2]),
                 out(mom, x[:1], cu_seqlens=torch.tensor([0, 4, 9])), 1e-6)
    if name == 'gdn':
        mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
        strided = torch.stack([mask, mask], -1)[..., 0]
        assert not strided.is_contiguous()
        assert_close(out(mom, views['transposed'], attention_mask=strided), out(mom, x, attention_mask=mask), 1e-6)
    # cached decode of strided tokens (a slice of a longer buffer)
    mom.eval()
    with torch.no_grad():
        want, _ = feed(mom, x, [6, 1, 1, 1])
        got, _ = feed(mom, views['strided time'], [6, 1, 1, 1])
    assert_close(got, want, 1e-6)


# ============================================================================================ 2. empty input

@pytest.mark.parametrize('backend', ['torch', pytest.param('triton', marks=interpreter)])
@pytest.mark.parametrize('name', HOSTS)
def test_empty_batch_or_sequence_gives_empty_outputs(name, backend):
    mom = layer(name, balance=0.01)
    mom.backend = backend
    conv = mom._adapter.convention
    for B, T in ((2, 0), (0, 5), (0, 0)):
        x = torch.randn(B, T, H, requires_grad=True)
        y = out(mom, x)
        assert y.shape == (B, T, H)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in mom.parameters())
        mom.zero_grad()
        with torch.no_grad():  # a fresh cache
            assert conv.call_cached(mom, x.detach(), conv.new_cache(max(B, 1), 8)).shape == (B, T, H)
    if name == 'gdn':
        assert out(mom, torch.randn(2, 0, H), attention_mask=torch.ones(2, 0)).shape == (2, 0, H)
        assert out(mom, torch.randn(2, 0, H), attention_mask=torch.ones(2, 3)).shape == (2, 0, H)
    assert out(mom, torch.randn(1, 0, H), cu_seqlens=torch.tensor([0, 0])).shape == (1, 0, H)
    if backend != 'torch':  # (the rest runs kernels: under the interpreter, seconds)
        return
    # an empty chunk between cached chunks changes nothing
    mom.eval()
    x = torch.randn(2, 6, H)
    with torch.no_grad():
        want, _ = feed(mom, x, [4, 2])
        got, cache = feed(mom, x, [4, 0, 2])
    assert_close(got, want, 1e-6)
    if name == 'gdn':
        assert cache.get_seq_length(0) == 6


# ========================================================================================= 3. NaN isolation

def sequences(layout, lengths):
    """(x_shape, forward kwargs, [(row, start, end) of each sequence]) for a layout of ``lengths``."""
    T = max(lengths)
    if layout == 'dense':
        return (len(lengths), T), {}, [(b, 0, T) for b in range(len(lengths))]
    if layout == 'padded':
        mask = torch.zeros(len(lengths), T, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, T - n:] = 1
        return (len(lengths), T), {'attention_mask': mask}, [(b, T - n, T) for b, n in enumerate(lengths)]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return (1, int(cu[-1])), {'cu_seqlens': cu}, [(0, int(s), int(e)) for s, e in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize('bad', [float('nan'), float('inf')], ids=['nan', 'inf'])
@pytest.mark.parametrize('name,layout', [('gdn', 'dense'), ('gdn', 'padded'), ('gdn', 'packed'),
                                         pytest.param('mamba2', 'dense', marks=needs_mamba),
                                         pytest.param('mamba2', 'packed', marks=needs_mamba)])
def test_a_bad_value_stays_in_its_sequence(name, layout, bad):
    """Sequence i gets a NaN / Inf (the first or the last of the batch: the last one's slots end the sorted
    order, which padding tokens' clamped gathers read): every other sequence's output equals the clean run's
    and its input gradient is finite (and zero on padding), with the balancing loss on."""
    mom = layer(name, balance=0.01)
    shape, kw, seqs = sequences(layout, [7, 5, 6] if layout != 'dense' else [6, 6, 6])
    x = torch.randn(*shape, H)
    clean = out(mom, x, **kw).detach()
    for i, (row, start, end) in list(enumerate(seqs))[::2]:  # the first and the last
        xb = x.clone()
        xb[row, start + 2] = bad
        xb.requires_grad_()
        y = out(mom, xb, **kw)
        y.backward(torch.randn_like(y))
        assert not torch.isfinite(y[row, start + 2:end]).all()
        for j, (r, s, e) in enumerate(seqs):
            if j != i:
                assert_close(y[r, s:e], clean[r, s:e], 1e-6)
                assert torch.isfinite(xb.grad[r, s:e]).all(), (i, j)
        if layout == 'padded':  # padding: zero output, zero gradient
            valid = kw['attention_mask'].bool()
            assert not y[~valid].any() and not xb.grad[~valid].any()


def test_a_bad_value_stays_out_of_other_sequences_extra_outputs():
    """RWKV7's layer 0 returns v_first, each token's routing-weighted mix of its memories' v: a padding token has
    no slots, and its gathers used to read the last sorted slot with weight 0 (NaN x 0: NaN there when the last
    sequence holds a NaN)."""
    from fla.layers import RWKV7Attention
    torch.manual_seed(0)
    host = RWKV7Attention(hidden_size=H, head_dim=32, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8,
                          v_low_rank_dim=8, layer_idx=0, num_hidden_layers=2)
    mom = wrap(host, backend='torch')
    shape, kw, seqs = sequences('padded', [7, 5, 6])
    x = torch.randn(*shape, H)
    with torch.no_grad():
        clean = mom(x, **kw)[3]
        x[2, -1] = float('nan')
        v_first = mom(x, **kw)[3]
    assert not torch.isfinite(v_first[2, -1]).all()
    assert torch.isfinite(v_first[:2]).all() and not v_first[1, :2].any()  # sequence 1's padding: zeros
    assert_close(v_first[:2], clean[:2], 1e-6)


def test_padding_content_never_matters_not_even_in_the_backward():
    """NaN / Inf in padding positions: the same output, input gradient and every parameter's gradient as zeros
    there (the read side's norms and gates used to turn a padding token's zero output gradient into NaN
    parameter gradients)."""
    mom = layer('gdn', balance=0.01)
    shape, kw, _ = sequences('padded', [7, 4, 6])
    valid = kw['attention_mask'].bool()
    x = torch.randn(*shape, H)
    dy = torch.randn(*shape, H)
    runs = []
    for fill in (0.0, float('nan'), float('inf'), -float('inf')):
        xi = torch.where(valid[..., None], x, fill).requires_grad_()
        mom.zero_grad()
        y = out(mom, xi, **kw)
        y.backward(dy)
        runs.append([y.detach(), xi.grad, *[p.grad.clone() for p in mom.parameters()]])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize('name', HOSTS)
@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'autograd'])
def test_a_bad_value_in_decode_stays_in_its_sequences_states(name, grad):
    """Prefill, then a decode step or a 3-token chunk in which sequence 0's last token is NaN (fla: sequence 1's
    tokens there are padding, the last one with NaN content): the other sequences' outputs and cache pools equal
    the clean run's bit for bit; sequence 0's recurrent state is the one that turns non-finite."""
    mom = layer(name).eval()
    conv = mom._adapter.convention
    fla = name == 'gdn'
    x = torch.randn(3, 9, H)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for n in (1, 3):
        runs = {}
        for what in ('clean', 'bad'):
            xi = x[:, :6 + n].clone()
            if what == 'bad':
                xi[0, -1] = float('nan')
                if fla:
                    xi[1, -1] = float('nan')
            kw = (lambda t: {'attention_mask': mask[:, :t]}) if fla else (lambda t: {})
            cache = conv.new_cache(3, 9)
            with torch.no_grad():
                conv.call_cached(mom, xi[:, :6], cache, **kw(6))
            with torch.set_grad_enabled(grad):
                y = conv.call_cached(mom, xi[:, 6:].requires_grad_(grad), cache, **kw(6 + n))
            runs[what] = (y.detach(), {k: t.detach() for k, t in pools(cache).items()})
        (y_c, p_c), (y_b, p_b) = runs['clean'], runs['bad']
        assert not torch.isfinite(y_b[0]).all()
        # a decode step's plan is per slot, no sort: bit for bit; a chunk's segments are sorted by memory, and
        # sequence 0's routing changes the grouped GEMM's blocks: the last bits may move
        same = torch.equal if n == 1 else (lambda a, b: rel_err(a, b) <= 1e-6)
        for b in (1, 2):
            assert same(y_b[b], y_c[b]), (n, b)
            for k in p_c:
                assert same(p_b[k][b], p_c[k][b]), (n, b, k)
        assert not torch.isfinite(p_b['recurrent'][0]).all()


# ========================================================================================= 4. extreme routing

def against_naive(mom, x, dtype, host_kwargs=None):
    with torch.no_grad():
        y = out(mom, x)
        want = naive_mom(mom, x, host_kwargs)
    assert torch.isfinite(y).all()
    err = rel_err(y, want)
    assert err <= TOL[dtype], f"{err:.3e}"
    return y


@pytest.mark.parametrize('topk,dtype', [(1, torch.float32), (2, torch.float64)], ids=['top1-fp32', 'top2-fp64'])
@pytest.mark.parametrize('name', HOSTS)
def test_every_token_to_one_memory(name, topk, dtype):
    mom = layer(name, dtype=dtype, num_memories=4, topk=topk)
    with torch.no_grad():
        mom.router.weight.mul_(0.01)
        mom.router.weight[2] = 10.0  # x . w2 dominates for inputs with a positive sum
    x = positive(2, 12, H, dtype=dtype)
    y = against_naive(mom, x, dtype)
    assert torch.all(mom.router_logits.argmax(-1) == 2)
    # one segment per sequence carries every token: the cached chunks still equal the full forward
    with torch.no_grad():
        got, _ = feed(mom.eval(), x, [5, 1, 6])
    assert rel_err(got, y) <= TOL[dtype]


@pytest.mark.parametrize('name', HOSTS)
def test_a_memory_starved_for_the_whole_batch(name):
    """Memory 3 of 4 never chosen (top-2): outputs equal the naive loop, its parameters get exact zero
    gradients, and its cached states stay zero through prefill and decode."""
    mom = layer(name, num_memories=4, topk=2)
    with torch.no_grad():
        mom.router.weight[3] = -10.0
    x = positive(3, 10, H)
    against_naive(mom, x, torch.float32)
    assert not (mom.router_logits.topk(2, -1).indices == 3).any()
    out(mom, x).square().mean().backward()
    grads = mom.memories.split(mom.memories.weight.grad)
    assert all(not g[3].any() and g[:3].any() for g in grads.values())
    with torch.no_grad():
        _, cache = feed(mom.eval(), x, [7, 1, 2])
    for n, t in pools(cache).items():
        if n.startswith(('recurrent', 'write')):
            assert not t[:, 3].any() and t[:, :3].any(), n


@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('name', HOSTS)
def test_topk_equal_to_num_memories(name, shared):
    mom = layer(name, num_memories=3, topk=3, shared=shared)
    against_naive(mom, torch.randn(2, 11, H), torch.float32)


@pytest.mark.parametrize('M,topk,dtype', [(16, 2, torch.float32), (32, 3, torch.float64)],
                         ids=['M16-top2-fp32', 'M32-top3-fp64'])
@pytest.mark.parametrize('name', HOSTS)
def test_many_memories(name, M, topk, dtype):
    """M = 16 and 32 at hidden 32: most memories get a token or two, some none. fp64: one sequence of the 24
    tokens, so that the naive loop's fp32 routing runs on the layer's row count (another rounds the weights
    ~1e-7 apart, and fp64 is compared to 1e-9)."""
    mom = layer(name, hidden=32, dtype=dtype, num_memories=M, topk=topk)
    shape = (1, 24) if dtype == torch.float64 else (2, 12)
    x = torch.randn(*shape, 32, dtype=dtype, requires_grad=True)
    against_naive(mom, x.detach(), dtype)
    out(mom, x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in mom.parameters())


# ============================================================================================ 5. determinism

@pytest.mark.parametrize('layout', ['dense', 'padded', 'packed'])
@pytest.mark.parametrize('name', HOSTS)
def test_reruns_are_bit_identical(name, layout):
    if name == 'mamba2' and layout == 'padded':
        pytest.skip("mamba-ssm's layers take no padding mask")
    shape, kw, _ = sequences(layout, [9, 5, 7])
    x = torch.randn(*shape, H)
    dy = torch.randn(*shape, H)
    results = []
    for _ in range(2):
        mom = layer(name, balance=0.01)
        xi = x.clone().requires_grad_()
        y = out(mom, xi, **kw)
        y.backward(dy)
        with torch.no_grad():
            dec, cache = feed(mom.eval(), x[:1, :9], [6, 1, 1, 1])
        results.append([y.detach(), xi.grad, *[p.grad for p in mom.parameters()], dec,
                        *pools(cache).values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_routing_ties_go_to_the_lower_memory_index_every_time():
    router = layer('gdn', num_memories=8, topk=3).router
    with torch.no_grad():
        router.weight.zero_()  # every memory ties: memories 0, 1, 2
        for n in (1, 7, 1000):
            _, probs, weights, indices = router.route(torch.randn(n, H))
            assert torch.equal(indices, torch.arange(3).expand(n, 3))
            assert torch.equal(weights, torch.full((n, 3), 1 / 3))
        # few distinct logit levels: ties of every kind, against the rule written out per token
        router.weight.copy_(torch.randint(0, 3, (8, H)).float())
        x = torch.eye(H)[torch.randint(0, H, (500,))]
        first = router.route(x)
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(router.route(x), first))
        probs, indices = first[1], first[3]
        for p, idx in zip(probs.tolist(), indices.tolist()):
            assert idx == sorted(range(8), key=lambda e: (-p[e], e))[:3]
        assert torch.equal(routed(probs, 3)[1], indices)


@pytest.mark.parametrize('name', HOSTS)
def test_a_zero_router_routes_by_the_tie_rule_and_equals_the_naive_loop(name):
    mom = layer(name, num_memories=5, topk=2)
    with torch.no_grad():
        mom.router.weight.zero_()
    x = torch.randn(2, 8, H)
    against_naive(mom, x, torch.float32)
    assert torch.equal(mom._routing[1], torch.tensor([0, 1]).expand(16, 2))


# ========================================================================== 6. property-based, every host

def registered_hosts():
    return hosts.adapter_params()


def test_a_layer_without_adapter_gets_what_is_supported_and_not_a_hint_to_install_a_namesake():
    """A layer of another package (here the test's own) named like a supported host is not that host: the error says
    so, and what is supported."""
    from mom_wrap import MixtureOfMemories

    class GatedDeltaNet(torch.nn.Module):
        hidden_size = 64

    with pytest.raises(ValueError) as e:
        MixtureOfMemories(GatedDeltaNet(), 2, 1)
    message = str(e.value)
    name = f'{GatedDeltaNet.__module__}.{GatedDeltaNet.__qualname__}'
    assert message.startswith(f"host: no adapter for {name} (mom_wrap's GatedDeltaNet adapter takes "
                              'fla.layers.gated_deltanet.GatedDeltaNet, a different class: installing its package '
                              'does not make this one supported); supported here: ')
    assert 'fla.layers.mamba2.Mamba2' in message
    assert message.endswith('any other layer needs an adapter of its own (docs/adapters.md)')


@pytest.mark.parametrize('adapter', registered_hosts())
def test_a_wrapped_host_refuses_a_second_wrap_and_a_direct_call(adapter):
    """Wrapping takes the host over (its write-side modules move into the wrapper): wrapping it again, or calling it,
    says so, for every host alike (it was a raw AttributeError deep inside, or a misleading message)."""
    from mom_wrap import MixtureOfMemories
    host = adapter.example_host().eval()
    mom = MixtureOfMemories(host, num_memories=2, topk=1, backend='torch').eval()
    with pytest.raises(ValueError, match=r'host: this layer was already wrapped by mom_wrap \(its write side moved '
                                         r'into a MixtureOfMemories\)'):
        MixtureOfMemories(host, num_memories=2, topk=1)
    with pytest.raises(ValueError, match='host: this layer was already wrapped'):
        MixtureOfMemories(copy.deepcopy(mom).host, num_memories=2, topk=1)
    x = torch.randn(1, 3, mom.hidden_size)
    with pytest.raises(RuntimeError, match=f'this {type(host).__name__} layer was wrapped by mom_wrap .*: call the '
                                           'MixtureOfMemories instead'):
        host(x, **adapter.example_inputs(x))
    with torch.no_grad():
        mom(x, **adapter.example_inputs(x))  # the wrapper runs


@pytest.mark.parametrize('adapter', registered_hosts())
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_property_torch_backend_equals_naive_loop(adapter, data):
    """Any M, top-k, shared memory, router spread, and dense / left-padded / packed batches of any lengths:
    the torch backend equals the naive per-memory loop sequence by sequence, without launching Triton."""
    M = data.draw(st.integers(1, 6), label='M')
    k = data.draw(st.integers(1, M), label='topk')
    shared = data.draw(st.booleans(), label='shared')
    std = data.draw(st.sampled_from([0.0, 0.05, 1.0, 5.0]), label='router std')
    convention = adapter.convention
    layouts = ['dense', 'packed'] + (['padded'] if convention.padding_mask else [])
    layout = data.draw(st.sampled_from(layouts), label='layout')
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), label='lengths')
    if layout == 'dense':
        lengths = [lengths[0]] * len(lengths)
    torch.manual_seed(0)
    host = adapter.example_host()
    mom = wrap(host, num_memories=M, topk=k, shared=shared, backend='torch', seed=1)
    torch.nn.init.normal_(mom.router.weight, std=std)
    hidden = mom.hidden_size
    shape, kw, seqs = sequences(layout, lengths)
    if layout == 'packed':
        kw = convention.packed_kwargs(kw['cu_seqlens'])
    x = torch.randn(*shape, hidden)
    with torch.no_grad(), no_triton_launch():
        y = convention.outputs(mom(x, **kw, **adapter.example_inputs(x)))[0]
        for row, start, end in seqs:
            xs = x[row:row + 1, start:end]
            want = naive_mom(mom, xs, adapter.example_inputs(xs))[0]
            err = rel_err(y[row, start:end], want)
            # fp32, and the naive loop routes the sequence's rows alone: fp32 weights rounded for another row
            # count (tests/routing_rounding.py: up to 2.4e-5 at router std 5)
            assert err <= 1e-5 + routing_rounding(mom, xs), (layout, lengths, err)
        if layout == 'padded':
            assert not y[~kw['attention_mask'].bool()].any()
