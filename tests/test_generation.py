"""Cached generation of MixtureOfMemories(GatedDeltaNet) beyond the checks every host passes alike (prefill, decode,
chunked prefill, left padding and packed input through the cache equal the full forward, unselected memories keep
their states, the triton backend's cached path: tests/test_every_host.py): a cache of another batch size is refused,
the inference weight cache follows the weights, and a wrapped fla model generates (greedy, beam search) as it does
without a cache."""
import os

import pytest
import torch
from fla.models.utils import Cache

from tests.test_layer import HIDDEN, close, make_host, wrap


def mom_layer():
    mom = wrap(make_host(), init='random').eval()
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    return mom


def test_cache_errors():
    mom = mom_layer()
    cache = Cache()
    with torch.no_grad():
        mom(torch.randn(2, 3, HIDDEN), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match='past_key_values'):
            mom(torch.randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)


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
