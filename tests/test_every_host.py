"""The checks every host passes alike, parametrized over every registered host (tests/hosts.py: each adapter's
``example_host`` and ``example_inputs``; Mamba2 only where mamba-ssm is installed) and over the host options that
change what they check (``hosts.VARIANTS``, named per check): cached generation (prefill, decode, chunked prefill,
left padding and packed sequences through the cache equal the full forward; unselected memories keep their states bit
for bit; the triton backend's cached path equals the torch backend's) and the layouts (causal, batch rows
independent, left padding and packed sequences equal separate runs, copied memories equal one).

Each host is called through its family's convention (``mom_wrap.calls``: ``outputs``, ``new_cache``,
``call_cached``, ``packed_kwargs``, ``padding_mask``), as ``mom_wrap.testing.run_checks`` does: left padding only
for hosts whose forward takes a padding mask (not mamba-ssm's). The tolerances are stricter than the parity suite's
(tests/test_parity.py): comparisons that route the same tokens in calls of other batch shapes allow the router's
fp32 rounding (``routing_rounding``, tests/test_layer.py). What is a host's own (the real layer as oracle over its
options, its naive loop, its kernels, its state layout, its refusals) is in its tests/test_host_*.py.
"""
import copy
import os

import pytest
import torch

from mom_wrap import MixtureOfMemories
from mom_wrap.adapters import adapter_for
from mom_wrap.testing import _feed, norm_rel_err, routing_rounding, wrap
from tests import hosts
from tests.test_layer import close

needs_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                   reason="the hosts' Triton kernels need TRITON_INTERPRET=1 or CUDA")


def wrapped(host, variant=None, **kw):
    """The host (example or variant) wrapped with random memories (``mom_wrap.testing.wrap``: M=4, top-2 + shared,
    a router spread to route, fresh biases redrawn), torch backend, eval mode."""
    return wrap(hosts.make(host, variant), **kw).eval()


def adapter_of(layer):
    """A wrapped layer's adapter, or a host layer's registered one: their convention and example inputs."""
    return layer._adapter if isinstance(layer, MixtureOfMemories) else adapter_for(layer)  # (namesakes: by class)


def run(layer, x, **kw):
    """A forward with the host's own arguments (``example_inputs``) -> the output [B, T, hidden]."""
    adapter = adapter_of(layer)
    return adapter.convention.outputs(layer(x, **kw, **adapter.example_inputs(x)))[0]


def cached(layer, x, cache, **kw):
    """One forward through ``cache`` (of the host's family), the cache advanced -> the output."""
    adapter = adapter_of(layer)
    return adapter.convention.call_cached(layer, x, cache, **kw, **adapter.example_inputs(x))


def run_chunks(layer, x, sizes, mask=None):
    """x [B, T, hidden] through ``layer`` (wrapped or a host layer) and one new cache in chunks of ``sizes`` (with
    ``mask``: the mask of everything seen so far, as generate() passes it) -> the outputs concatenated, the cache."""
    caches = []
    out = _feed(adapter_of(layer).convention,
                lambda xc, cache, **kw: caches.append(cache) or cached(layer, xc, cache, **kw), x, sizes, mask)
    return out, caches[0]


def states(mom, cache) -> dict:
    """The layer's states in ``cache`` (``mom_wrap.cache``'s dict: 'recurrent' [N, E, *state], 'read_conv' and
    'write_conv' {name: [N, (E,) D, W]}) and the tokens the cache has counted, for either family's cache: mamba-ssm's
    InferenceParams holds the dict itself (its caller counts), fla's Cache holds an entry (it counts)."""
    if hasattr(cache, 'key_value_memory_dict'):
        return {**cache.key_value_memory_dict[mom.layer_idx], 'seen': cache.seqlen_offset}
    entry = cache[mom.layer_idx]
    return {'recurrent': entry['recurrent_state'], 'read_conv': entry['conv_state']['read'],
            'write_conv': entry['conv_state']['write'], 'seen': cache.get_seq_length(mom.layer_idx)}


def flat_states(mom, cache) -> list[torch.Tensor]:
    s = states(mom, cache)
    return [s['recurrent'], *s['read_conv'].values(), *s['write_conv'].values()]


def left_padded(x, lengths):
    """(x with NaN where left padding, mask [B, T]): row b holds its last lengths[b] tokens."""
    T = x.shape[1]
    x, mask = x.clone(), torch.zeros(x.shape[:2], dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        x[b, :T - n] = float('nan')  # padding content must not matter, not even NaN
    return x, mask


# ------------------------------------------------------------------------------------------ cached generation

@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV))
@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('sizes', [[24], [17, 1, 1, 1, 1, 1, 1, 1], [1] * 24, [5, 2, 9, 1, 7]])
def test_cached_chunks_equal_full_forward(host, variant, shared, sizes):
    """Prefill, decode steps from the prefill and from nothing, chunks after decode steps: the full forward, and the
    cache holds [N, E, *state] (the host's layout of a state: its tests/test_host_*.py, against the real host)."""
    mom = wrapped(host, variant, shared=shared)
    x = torch.randn(3, sum(sizes), mom.hidden_size)
    with torch.no_grad():
        full = run(mom, x)
        got, cache = run_chunks(mom, x, sizes)
    close(got, full, tol=1e-5)
    s = states(mom, cache)
    assert s['seen'] == sum(sizes)
    assert s['recurrent'].shape == (3, 4 + shared, *mom._adapter.state_shape())


@pytest.mark.parametrize('host,variant', hosts.case_params('*', examples=False))
@pytest.mark.parametrize('sizes', [[20, 1, 1, 1, 1, 6], [1] * 8])
def test_variants_cached_chunks_equal_full_forward(host, variant, sizes):
    mom = wrapped(host, variant)
    x = torch.randn(2, sum(sizes), mom.hidden_size)
    with torch.no_grad():
        close(run_chunks(mom, x, sizes)[0], run(mom, x), tol=1e-5)


@pytest.mark.parametrize('host,variant', hosts.case_params())
def test_cached_chunks_with_gradients_equal_full_forward(host, variant):
    """Under autograd the cache is updated out of place and the gradient flows through it from one chunk into the
    previous one: every parameter's gradient is the full forward's."""
    mom = wrapped(host, variant).train()
    x = torch.randn(2, 12, mom.hidden_size)
    full = run(mom, x)
    full.square().sum().backward()
    want = {n: p.grad.clone() for n, p in mom.named_parameters()}
    mom.zero_grad()
    got, _ = run_chunks(mom, x, [5, 1, 6])
    got.square().sum().backward()
    close(got, full, tol=1e-5)
    for name, p in mom.named_parameters():
        close(p.grad, want[name], tol=1e-4)


@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV,
                                                           'LinearAttention/hedgehog_norm', padding_mask=True))
@pytest.mark.parametrize('sizes', [[20], [11, 1, 1, 4, 1, 1, 1]])
def test_left_padding_with_cache_equals_unpadded(host, variant, sizes):
    mom = wrapped(host, variant)
    lengths = [20, 13, 6]
    T = sum(sizes)
    x, mask = left_padded(torch.randn(3, T, mom.hidden_size), lengths)
    with torch.no_grad():
        got, _ = run_chunks(mom, x, sizes, mask)
        for b, n in enumerate(lengths):
            close(got[b, T - n:], run(mom, x[b:b + 1, T - n:])[0], tol=1e-5)
            assert torch.all(got[b, :T - n] == 0)


@pytest.mark.parametrize('host,variant', hosts.case_params(padding_mask=True))
def test_padding_token_in_a_decode_step_leaves_its_state_alone(host, variant):
    mom = wrapped(host, variant)
    x = torch.randn(2, 9, mom.hidden_size)
    with torch.no_grad():
        _, cache = run_chunks(mom, x[:, :8], [8])
        before = [t.clone() for t in flat_states(mom, cache)]
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 8] = 0
        out = cached(mom, x[:, 8:], cache, attention_mask=mask)
    assert torch.all(out[1] == 0)
    for a, b in zip(before, flat_states(mom, cache)):
        assert torch.equal(a[1], b[1])  # row 1 untouched
        assert not torch.equal(a[0], b[0])  # row 0 moved on


@pytest.mark.parametrize('host,variant', hosts.case_params())
def test_packed_sequences_with_cache_equal_separate_full_forwards(host, variant):
    mom = wrapped(host, variant)
    convention = mom._adapter.convention
    first, second = [6, 1, 9], [3, 4, 1]
    xs = [torch.randn(1, a + b, mom.hidden_size) for a, b in zip(first, second)]
    with torch.no_grad():
        cache, outs = convention.new_cache(3, 13), []
        for part, lengths in ((0, first), (1, second)):
            chunk = torch.cat([x[:, :first[i]] if part == 0 else x[:, first[i]:] for i, x in enumerate(xs)], 1)
            cu = torch.tensor([0] + lengths).cumsum(0)
            outs.append((cached(mom, chunk, cache, **convention.packed_kwargs(cu))[0], cu))
        (o1, cu1), (o2, cu2) = outs
        for i, x in enumerate(xs):
            close(torch.cat([o1[cu1[i]:cu1[i + 1]], o2[cu2[i]:cu2[i + 1]]]), run(mom, x)[0], tol=1e-5)


@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV))
def test_unselected_memories_keep_state_bit_identical(host, variant):
    """Recurrent and write-side conv states of a memory no token of a sequence chose stay bit for bit."""
    mom = wrapped(host, variant, num_memories=6, topk=1)
    x = torch.randn(2, 14, mom.hidden_size)
    with torch.no_grad():
        _, cache = run_chunks(mom, x[:, :10], [10])
        for n in (1, 3):  # a decode step, then a short chunk in which most memories get nothing
            s = states(mom, cache)
            before = {'h': s['recurrent'].clone(), **{k: v.clone() for k, v in s['write_conv'].items()}}
            cached(mom, x[:, 10:10 + n], cache)
            chosen = mom.router_logits.argmax(-1)  # [B, n]
            s = states(mom, cache)
            after = {'h': s['recurrent'], **s['write_conv']}
            for b in range(2):
                for e in range(6):
                    same = all(torch.equal(before[k][b, e], after[k][b, e]) for k in before)
                    assert same == (e not in chosen[b].tolist()), (n, b, e)
                assert not torch.equal(before['h'][b, 6], after['h'][b, 6])  # the shared memory always moves


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize('host,variant,padded', [
    *hosts.case_params(values=[False]),
    *hosts.case_params(*hosts.SHORT_CONV,
                       'DeltaNet/no_beta_sum_relu_gate', padding_mask=True, values=[True], tag='-padded')])
def test_triton_backend_decode_equals_torch_backend(host, variant, padded):
    """The host's kernels and our conv-step kernels (under the interpreter on the CPU) over the same cache sequence,
    outputs and every state; padded: left padding and a padding token inside a decode step (its states must stay)."""
    mom = wrapped(host, variant)
    x = torch.randn(2, 12, mom.hidden_size)
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :3] = 0
        mask[1, 6] = 0  # the first decode step of row 1 is padding: its states must stay
    outs = {}
    with torch.no_grad():
        for backend in ('torch', 'triton'):
            mom.backend = backend
            outs[backend] = run_chunks(mom, x, [6, 1, 1, 4], mask)
    close(outs['triton'][0], outs['torch'][0], tol=1e-5)
    for a, b in zip(flat_states(mom, outs['triton'][1]), flat_states(mom, outs['torch'][1])):
        close(a, b, tol=1e-5)


# ------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV,
                                                           'LinearAttention/hedgehog_norm'))
def test_causal(host, variant):
    mom = wrapped(host, variant)
    x = torch.randn(2, 20, mom.hidden_size)
    y = x.clone()
    y[:, 12:] = torch.randn(2, 8, mom.hidden_size)
    with torch.no_grad():
        a, b = run(mom, x), run(mom, y)
    close(a[:, :12], b[:, :12], tol=1e-6)
    assert not torch.allclose(a[:, 12], b[:, 12])  # the first changed token changes its own output


@pytest.mark.parametrize('host,variant', hosts.case_params())
def test_batch_rows_independent(host, variant):
    mom = wrapped(host, variant)
    x = torch.randn(4, 19, mom.hidden_size)
    with torch.no_grad():
        full = run(mom, x)
        for b in range(4):
            # fp32 as a batch, and the router's fp32 weights rounded for another row count (tests/routing_rounding.py)
            close(run(mom, x[b:b + 1])[0], full[b], tol=1e-6 + routing_rounding(mom, x))


@pytest.mark.parametrize('host,variant', hosts.case_params('GatedLinearAttention/unfused_gate_fn',
                                                           'GatedSlotAttention/relu_scale',
                                                           'LinearAttention/elu_norm', padding_mask=True))
def test_left_padding_equals_unpadded(host, variant):
    mom = wrapped(host, variant)
    lengths = [19, 11, 4]
    T = max(lengths)
    x = torch.randn(len(lengths), T, mom.hidden_size)
    x_padded, mask = left_padded(x, lengths)
    with torch.no_grad():
        out = run(mom, x_padded, attention_mask=mask)
        for b, n in enumerate(lengths):
            # fp32 as a batch, and the router's fp32 weights rounded for another row count (tests/routing_rounding.py)
            close(out[b, T - n:], run(mom, x[b:b + 1, T - n:])[0], tol=1e-6 + routing_rounding(mom, x_padded))
            assert torch.all(out[b, :T - n] == 0)


@pytest.mark.parametrize('host,variant', hosts.case_params('DeltaNet/neg_eigval_elu_conv_bias',
                                                           'GatedLinearAttention/kv_heads',
                                                           'GatedSlotAttention/kv_heads',
                                                           'LinearAttention/kv_heads_t2r_tied'))
def test_packed_sequences_equal_separate_runs(host, variant):
    """Every packed sequence starts from zero states, its short convs and token shift from zeros too."""
    mom = wrapped(host, variant)
    lengths = [7, 13, 1, 9]
    x = torch.randn(1, sum(lengths), mom.hidden_size)
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        out = run(mom, x, **mom._adapter.convention.packed_kwargs(cu))[0]
        for s, e in zip(cu[:-1], cu[1:]):
            # fp32 as a batch, and the router's fp32 weights rounded for another row count (tests/routing_rounding.py)
            close(out[s:e], run(mom, x[:, s:e])[0], tol=1e-6 + routing_rounding(mom, x))


@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV,
                                                           'LinearAttention/hedgehog_norm'))
def test_all_copied_memories_equal_one_memory(host, variant):
    """M=4, top-4 copies without shared memory: every token reads 4 identical memories, uneven weights summing to 1."""
    host_layer = hosts.make(host, variant)
    one = wrap(copy.deepcopy(host_layer), num_memories=1, topk=1, shared=False, init='copy').eval()
    four = wrap(host_layer, num_memories=4, topk=4, shared=False, init='copy').eval()
    torch.nn.init.normal_(four.router.weight)
    x = torch.randn(2, 13, one.hidden_size)
    with torch.no_grad():
        close(run(four, x), run(one, x), tol=1e-5)


# ------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize('host,variant', hosts.case_params())
def test_every_parameter_gradient_matches_finite_differences(host, variant):
    """fp64, torch backend: every parameter a finite nonzero gradient, matching directional finite differences,
    parameter by parameter: no custom backward is off anywhere (the router: routes in fp32 and top-k is piecewise;
    its gradient against the naive loops, tests/test_layer.py and the tests/test_host_*.py)."""
    mom = wrapped(host, variant).double().train()
    x = torch.randn(2, 12, mom.hidden_size, dtype=torch.float64)
    target = torch.randn_like(x)

    def loss():
        return (run(mom, x) - target).square().mean()

    loss().backward()
    for name, p in mom.named_parameters():
        g = p.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        if name == 'router.weight':
            continue
        d = torch.randn_like(p)
        with torch.no_grad():
            p.add_(1e-6 * d)
            plus = loss().item()
            p.sub_(2e-6 * d)
            minus = loss().item()
            p.add_(1e-6 * d)
        fd, ad = (plus - minus) / 2e-6, (g * d).sum().item()
        assert abs(fd - ad) <= 1e-5 * abs(ad) + 1e-9, (name, fd, ad)


# ------------------------------------------------------------------------------------------ on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize('host,variant', hosts.case_params(*hosts.SHORT_CONV, *hosts.GPU_MORE))
def test_gpu_triton_backend_equals_torch_backend_beyond_64_tokens(host, variant):
    """On a GPU at T = 256, where the hosts' chunked kernels run (several of them do not under the interpreter):
    training with the triton backend in one recurrence call and in 2 parts over time equals the torch backend, output
    and every gradient (fp32, dots in IEEE fp32: tests/conftest.py; plus what the host's own kernels round,
    ``host_kernel_rounding``); cached chunks across the 64-token kernel switch equal the full forward, on both
    backends. Left padding in one row where the host's forward takes a mask. (In TF32, on an H100 at 168a0bc, the
    per-head gate parameters' gradients, sums over every slot, were 7.0e-3 off for GatedDeltaNet's A_log and 1.1e-2
    for Mamba2's dt_bias.)"""
    torch.manual_seed(0)
    mom = wrapped(host, variant).cuda().train()
    x = torch.randn(2, 256, mom.hidden_size, device='cuda')
    dy = torch.randn_like(x)
    kw = {}
    if mom._adapter.convention.padding_mask:
        mask = torch.ones(2, 256, dtype=torch.long, device='cuda')
        mask[1, :40] = 0
        kw = {'attention_mask': mask}

    grads = {}
    for backend, parts in (('torch', 1), ('triton', 1), ('triton', 2)):
        mom.backend, mom.recurrence_parts = backend, parts
        xi = x.clone().requires_grad_()
        run(mom, xi, **kw).backward(dy)
        grads[backend, parts] = {'x': xi.grad, **{n: p.grad.clone() for n, p in mom.named_parameters()}}
        mom.zero_grad()
    tol = 5e-3 + mom._adapter.host_kernel_rounding(x.device, x.dtype)
    for key in (('triton', 1), ('triton', 2)):
        errs = {n: norm_rel_err(g, grads['torch', 1][n]) for n, g in grads[key].items()}
        worst = max(errs, key=errs.get)  # (named first: pytest cuts a long dict in its report)
        assert errs[worst] < tol, f"{key}: worst {worst} {errs[worst]:.2e}; all: {errs}"
    mom.eval()
    with torch.no_grad():
        outs = {}
        for backend in ('torch', 'triton'):
            mom.backend = backend
            full = run(mom, x, **kw)
            outs[backend], _ = run_chunks(mom, x, [150, 1, 1, 80, 1, 23], kw.get('attention_mask'))
            assert norm_rel_err(outs[backend], full) < 5e-3, backend
        assert norm_rel_err(outs['triton'], outs['torch']) < 5e-3
