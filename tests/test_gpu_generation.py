"""GPU tests of cached generation (marked ``gpu``; run on the H100).

* triton backend (fla's fused_recurrent / chunk kernels) vs the torch backend over the same cache
  sequence: prefill, chunked prefill with tiny chunks, decode steps;
* a decode step captured with torch.cuda.CUDAGraph replays to the eager result, and replays again on the
  live cache (the pools are updated in place).
"""
import pytest
import torch
from fla.layers import GatedDeltaNet
from fla.models.utils import Cache

from mom_wrap import MixtureOfMemories
from mom_wrap.testing import norm_rel_err as rel_err  # (the GPU tests' measure)

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def make(dtype):
    torch.manual_seed(0)
    host = GatedDeltaNet(hidden_size=1024, head_dim=256, num_heads=4, expand_v=1, layer_idx=0)
    mom = MixtureOfMemories(host, num_memories=4, topk=2, shared_memory=True, init='random')
    torch.nn.init.normal_(mom.router.weight, std=0.05)
    return mom.to('cuda', dtype).eval()


def feed(mom, x, sizes):
    cache, outs, start = Cache(), [], 0
    for n in sizes:
        outs.append(mom(x[:, start:start + n], past_key_values=cache, use_cache=True)[0])
        start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_triton_vs_torch_backend_over_cache_sequence(dtype):
    mom = make(dtype)
    x = torch.randn(4, 200, 1024, device='cuda', dtype=dtype)
    sizes = [150, 1, 1, 17, 2, 1, 28]
    with torch.no_grad():
        mom.backend = 'torch'
        want, want_cache = feed(mom, x, sizes)
        mom.backend = 'triton'
        got, got_cache = feed(mom, x, sizes)
        full = mom(x)[0]
    errs = {'out': rel_err(got, want), 'vs full forward': rel_err(got, full),
            'state': rel_err(got_cache[0]['recurrent_state'], want_cache[0]['recurrent_state'])}
    print(f"\n{dtype} cache sequence relative errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < TOL[dtype], errs


def test_decode_step_replays_as_cuda_graph():
    mom = make(torch.bfloat16)
    B = 16
    with torch.no_grad():
        _, cache = feed(mom, torch.randn(B, 64, 1024, device='cuda', dtype=torch.bfloat16), [64])
        x = torch.randn(B, 1, 1024, device='cuda', dtype=torch.bfloat16)
        for _ in range(2):  # warm up on a side stream, as graph capture wants
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                snapshot = {k: v.clone() for k, v in _tensors(cache)}
                mom(x, past_key_values=cache, use_cache=True)
                _restore(cache, snapshot)
            torch.cuda.current_stream().wait_stream(s)
        start = {k: v.clone() for k, v in _tensors(cache)}
        eager = mom(x, past_key_values=cache, use_cache=True)[0].clone()
        eager_state = {k: v.clone() for k, v in _tensors(cache)}
        _restore(cache, start)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mom(x, past_key_values=cache, use_cache=True)[0]
        _restore(cache, start)  # capture does not run the kernels; replay from the same state
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        for k, v in _tensors(cache):
            assert torch.equal(v, eager_state[k]), k
        graph.replay()  # a second step on the live cache moves every row's shared memory on
        torch.cuda.synchronize()
        assert not torch.equal(cache[0]['recurrent_state'][:, -1], eager_state['recurrent'][:, -1])


def _tensors(cache):
    entry = cache[0]
    yield 'recurrent', entry['recurrent_state']
    for part in ('read', 'write'):
        for name, t in entry['conv_state'][part].items():
            yield f"{part}.{name}", t


def _restore(cache, snapshot):
    for k, v in _tensors(cache):
        v.copy_(snapshot[k])


@pytest.mark.mamba_ssm
def test_wrapped_mamba2_model_generate_with_cuda_graphs_equals_full_forwards():
    """mamba-ssm's MambaLMHeadModel, mixers wrapped: generate(cg=True) (decode steps captured as a CUDA graph
    on the pools ``allocate_inference_cache`` made) gives the tokens and scores of generate(cg=False) and of
    greedy decoding by full forwards."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    cfg = MambaConfig(d_model=256, n_layer=2, vocab_size=256, pad_vocab_size_multiple=8, rms_norm=True,
                      fused_add_norm=False, residual_in_fp32=True,
                      ssm_cfg=dict(layer='Mamba2', d_state=64, headdim=64, use_mem_eff_path=False))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, device='cuda', dtype=torch.float32).eval()
    for layer in model.backbone.layers:
        layer.mixer = MixtureOfMemories(layer.mixer, num_memories=4, topk=2, init='random').cuda()
        torch.nn.init.normal_(layer.mixer.router.weight, std=0.5)
    ids = torch.randint(1, 256, (2, 16), device='cuda')
    kw = dict(max_length=24, output_scores=True, return_dict_in_generate=True)
    graph = model.generate(ids, cg=True, **kw)
    eager = model.generate(ids, cg=False, **kw)
    assert torch.equal(graph.sequences, eager.sequences)
    seq = ids
    with torch.no_grad():
        for step in range(8):
            logits = model(seq).logits[:, -1]
            assert rel_err(graph.scores[step], logits) < TOL[torch.float32]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(graph.sequences, seq)
