"""MixtureOfMemories(RWKV7Attention): what the public parity suite (tests/test_parity.py, on the example host:
layer 1 of 2) does not cover.

* the torch backend's recurrence against fla's own naive DPLR recurrence and its recurrent kernel;
* layer 0 and v_first: the output it returns (M=1: the real host's; routed: the routing-weighted mean of the
  memories' v, computed here by hand from F.linear), the gradient it carries into layer 0, argument errors;
* ``fuse_norm=True`` (fla's GroupNorm and l2_norm, the fla models' default) against the real host;
* the kernel each path runs on the triton backend;
* a 2-layer RWKV7ForCausalLM end to end: tests/test_models.py.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

from mom_wrap import MixtureOfMemories
from mom_wrap.adapters.rwkv7 import DECAY_SCALE, RWKV7Adapter, rwkv7_reference
from mom_wrap.testing import routed, wrap
from tests.test_layer import close

interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason='needs TRITON_INTERPRET=1 or CUDA')


def make_host(layer_idx=0, **kw):
    """The example host (random where the host's init is constant) as layer ``layer_idx``."""
    host = RWKV7Adapter.example_host()
    if layer_idx != 1 or kw:
        torch.manual_seed(1)
        cfg = dict(hidden_size=64, head_dim=32, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8,
                   v_low_rank_dim=8, layer_idx=layer_idx, num_hidden_layers=2, **kw)
        fresh = type(host)(**cfg)
        state = {k: v for k, v in host.state_dict().items() if k in fresh.state_dict()}
        fresh.load_state_dict(state, strict=False)  # layer 0 has no v_lora
        host = fresh
    return host


def packed(lengths, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    r, k, kk = rnd(S, H, K), rnd(S, H, K), F.normalize(rnd(S, H, K), dim=-1)
    v = rnd(S, H, V)
    w = -DECAY_SCALE * torch.rand(S, H, K, generator=g, dtype=torch.float64)
    a = torch.rand(S, H, K, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    position = torch.cat([torch.arange(n) for n in lengths])
    h0 = rnd(len(lengths), H, K, V)
    return r, w, k, v, kk, a, cu, position, h0


def test_reference_recurrence_equals_fla_naive_per_segment():
    """rwkv7_reference over packed segments with initial states = fla's naive dplr_recurrence per segment."""
    H, K, V = 2, 8, 4
    # fp32: fla's naive computes in fp32 whatever it is given
    r, w, k, v, kk, a, cu, position, h0 = (t.float() if t.is_floating_point() else t
                                           for t in packed([5, 1, 9], H, K, V))
    o, ht = rwkv7_reference(r, w, k, v, -kk, kk * a, cu, position, scale=0.5, initial_state=h0,
                            output_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        # fla's naive scales q by K^-0.5: hand it 0.5 K^0.5 r for our scale 0.5
        seg = [t[s:e].transpose(0, 1)[None] for t in (r * 0.5 * K ** 0.5, k, v, -kk, kk * a, w)]
        o_i, ht_i = dplr_recurrence(*seg, initial_state=h0[i:i + 1].clone())
        close(o[s:e], o_i[0].transpose(0, 1), tol=1e-5)
        close(ht[i], ht_i[0], tol=1e-5)


@interpreter
def test_reference_recurrence_equals_fla_recurrent_kernel_varlen():
    from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7
    H, K, V = 2, 16, 8
    r, w, k, v, kk, a, cu, position, h0 = (t.float() if t.is_floating_point() else t
                                           for t in packed([6, 1, 11], H, K, V))
    o, ht = rwkv7_reference(r, w, k, v, -kk, kk * a, cu, position, initial_state=h0, output_final_state=True)
    o_k, ht_k = fused_mul_recurrent_rwkv7(r[None], w[None], k[None], v[None], kk[None], a[None], scale=1.0,
                                          initial_state=h0, output_final_state=True, cu_seqlens=cu)
    close(o_k[0], o, tol=1e-5)
    close(ht_k, ht, tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# layer 0 and v_first


@interpreter
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_layer0_one_memory_equals_real_host_and_its_v_first(backend):
    host = make_host(0).eval()
    ref = copy.deepcopy(host)
    mom = wrap(host, num_memories=1, topk=1, shared=False, init='copy', backend=backend).eval()
    x = torch.randn(2, 20, 64)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        want = ref(x, attention_mask=mask, v_first=torch.zeros_like(x))  # fla's models pass layer 0 zeros
        got = mom(x, attention_mask=mask, v_first=torch.zeros_like(x))
    assert len(got) == 4
    close(got[0][mask.bool()], want[0][mask.bool()], tol=1e-5)
    close(got[3], want[3], tol=1e-5)  # padding included: 0 in both


def v_by_hand(mom, x, decode_steps=False):
    """Layer 0's v_first from F.linear: each memory's v on the host's v mix (token shift written out), mixed
    with the router's renormalised top-k weights and the shared memory's 1, divided by the weights' sum.
    The routing is the router's, fp32 (in fp64 it could order memories differently), over the rows the layer
    routes in one call: all B * T tokens of a forward, or each time step's B tokens (``decode_steps``). fp32
    matmuls round differently for other row counts (MKL's AVX2 path: probabilities 1.3e-7 apart between the
    forward's 28 rows and a decode step's 2, v_first 3e-7), and v_first is compared to 1e-9."""
    host, bank, M = mom.host, mom.memories, mom.num_memories
    w = mom.router.weight.float()
    if decode_steps:
        probs = torch.stack([F.linear(x[:, t].float(), w).softmax(-1) for t in range(x.shape[1])], 1)
    else:
        probs = F.linear(x.flatten(0, 1).float(), w).softmax(-1).view(*x.shape[:2], -1)
    out = []
    for xb, pb in zip(x, probs):
        mix = xb + (F.pad(xb, (0, 0, 1, 0))[:-1] - xb) * host.x_v.view(-1)
        vs = torch.stack([F.linear(mix, bank.proj['v'][e]) for e in range(mom.num_slots_memories)], 1)
        top_p, top_i = routed(pb, mom.topk)
        weight = torch.zeros(xb.shape[0], mom.num_slots_memories, dtype=x.dtype)
        weight[:, :M].scatter_(1, top_i, top_p.to(x.dtype))
        if mom.shared_memory:
            weight[:, M] = 1
        out.append((weight[..., None] * vs).sum(1) / weight.sum(-1, keepdim=True))
    return torch.stack(out)


@pytest.mark.parametrize('shared', [False, True])
def test_layer0_v_first_is_the_routing_weighted_mean_of_the_memories_v(shared):
    mom = wrap(make_host(0), shared=shared).double().eval()
    x = torch.randn(2, 14, 64, dtype=torch.float64)
    with torch.no_grad():
        # fp64, and v_by_hand routes the same rows in one call as the layer: the same fp32 weights, bit for bit
        close(mom(x)[3], v_by_hand(mom, x), tol=1e-9)
        # decode steps (one token per sequence, the token-major plan) make the same v_first
        from fla.models.utils import Cache
        cache = Cache()
        mom(x[:, :9], past_key_values=cache, use_cache=True)
        steps = [mom(x[:, t:t + 1], past_key_values=cache, use_cache=True)[3] for t in range(9, 14)]
        close(torch.cat(steps, 1), v_by_hand(mom, x, decode_steps=True)[:, 9:], tol=1e-9)


def test_v_first_carries_gradient_from_layer_1_into_layer_0():
    """A loss on layer 1's output alone reaches layer 0's v weights (and its router) through v_first."""
    first, second = wrap(make_host(0), init='random'), wrap(make_host(1), init='random')
    x = torch.randn(2, 10, 64)
    v_first = first(x)[3]
    second(torch.randn(2, 10, 64), v_first=v_first)[0].square().sum().backward()
    assert first.memories.input_weight['v'].grad.abs().sum() > 0
    assert first.router.weight.grad.abs().sum() > 0
    assert first.memories.input_weight['k'].grad is None  # nothing else of layer 0 is on that path


def test_v_first_argument_errors_and_layer0_ignores_it():
    later, first = wrap(make_host(1)), wrap(make_host(0))
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match='v_first'):
        later(x)
    with pytest.raises(ValueError, match=r'v_first: expected shape \[2, 5, 64\]'):
        later(x, v_first=torch.randn(2, 4, 64))
    with pytest.raises(TypeError, match='v_first'):
        later(x, v_first=[0.0])
    close(first(x, v_first=torch.randn(2, 5, 64))[0], first(x)[0], tol=0)
    assert later(x, v_first=x)[3] is x  # later layers pass on the v_first they got, as the host does


def test_all_padding_batch_returns_zero_v_first():
    mom = wrap(make_host(0))
    x = torch.randn(2, 4, 64)
    out = mom(x, attention_mask=torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(out[3], torch.zeros(2, 4, 64))


# ---------------------------------------------------------------------------------------------------------------
# options and kernels


@interpreter
def test_fused_norm_host_one_memory_equals_real_host():
    """fuse_norm=True (fla's GroupNorm with bias, kk by fla's l2_norm): the RWKV7 models' default."""
    for backend in ('torch', 'triton'):
        host = make_host(1, fuse_norm=True).eval()
        with torch.no_grad():
            host.g_norm.bias.normal_(0, 0.3)
        ref = copy.deepcopy(host)
        mom = wrap(host, num_memories=1, topk=1, shared=False, init='copy', backend=backend).eval()
        x, v_first = torch.randn(2, 12, 64), torch.randn(2, 12, 64)
        with torch.no_grad():
            close(mom(x, v_first=v_first)[0], ref(x, v_first=v_first)[0], tol=1e-5)


@interpreter
def test_triton_backend_kernel_choice(monkeypatch):
    """chunk whenever gradients flow or in training (fla's recurrent RWKV7 kernel has no backward) and for eval
    segments of 64 tokens and more; fused_mul_recurrent otherwise, a decode step as a batch of one-token
    sequences (no cu_seqlens: fla then takes its one-step path, and checks nothing on the host). fla's chunk
    kernels do not run on the CPU: the stubs bind each call to the real signature and return zeros."""
    import inspect

    import fla.ops.rwkv7 as ops
    calls = []

    def stub(name, real):
        def run(*args, **kwargs):
            inspect.signature(real).bind(*args, **kwargs)
            calls.append((name, kwargs.get('cu_seqlens') is not None, args[0].shape[:2]))
            if name == 'chunk':
                assert kwargs['safe_gate'] and kwargs['lower_bound'] == -DECAY_SCALE
                assert kwargs['cu_seqlens_cpu'] is not None
            r, v, cu = args[0], args[3], kwargs.get('cu_seqlens')
            N = r.shape[0] if cu is None else cu.numel() - 1
            state = r.new_zeros(N, r.shape[2], r.shape[3], v.shape[3]) if kwargs['output_final_state'] else None
            return torch.zeros_like(v), state
        return run

    monkeypatch.setattr(ops, 'chunk_rwkv7', stub('chunk', ops.chunk_rwkv7))
    monkeypatch.setattr(ops, 'fused_mul_recurrent_rwkv7', stub('recurrent', ops.fused_mul_recurrent_rwkv7))
    mom = wrap(make_host(0), backend='triton').eval()
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        mom(x)
        mom(torch.randn(1, 64, 64))  # the shared memory's segment holds all 64 tokens
        from fla.models.utils import Cache
        cache = Cache()
        mom(x, past_key_values=cache, use_cache=True)
        mom(x[:, :1], past_key_values=cache, use_cache=True)  # decode: 2 tokens x 3 slots
    mom(x)  # eval, but with autograd
    with torch.no_grad():
        mom.train()(x)
    names = [c[0] for c in calls]
    assert names == ['recurrent', 'chunk', 'recurrent', 'recurrent', 'chunk', 'chunk']
    assert calls[3][1:] == (False, (6, 1))


def test_write_side_moves_out_of_the_host():
    mom = MixtureOfMemories(make_host(1), num_memories=2, topk=1)
    assert not any(hasattr(mom.host, n) for n in ('k_proj', 'v_proj', 'w_lora', 'a_lora', 'v_lora'))
    assert set(mom.memories.input_weight) == {'k', 'v', 'w', 'a', 'v_mix'}
    assert set(mom.memories.second) == {'w', 'a', 'v_mix'}
    assert set(MixtureOfMemories(make_host(0), num_memories=2, topk=1).memories.input_weight) == {'k', 'v', 'w', 'a'}


@pytest.mark.parametrize('layer_idx', [0, 1])
def test_bf16_weights_run_close_to_fp32(layer_idx):
    """The torch backend in bf16: outputs (and layer 0's v_first) in bf16, close to fp32."""
    mom32 = wrap(make_host(layer_idx), init='random').eval()
    mom16 = copy.deepcopy(mom32).to(torch.bfloat16)
    x, v_first = torch.randn(2, 12, 64), torch.randn(2, 12, 64)
    with torch.no_grad():
        want = mom32(x, v_first=v_first)
        got = mom16(x.bfloat16(), v_first=v_first.bfloat16())
    assert got[0].dtype == got[3].dtype == torch.bfloat16
    close(got[0].float(), want[0], tol=3e-2)
    close(got[3].float(), want[3], tol=3e-2)
