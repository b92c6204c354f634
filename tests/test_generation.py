"""Cached generation: prefill, decode, chunked prefill, left padding and packed input all equal the full
forward; unselected memories keep their state bit-identical; the seen-token count is the real one."""
import os

import pytest
import torch
from fla.models.utils import Cache

from tests.test_layer import HIDDEN, HOST_VARIANTS, close, make_host, wrap


def mom_layer(shared=True, host_kw=None, **kw):
    mom = wrap(make_host(**(host_kw or {})), init='random', shared_memory=shared, **kw).eval()
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    return mom


def run_chunks(mom, x, sizes, mask=None):
    """Feed x [B, T, H] through one cache in chunks of ``sizes``; returns the concatenated outputs."""
    cache, outs, start = Cache(), [], 0
    for n in sizes:
        m = None if mask is None else mask[:, :start + n]  # the mask of everything seen so far, as generate() passes it
        outs.append(mom(x[:, start:start + n], attention_mask=m, past_key_values=cache, use_cache=True)[0])
        start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('sizes', [[24], [17, 1, 1, 1, 1, 1, 1, 1], [1] * 24, [5, 2, 9, 1, 7]])
def test_cached_chunks_equal_full_forward(shared, sizes):
    mom = mom_layer(shared)
    x = torch.randn(3, sum(sizes), HIDDEN)
    with torch.no_grad():
        full = mom(x)[0]
        got, cache = run_chunks(mom, x, sizes)
    close(got, full, tol=1e-5)
    assert cache.get_seq_length(0) == sum(sizes)


@pytest.mark.parametrize('host_kw', HOST_VARIANTS[1:])
def test_host_variants_cached_chunks_equal_full_forward(host_kw):
    mom = mom_layer(host_kw=host_kw)
    for b in mom.memories.conv_bias.values():
        torch.nn.init.normal_(b.data)
    x = torch.randn(2, 15, HIDDEN)
    with torch.no_grad():
        close(run_chunks(mom, x, [7, 1, 1, 6])[0], mom(x)[0], tol=1e-5)


def test_cached_chunks_with_gradients_equal_full_forward():
    mom = mom_layer()
    x = torch.randn(2, 12, HIDDEN)
    full = mom(x)[0]
    full.square().sum().backward()
    want = mom.memories.split(mom.memories.weight.grad)['k'].clone()
    mom.zero_grad()
    got, _ = run_chunks(mom, x, [5, 1, 6])
    got.square().sum().backward()
    close(got, full, tol=1e-5)
    close(mom.memories.split(mom.memories.weight.grad)['k'], want, tol=1e-4)


@pytest.mark.parametrize('sizes', [[20], [11, 1, 1, 4, 1, 1, 1]])
def test_left_padding_with_cache_equals_unpadded(sizes):
    mom = mom_layer()
    lengths = [20, 13, 6]
    T = sum(sizes)
    x = torch.randn(3, T, HIDDEN)
    mask = torch.ones(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :T - n] = 0
        x[b, :T - n] = float('nan')
    with torch.no_grad():
        got, _ = run_chunks(mom, x, sizes, mask)
        for b, n in enumerate(lengths):
            close(got[b, T - n:], mom(x[b:b + 1, T - n:])[0][0], tol=1e-5)
            assert torch.all(got[b, :T - n] == 0)


def test_padding_token_in_a_decode_step_leaves_its_state_alone():
    mom = mom_layer()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        _, cache = run_chunks(mom, x[:, :8], [8])
        before = [t.clone() for t in _flat_state(cache)]
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 8] = 0
        out = mom(x[:, 8:], attention_mask=mask, past_key_values=cache, use_cache=True)[0]
    assert torch.all(out[1] == 0)
    for a, b in zip(before, _flat_state(cache)):
        assert torch.equal(a[1], b[1])  # row 1 untouched
        assert not torch.equal(a[0], b[0])  # row 0 moved on


def _flat_state(cache):
    entry = cache[0]
    conv = entry['conv_state']
    return [entry['recurrent_state'], *conv['read'].values(), *conv['write'].values()]


def test_packed_sequences_with_cache_equal_separate_full_forwards():
    mom = mom_layer()
    first, second = [6, 1, 9], [3, 4, 1]
    xs = [torch.randn(1, a + b, HIDDEN) for a, b in zip(first, second)]
    with torch.no_grad():
        cache = Cache()
        outs = []
        for part, lengths in ((0, first), (1, second)):
            chunk = torch.cat([x[:, :first[i]] if part == 0 else x[:, first[i]:] for i, x in enumerate(xs)], 1)
            cu = torch.tensor([0] + lengths).cumsum(0)
            outs.append((mom(chunk, past_key_values=cache, use_cache=True, cu_seqlens=cu)[0][0], cu))
        for i, x in enumerate(xs):
            full = mom(x)[0][0]
            (o1, cu1), (o2, cu2) = outs
            close(torch.cat([o1[cu1[i]:cu1[i + 1]], o2[cu2[i]:cu2[i + 1]]]), full, tol=1e-5)


def test_unselected_memories_keep_state_bit_identical():
    mom = mom_layer(num_memories=6, topk=1)
    x = torch.randn(2, 14, HIDDEN)
    with torch.no_grad():
        _, cache = run_chunks(mom, x[:, :10], [10])
        for n in (1, 3):  # a decode step, then a short chunk in which most memories get nothing
            entry = cache[0]
            before = {'h': entry['recurrent_state'].clone(),
                      **{k: v.clone() for k, v in entry['conv_state']['write'].items()}}
            mom(x[:, 10:10 + n], past_key_values=cache, use_cache=True)
            chosen = mom.router_logits.argmax(-1)  # [B, n]
            after = {'h': entry['recurrent_state'], **entry['conv_state']['write']}
            for b in range(2):
                for e in range(6):
                    same = all(torch.equal(before[k][b, e], after[k][b, e]) for k in before)
                    assert same == (e not in chosen[b].tolist()), (n, b, e)
                assert not torch.equal(before['h'][b, 6], after['h'][b, 6])  # the shared memory always moves


def test_cache_errors():
    mom = mom_layer()
    cache = Cache()
    with torch.no_grad():
        mom(torch.randn(2, 3, HIDDEN), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match='past_key_values'):
            mom(torch.randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                    reason='needs TRITON_INTERPRET=1 or CUDA')
@pytest.mark.parametrize('padded', [False, True])
def test_triton_backend_decode_equals_torch_backend(padded):
    """fla's fused_recurrent kernel and our in-place conv-step kernel (under the interpreter on the CPU)
    over the same cache sequence; padded: left padding and a padding token inside a decode step."""
    mom = mom_layer()
    x = torch.randn(2, 12, HIDDEN)
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
    for a, b in zip(_flat_state(outs['triton'][1]), _flat_state(outs['torch'][1])):
        close(a, b, tol=1e-5)


needs_model_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                         reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")


def wrapped_model():
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from mom_wrap import MixtureOfMemories

    cfg = GatedDeltaNetConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_heads=2, head_dim=16,
                              expand_v=1, intermediate_size=128, fuse_cross_entropy=False)
    model = GatedDeltaNetForCausalLM(cfg).eval()
    # well-separated logits: with the default 0.02 init they nearly tie, and argmax would then compare
    # rounding differences between any two exact computations rather than the caching
    for w in (model.model.embeddings.weight, model.lm_head.weight):
        torch.nn.init.normal_(w, std=1.0)
    for layer in model.model.layers:
        layer.attn = MixtureOfMemories(layer.attn, num_memories=4, topk=2, init='random')
        torch.nn.init.normal_(layer.attn.router.weight, std=0.5)
    return model


def left_padded_prompts(lengths, width):
    """Token ids [B, width] with pad id 0 on the left of each row, and their attention mask."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, width - n:] = 1
    return torch.randint(1, 64, mask.shape) * mask, mask


@needs_model_kernels
def test_model_beam_search_with_cache_equals_without():
    """Beam search reorders and repeats the cache by batch row: the batch-first pools follow."""
    model = wrapped_model()
    ids, mask = left_padded_prompts([7, 5], 7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


@needs_model_kernels
def test_model_generate_equals_full_forward_greedy_decoding():
    from tests.test_models import generate_matches_full_forwards
    ids, mask = left_padded_prompts([9, 6, 3], 9)
    generate_matches_full_forwards(wrapped_model(), ids, mask, new=6)


def test_inference_weight_cache_follows_weight_changes():
    mom = mom_layer()
    x = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        first = mom(x)[0]
        mom.memories.proj['v'].mul_(2.0)  # in place, as an optimizer step or load_state_dict would
        second = mom(x)[0]
    want = mom(x)[0]  # with autograd: no cache
    assert not torch.allclose(first, second)
    close(second, want, tol=1e-6)
