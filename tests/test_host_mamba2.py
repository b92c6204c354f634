"""MixtureOfMemories(Mamba2): what the public parity suite (tests/test_parity.py, on the example host) does
not cover: the host's options against the real layer, mamba-ssm's InferenceParams generation (the real
layer's own step path as oracle), a wrapped MambaLMHeadModel decoding through its cache, our kernel's cached
path against the torch backend, the forward contract's other arguments and the errors.

On the CPU the real layer runs under Triton's interpreter (tests/conftest.py), without mamba-ssm's CUDA
extensions: ``use_mem_eff_path=False`` (the fused path needs causal-conv1d's CUDA kernels).
"""
import copy
import os

import pytest
import torch

from mom_wrap import MixtureOfMemories
from mom_wrap.testing import wrap
from mom_wrap.testing import routing_rounding
from tests.test_layer import close

pytestmark = pytest.mark.mamba_ssm  # every test here: skipped without mamba-ssm (tests/conftest.py)
try:
    from mamba_ssm.modules.mamba2 import Mamba2
    from mamba_ssm.utils.generation import InferenceParams
except ImportError:  # collected all the same, and skipped
    Mamba2 = InferenceParams = None

interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason='needs TRITON_INTERPRET=1 or CUDA')
VARIANTS = [{}, dict(ngroups=2), dict(D_has_hdim=True), dict(rmsnorm=False), dict(norm_before_gate=True),
            dict(d_ssm=64), dict(dt_limit=(0.01, 0.05)), dict(bias=True, conv_bias=False)]


def make_host(**kw):
    cfg = dict(d_model=64, d_state=16, headdim=16, chunk_size=16, layer_idx=0, use_mem_eff_path=False)
    cfg.update(kw)
    torch.manual_seed(0)
    host = Mamba2(**cfg)
    with torch.no_grad():  # D and the norm's weight start at ones: make them count
        host.D.add_(0.3 * torch.randn_like(host.D))
        if host.rmsnorm:
            host.norm.weight.add_(0.3 * torch.randn_like(host.norm.weight))
        if host.in_proj.bias is not None:
            host.in_proj.bias.normal_(0, 0.3)
    return host.eval()


# the triton backend differs from the torch one in the scan (mamba-ssm's kernel, which takes the groups, D and
# dt_limit) and in calling the host's own norm module: its variants are those that reach the scan
TRITON_VARIANTS = [{}, dict(ngroups=2), dict(D_has_hdim=True), dict(dt_limit=(0.01, 0.05))]


@interpreter
@pytest.mark.parametrize('backend,kw', [('torch', kw) for kw in VARIANTS] + [('triton', kw) for kw in TRITON_VARIANTS],
                         ids=lambda v: v if isinstance(v, str) else ','.join(v) or 'default')
def test_one_memory_equals_real_host(kw, backend):
    host = make_host(**kw)
    ref = copy.deepcopy(host)
    mom = wrap(host, num_memories=1, topk=1, shared=False, init='copy', backend=backend).eval()
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        close(mom(x), ref(x), tol=1e-5)


def feed(layer, x, sizes, params=None):
    """x through ``layer`` in chunks of ``sizes`` with one InferenceParams, as mamba-ssm's generation does."""
    params = params or InferenceParams(max_seqlen=x.shape[1], max_batch_size=x.shape[0])
    outs = []
    for n in sizes:
        start = params.seqlen_offset
        outs.append(layer(x[:, start:start + n], inference_params=params))
        params.seqlen_offset += n
    return torch.cat(outs, 1), params


@interpreter
def test_generation_equals_real_host_generation():
    """Prefill, then one token at a time: the M=1 wrapper (our kernel's cached path on the triton backend) =
    the real layer's own prefill and step path (mamba-ssm's InferenceParams) = the full forward."""
    host = make_host()
    ref = copy.deepcopy(host)
    x = torch.randn(2, 16, 64)
    sizes = [12, 1, 1, 1, 1]
    with torch.no_grad():
        want, _ = feed(ref, x, sizes)
        close(want, ref(x), tol=1e-5)
        for backend in ('torch', 'triton'):
            mom = wrap(copy.deepcopy(host), num_memories=1, topk=1, shared=False, init='copy', backend=backend)
            got, _ = feed(mom.eval(), x, sizes)
            close(got, want, tol=1e-5)


@interpreter
@pytest.mark.parametrize('sizes', [[16], [9, 3, 1, 1, 2], [1] * 6 + [10]])
def test_routed_cached_chunks_triton_equals_torch_and_full_forward(sizes):
    """M=4 top-2 + shared: chunked prefill and decode (beyond mamba-ssm, chunks after the first may hold
    several tokens) through our chunk_scalar_decay kernel = the torch backend = the full forward."""
    mom = wrap(make_host(), init='random').eval()
    x = torch.randn(2, 16, 64)
    outs, pools = {}, {}
    with torch.no_grad():
        full = mom(x)
        for backend in ('torch', 'triton'):
            mom.backend = backend
            outs[backend], params = feed(mom, x, sizes)
            pools[backend] = params.key_value_memory_dict[0]['recurrent']
    close(outs['torch'], full, tol=1e-5)
    close(outs['triton'], outs['torch'], tol=1e-5)
    close(pools['triton'], pools['torch'], tol=1e-5)


@interpreter
def test_wrapped_model_decodes_through_its_cache_like_full_forwards():
    """A 2-layer MambaLMHeadModel, mixers wrapped (M=4 top-2 + shared): prefill and one-token steps through
    InferenceParams, its pools allocated up front by ``allocate_inference_cache`` (as mamba-ssm's CUDA-graph
    decoding does) and updated in place, give the logits of full forwards."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8, rms_norm=True,
                      fused_add_norm=False, residual_in_fp32=True,
                      ssm_cfg=dict(layer='Mamba2', d_state=16, headdim=16, chunk_size=16, use_mem_eff_path=False))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    for layer in model.backbone.layers:
        layer.mixer = MixtureOfMemories(layer.mixer, num_memories=4, topk=2, init='random')
        torch.nn.init.normal_(layer.mixer.router.weight, std=0.5)
    ids = torch.randint(1, 64, (2, 11))
    params = InferenceParams(max_seqlen=11, max_batch_size=2)
    params.key_value_memory_dict = model.allocate_inference_cache(2, 11)
    pools = [params.key_value_memory_dict[i]['recurrent'].data_ptr() for i in range(2)]
    with torch.no_grad():
        want = model(ids).logits
        got = [model(ids[:, :8], inference_params=params).logits]
        params.seqlen_offset = 8
        for t in range(8, 11):
            got.append(model(ids[:, t:t + 1], inference_params=params).logits)
            params.seqlen_offset += 1
    close(torch.cat(got, 1), want, tol=1e-4)
    # in place: the storage a CUDA graph captured on a decode step reads
    assert [params.key_value_memory_dict[i]['recurrent'].data_ptr() for i in range(2)] == pools
    assert params.key_value_memory_dict[0]['recurrent'].abs().sum() > 0
    # a new prompt (seqlen_offset 0) starts from zero states, in the same pools
    params.seqlen_offset = 0
    with torch.no_grad():
        close(model(ids[:, :5], inference_params=params).logits, want[:, :5], tol=1e-4)
    assert params.key_value_memory_dict[0]['recurrent'].data_ptr() == pools[0]


def test_flattened_input_and_seq_idx():
    mom = wrap(make_host(), init='random').eval()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        full = mom(x)
        close(mom(x.reshape(20, 64), seqlen=10), full.reshape(20, 64), tol=0)
        # two rows, each with two packed sequences: each sequence as its own run
        seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3], dtype=torch.int32)
        packed = mom(x, seq_idx=seq_idx)
        for b, cut in ((0, 4), (1, 7)):
            # fp32 as a batch, and the router's fp32 weights rounded for another row count (tests/routing_rounding.py)
            tol = 1e-6 + routing_rounding(mom, x)
            close(packed[b, :cut], mom(x[b:b + 1, :cut])[0], tol=tol)
            close(packed[b, cut:], mom(x[b:b + 1, cut:])[0], tol=tol)


def test_errors_and_modules():
    host = make_host()
    host.process_group = object()
    with pytest.raises(ValueError, match='process_group'):
        MixtureOfMemories(host, num_memories=2, topk=1)
    mom = wrap(make_host())
    assert not hasattr(mom.host, 'in_proj') and not hasattr(mom.host, 'conv1d')
    assert mom.host.mom_read_proj.out_features == 128 + 16  # z and C rows
    assert set(mom.memories.conv) == {'x', 'B'} and mom.memories.out_features == [128, 16, 8]
    with pytest.raises(ValueError, match='seqlen'):
        mom(torch.randn(21, 64), seqlen=10)
    with pytest.raises(ValueError, match='seq_idx'):
        mom(torch.randn(2, 10, 64), seq_idx=torch.zeros(2, 9, dtype=torch.int32))
    with pytest.raises(TypeError, match='u:'):
        mom([1.0])


@interpreter
def test_decode_steps_update_the_pool_in_place_through_the_step_kernel(monkeypatch):
    """Triton backend, no autograd: a decode step runs scalar_decay_step on the pool's own rows (no gather or
    scatter of states), with the torch backend's result; a padding-free batch of 2 x (top-2 + shared)."""
    import mom_wrap.kernels.scalar_decay as kernels
    calls = []
    step = kernels.scalar_decay_step
    monkeypatch.setattr(kernels, 'scalar_decay_step', lambda *a, **k: calls.append(a[4]) or step(*a, **k))
    mom = wrap(make_host(), init='random').eval()
    x = torch.randn(2, 12, 64)
    outs = {}
    with torch.no_grad():
        for backend in ('torch', 'triton'):
            mom.backend = backend
            outs[backend], params = feed(mom, x, [9, 1, 1, 1])
    close(outs['triton'], outs['torch'], tol=1e-5)
    pool = params.key_value_memory_dict[0]['recurrent']
    assert len(calls) == 3 and all(c.data_ptr() == pool.data_ptr() for c in calls)


def test_supported_hosts_lists_mamba2_only_when_mamba_ssm_is_installed(monkeypatch):
    from mom_wrap import supported_hosts
    from mom_wrap.adapters.mamba2 import Mamba2Adapter
    assert 'mamba_ssm.modules.mamba2.Mamba2' in supported_hosts()
    monkeypatch.setattr(Mamba2Adapter, 'load_host_class', classmethod(lambda cls: None))
    assert 'mamba_ssm.modules.mamba2.Mamba2' not in supported_hosts()
    assert 'fla.layers.rwkv7.RWKV7Attention' in supported_hosts()
    with pytest.raises(ValueError, match=r'supported once its package is installed: mamba_ssm.modules.mamba2.Mamba2'):
        MixtureOfMemories(torch.nn.Linear(4, 4), num_memories=2, topk=1)


def test_use_mem_eff_path_does_not_change_the_wrapped_layer():
    """The wrapper computes the layer itself: a host built with the fused path (which needs causal-conv1d's
    CUDA kernels to run on its own) wraps to the same layer as one without it."""
    fused = make_host(use_mem_eff_path=True)
    plain = copy.deepcopy(fused)
    plain.use_mem_eff_path = False
    x = torch.randn(2, 12, 64)
    outs = []
    for host in (fused, plain):
        torch.manual_seed(1)
        mom = MixtureOfMemories(host, num_memories=3, topk=2, init='random', backend='torch').eval()
        with torch.no_grad():
            outs.append(mom(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
