"""Whole fla models of every supported host, their attention layers wrapped: ``model.generate()`` with the
MoM cache equals greedy decoding by full forwards (no cache), on a left-padded batch."""
import os

import pytest
import torch

from mom_wrap import MixtureOfMemories
from tests import hosts
from tests.test_generation import left_padded_prompts

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")

MODELS = {  # host -> (config class, model class, config options beyond the common ones)
    'GatedDeltaNet': ('GatedDeltaNetConfig', 'GatedDeltaNetForCausalLM', dict(head_dim=16, expand_v=1)),
    'GatedLinearAttention': ('GLAConfig', 'GLAForCausalLM', {}),
    'LinearAttention': ('LinearAttentionConfig', 'LinearAttentionForCausalLM', {}),
    'GatedSlotAttention': ('GSAConfig', 'GSAForCausalLM', dict(num_slots=16)),
    # expand_ratio from num_heads (the config's default, 128, would leave the layer no head at hidden 64)
    'HGRN2Attention': ('HGRN2Config', 'HGRN2ForCausalLM', dict(expand_ratio=None)),
    'MultiScaleRetention': ('RetNetConfig', 'RetNetForCausalLM', {}),
    'KimiDeltaAttention': ('KDAConfig', 'KDAForCausalLM', dict(head_dim=16, expand_v=2)),
    # fla's own Mamba2 (tests/hosts.py names it so beside mamba-ssm's): 2 heads of head_dim 64 (expand 2), state 16
    'fla.Mamba2': ('Mamba2Config', 'Mamba2ForCausalLM', dict(state_size=16, chunk_size=16)),
    # fla's Mamba3: 2 heads of 64 (its model initialises dt_bias from the config's num_heads); its forward refuses the
    # CPU: the checks of the plain model run on a GPU (``model_params``)
    'fla.Mamba3': ('Mamba3Config', 'Mamba3ForCausalLM', dict(state_size=16, head_dim=64, chunk_size=16)),
    'DeltaNet': ('DeltaNetConfig', 'DeltaNetForCausalLM', {}),
    'RWKV6Attention': ('RWKV6Config', 'RWKV6ForCausalLM', dict(proj_low_rank_dim=8, gate_low_rank_dim=8)),
    # layer 0 returns v_first, layer 1 takes it; fuse_norm (the config's default): fla's GroupNorm and l2_norm
    'RWKV7Attention': ('RWKV7Config', 'RWKV7ForCausalLM', dict(head_dim=32, decay_low_rank_dim=8, a_low_rank_dim=8,
                                                               v_low_rank_dim=8, gate_low_rank_dim=8)),
}


def model_params(host_forward: bool = False) -> list:
    """Every host of MODELS as a pytest parameter with its markers (tests/hosts.py; ``host_forward``: the test runs
    the plain model, whose layers' own forward may refuse the CPU)."""
    return [hosts.param(h, host_forward=host_forward) for h in sorted(MODELS)]


def host_model(host):
    """A 2-layer fla model of the host, with every parameter that its init leaves at zero or one constant (RWKV7's
    o_proj, LoRA first stages, ...) redrawn: at zero an attention layer would add nothing to check."""
    import fla.models as models
    config_cls, model_cls, extra = MODELS[host]
    cfg = getattr(models, config_cls)(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=2,
                                      intermediate_size=128, fuse_cross_entropy=False, **extra)
    torch.manual_seed(0)
    model = getattr(models, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.dim() == 2 else p + 0.3 * torch.randn_like(p))
    return model


def host_slots(model) -> list[tuple]:
    """(block, attribute) of each host layer of an fla model: ``model.model.layers[i].attn``, or Mamba2's
    ``model.backbone.layers[i].mixer``."""
    blocks = model.model.layers if hasattr(model, 'model') else model.backbone.layers
    return [(block, 'attn' if hasattr(block, 'attn') else 'mixer') for block in blocks]


def wrapped_model(host):
    model = host_model(host)
    model.generation_config.eos_token_id = None  # a sampled end token must not stop generate() early
    # well-separated logits: with the default 0.02 init they nearly tie, and argmax would then compare
    # rounding differences between any two exact computations rather than the caching
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        torch.nn.init.normal_(w, std=1.0)
    for block, name in host_slots(model):
        assert type(getattr(block, name)).__name__ == host.rpartition('.')[2]
        setattr(block, name, MixtureOfMemories(getattr(block, name), num_memories=4, topk=2, init='random'))
        torch.nn.init.normal_(getattr(block, name).router.weight, std=0.5)
    return model


def generate_matches_full_forwards(model, ids, mask, new):
    """model.generate() with the MoM cache vs greedy decoding by full forwards without a cache: the same tokens
    and, step by step, the same logits (the tokens alone can agree by luck: the residual stream carries the
    current token's embedding straight to the logits, so a decode step that lost its state often still picks
    the right token)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        seq, m = ids, mask
        for step in range(new):
            logits = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1]
            err = (out.scores[step] - logits).abs().max().item()
            assert err <= 1e-4 * max(logits.abs().max().item(), 1.0), (step, err)
            top2 = logits.topk(2, -1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie to flip
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq), (out.sequences, seq)


@pytest.mark.parametrize('host', model_params())
def test_wrapped_model_generate_equals_full_forward_greedy_decoding(host):
    ids, mask = left_padded_prompts([8, 5], 8)
    generate_matches_full_forwards(wrapped_model(host), ids, mask, new=4)


@pytest.mark.parametrize('host', model_params(host_forward=True))
def test_wrapped_model_with_one_memory_copies_equals_the_host_model(host):
    """Every attention layer wrapped with M=1 copying it: the model's logits stay the host model's (for RWKV7
    this covers v_first from layer 0 into layer 1)."""
    model = host_model(host)
    ids, mask = left_padded_prompts([8, 5], 8)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        for block, name in host_slots(model):
            setattr(block, name, MixtureOfMemories(getattr(block, name), num_memories=1, topk=1, shared_memory=False,
                                                   init='copy'))
        got = model(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    err = (got[m] - want[m]).abs().max().item()
    assert err <= 1e-4 * max(want[m].abs().max().item(), 1.0), err
