"""``mom_wrap.import_fla_mom``: fla's own MoM layer (``MomAttention``) and models (``MomForCausalLM`` /
``MomModel``) against their imports as MixtureOfMemories over GatedDeltaNet, fla's eval-mode outputs as the oracle.

CPU (marked ``interpreter``): fla's layers run their Triton kernels under TRITON_INTERPRET=1 (conftest), in
fp32, where the import must agree to 1e-5 of the largest output. Small sizes keep the interpreter quick:
hidden 64, 2 heads of 16, expand_v 0.5 (one 8-wide value block per head in fla's recurrent kernel), T = 20.

fla sorts each token's slots by (sequence, memory) with ``argsort()`` (fla/layers/mom.py:183), not a stable
sort, and relies on it keeping the tokens of a memory in time order. On the CPU torch's default argsort does not
(from 17 elements on, measured: torch 2.13), so fla's own output scrambles time inside a memory there. fla's
forward runs here under ``stable_argsort()``: its intended order, the one our import reproduces.

GPU (marked ``gpu``): the same comparisons at T = 512 on CUDA, fp32 and bf16, fla's default kernels (eval:
chunk), with the paper's layer shape (hidden 1024, 4 heads x 256) so that fla's autotune cache hits.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

from mom_wrap import MixtureOfMemories, import_fla_mom
from mom_wrap.fla_mom import stable_argsort


def cpu_oracle(test):
    """A CPU test with fla's layers as the oracle: their Triton kernels need the interpreter."""
    skip = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1',
                              reason="fla's kernels on the CPU need TRITON_INTERPRET=1 (conftest sets it)")
    return pytest.mark.interpreter(skip(test))


HIDDEN, T = 64, 20
LAYER = dict(hidden_size=HIDDEN, head_dim=16, num_heads=2, expand_v=0.5, num_memories=4, topk=2, shared_mem=True,
             layer_idx=0)
MODEL = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=0.5,
             intermediate_size=128, num_memories=4, topk=2, shared_mem=True, fuse_cross_entropy=False)


def assert_close(got, want, tol):
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err <= tol, f"max abs err {err:.2e} of the largest output (tolerance {tol:.0e})"
    return err


def randomize(module, gate_std=0.5):
    """Make every weight count: fla initialises the norms' weights to ones (conv biases are random already), and
    a stronger router spreads the tokens over all memories."""
    from fla.layers.mom import MomAttention
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.3 * torch.randn_like(p))
        for m in module.modules():
            if isinstance(m, MomAttention):
                nn.init.normal_(m.gate.weight, std=gate_std)
    return module


def fla_layer(**kw):
    from fla.layers.mom import MomAttention
    torch.manual_seed(0)
    return randomize(MomAttention(**{**LAYER, **kw})).eval()


def fla_model(**kw):
    from fla.models import MomConfig, MomForCausalLM
    torch.manual_seed(0)
    return randomize(MomForCausalLM(MomConfig(**{**MODEL, **kw}))).eval()


def left_padding(batch, length, pad=6):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    return mask


_FLA = {}  # fla's outputs, computed once per layer configuration (the interpreter is slow)


def fla_out(attn, x, key, **kw):
    if key not in _FLA:
        with torch.no_grad(), stable_argsort():
            _FLA[key] = attn(x, **kw)[0]
    return _FLA[key]


def layer_inputs(masked):
    torch.manual_seed(1)
    x = torch.randn(2, T, HIDDEN)
    return x, (left_padding(2, T) if masked else None)


# CPU: the layer ------------------------------------------------------------------------------------------------

@cpu_oracle
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_layer_equals_fla(backend, masked):
    """Both backends (the triton one runs fla's fused_recurrent kernel on our packed segments) against fla's
    MomAttention, without and with left padding; padded positions output zeros in both."""
    attn = fla_layer()
    x, mask = layer_inputs(masked)
    want = fla_out(attn, x, ('default', masked), attention_mask=mask)
    mom = import_fla_mom(attn, backend=backend)
    assert isinstance(mom, MixtureOfMemories) and not mom.training
    assert (mom.num_memories, mom.topk, mom.shared_memory, mom.layer_idx) == (4, 2, True, 0)
    with torch.no_grad():
        got = mom(x, attention_mask=mask)[0]
    assert_close(got, want, 1e-5)
    if masked:
        assert got[0, :6].abs().max() == 0 and want[0, :6].abs().max() == 0


LAYER_OPTIONS = {
    'no_shared_mem': dict(shared_mem=False),
    'single_kv_proj': dict(single_kv_proj=True),  # every memory (the shared one too) uses shared_k/v/a/b
    'no_output_gate_conv_bias_top1': dict(use_output_gate=False, conv_bias=True, topk=1),
    'one_memory': dict(num_memories=1, topk=1, shared_mem=False),
}


@cpu_oracle
@pytest.mark.parametrize('option', sorted(LAYER_OPTIONS))
def test_layer_options_equal_fla(option):
    attn = fla_layer(**LAYER_OPTIONS[option])
    x, mask = layer_inputs(masked=True)
    want = fla_out(attn, x, (option, True), attention_mask=mask)
    mom = import_fla_mom(attn, backend='torch')
    assert mom.shared_memory == attn.shared_mem and mom.topk == attn.topk
    with torch.no_grad():
        assert_close(mom(x, attention_mask=mask)[0], want, 1e-5)


@cpu_oracle
def test_packed_sequences_equal_fla():
    """Packed input (``cu_seqlens``, batch 1): fla turns it into a left-padded batch and back, we run it as is."""
    attn = fla_layer()
    torch.manual_seed(2)
    x = torch.randn(1, T, HIDDEN)
    cu = torch.tensor([0, 7, T])
    want = fla_out(attn, x, ('packed', False), cu_seqlens=cu)
    with torch.no_grad():
        assert_close(import_fla_mom(attn, backend='torch')(x, cu_seqlens=cu)[0], want, 1e-5)


@cpu_oracle
def test_cached_decode_equals_fla_full_forward():
    """Prefill then one token at a time through fla's Cache: per memory the q conv state too (q is on the write
    side), equal to fla's full forward."""
    from fla.models.utils import Cache
    attn = fla_layer()
    x, _ = layer_inputs(masked=False)
    want = fla_out(attn, x, ('default', False))
    mom = import_fla_mom(attn, backend='torch')
    cache = Cache()
    with torch.no_grad():
        out = [mom(x[:, :16], past_key_values=cache, use_cache=True)[0]]
        out += [mom(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(16, T)]
    assert_close(torch.cat(out, 1), want, 1e-5)
    assert set(cache[0]['conv_state']['write']) == {'q', 'k', 'v'} and not cache[0]['conv_state']['read']


@cpu_oracle
def test_q_per_memory_is_what_fla_computes():
    """The same weights under the registered GatedDeltaNet adapter (q projected and convolved once per token,
    over the whole sequence) do not give fla's output: fla convolves q over each memory's own tokens."""
    from fla.layers import GatedDeltaNet
    attn = fla_layer()
    x, _ = layer_inputs(masked=False)
    want = fla_out(attn, x, ('default', False))
    imported = import_fla_mom(attn, backend='torch')
    host = GatedDeltaNet(hidden_size=HIDDEN, head_dim=16, num_heads=2, expand_v=0.5, layer_idx=0)
    plain = MixtureOfMemories(host, num_memories=4, topk=2, shared_memory=True, backend='torch').eval()
    assert plain.adapter_path is None and imported.adapter_path == 'mom_wrap.fla_mom.FlaMomAdapter'
    with torch.no_grad():
        host.q_proj.weight.copy_(attn.q_proj.weight)
        host.q_conv1d.weight.copy_(attn.q_conv1d.weight)
        for name in ('A_log', 'dt_bias', 'g_proj.weight', 'o_norm.weight', 'o_proj.weight'):
            plain.get_parameter(f'host.{name}').copy_(imported.get_parameter(f'host.{name}'))
        plain.router.weight.copy_(imported.router.weight)
        theirs = imported.memories.proj
        for name in ('k', 'v', 'a', 'b'):
            plain.memories.proj[name].copy_(theirs[name])
        for name in ('k', 'v'):
            plain.memories.conv[name].copy_(imported.memories.conv[name])
        got = plain(x)[0]
    assert ((got - want).abs().max() / want.abs().max()).item() > 0.05


@cpu_oracle
def test_fla_training_mode_convs_leak_across_sequences_ours_do_not(monkeypatch):
    """The module docstring's claim: in training mode fla's routed q/k/v convs run over the packed stream of all
    segments (no cu_seqlens, fla/layers/mom.py:519-520), so sequence 0's last token reaches sequence 1's first
    tokens of the same memory; in eval mode, and in ours in either mode, nothing crosses sequences. (fla's chunk
    kernel does not run under the interpreter; its recurrent kernel, the same recurrence per segment, stands in.)"""
    import fla.layers.mom as fla_mom_layer
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    monkeypatch.setattr(fla_mom_layer, 'chunk_gated_delta_rule', lambda **kw: fused_recurrent_gated_delta_rule(**kw))
    attn = fla_layer(num_memories=2, topk=1)
    mom = import_fla_mom(attn, backend='torch')
    torch.manual_seed(3)
    x = torch.randn(2, 8, HIDDEN)
    y = x.clone()
    y[0, -1] += 1.0  # only sequence 0's last token changes

    def change_in_sequence_1(layer, training):
        layer.train(training)
        with torch.no_grad(), stable_argsort():
            return (layer(x)[0][1] - layer(y)[0][1]).abs().max().item()

    assert change_in_sequence_1(attn, False) == 0
    assert change_in_sequence_1(attn, True) > 1e-3
    assert change_in_sequence_1(mom, False) == 0 and change_in_sequence_1(mom, True) == 0


# CPU: models ---------------------------------------------------------------------------------------------------

@cpu_oracle
def test_model_logits_equal_fla():
    """A 2-layer MomForCausalLM -> GatedDeltaNetForCausalLM (MomGatedDeltaNetForCausalLM once marked): the same
    logits; its MomModel -> GatedDeltaNetModel: the same last hidden state. One row left-padded (the layer tests
    cover inputs without a mask; fla's model forward costs seconds under the interpreter)."""
    from fla.models import GatedDeltaNetForCausalLM, GatedDeltaNetModel
    model = fla_model()
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (2, T))
    mask = left_padding(2, T, pad=5)
    with torch.no_grad(), stable_argsort():
        want = model(ids, attention_mask=mask, output_hidden_states=True)
    ours = import_fla_mom(model)
    assert isinstance(ours, GatedDeltaNetForCausalLM) and type(ours).__name__ == 'MomGatedDeltaNetForCausalLM'
    assert [type(b.attn) for b in ours.model.layers] == [MixtureOfMemories] * 2
    assert ours.config.mom == {'num_memories': 4, 'topk': 2, 'shared_memory': True, 'balance_loss_weight': 0.01,
                               'backend': 'auto', 'recurrence_parts': 1, 'adapter': 'mom_wrap.fla_mom.FlaMomAdapter',
                               'layers': [0, 1], 'init': None}
    base = import_fla_mom(model.model)
    assert isinstance(base, GatedDeltaNetModel) and type(base).__name__ == 'MomGatedDeltaNetModel'
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask).logits, want.logits, 1e-5)
        assert_close(base(ids, attention_mask=mask).last_hidden_state, want.hidden_states[-1], 1e-5)
    # copies: the import shares no storage with the source
    src = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in src for p in ours.parameters())


@cpu_oracle
def test_imported_model_round_trip(tmp_path):
    """save_pretrained / from_pretrained of an imported model (tied embeddings): config.json names the variant
    adapter, loading rebuilds it, the logits are bit for bit the same."""
    from transformers import AutoModelForCausalLM
    model = fla_model(tie_word_embeddings=True)
    ours = import_fla_mom(model)
    assert ours.lm_head.weight is ours.model.embeddings.weight
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        want = ours(ids).logits
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['mom']['adapter'] == 'mom_wrap.fla_mom.FlaMomAdapter'
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded) is type(ours) and loaded.lm_head.weight is loaded.model.embeddings.weight
    assert all(m.adapter_path == 'mom_wrap.fla_mom.FlaMomAdapter' for m in loaded.modules()
               if isinstance(m, MixtureOfMemories))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, want)


# errors ------------------------------------------------------------------------------------------------------

def test_errors():
    from fla.layers import DeltaNet, GatedDeltaNet

    from mom_wrap.convert import convert_from_settings
    from mom_wrap.fla_mom import FlaMomAdapter
    with pytest.raises(TypeError, match="module: expected fla's MomAttention, MomForCausalLM or MomModel"):
        import_fla_mom(GatedDeltaNet(hidden_size=HIDDEN, head_dim=16, num_heads=2, layer_idx=0))

    attn = fla_layer()
    attn.use_short_conv = False  # fla refuses it at construction; its forward would skip the SiLU
    with pytest.raises(ValueError, match='use_short_conv'):
        import_fla_mom(attn)
    attn = fla_layer()
    attn.k_proj[2] = nn.Linear(HIDDEN, attn.key_dim, bias=True)
    with pytest.raises(ValueError, match=r'k_proj: projections with a bias are not supported \(memory 2\)'):
        import_fla_mom(attn)

    model = fla_model(num_hidden_layers=1)
    model.config.attn = {'layers': [0], 'num_heads': 2}
    with pytest.raises(ValueError, match=r'attn: MoM models with standard attention layers'):
        import_fla_mom(model)
    model = fla_model(num_hidden_layers=1)
    model.config.attnres_block_size = 2
    with pytest.raises(ValueError, match='attnres_block_size'):
        import_fla_mom(model)
    model.config.attnres_block_size = None
    model.config.mom_backend = 'deltanet'
    with pytest.raises(ValueError, match="mom_backend: only 'gated_deltanet'"):
        import_fla_mom(model)

    # the wrapper's hook
    with pytest.raises(ValueError, match='adapter: FlaMomAdapter does not take a DeltaNet host'):
        MixtureOfMemories(DeltaNet(hidden_size=HIDDEN, num_heads=2, layer_idx=0), 2, 1, adapter=FlaMomAdapter)
    with pytest.raises(TypeError, match='adapter: expected a HostAdapter subclass'):
        MixtureOfMemories(GatedDeltaNet(hidden_size=HIDDEN, head_dim=16, num_heads=2, layer_idx=0), 2, 1,
                          adapter='mom_wrap.fla_mom.FlaMomAdapter')
    settings = dict(num_memories=2, topk=1, shared_memory=True, layers=None, adapter='os.path.join')
    with pytest.raises(ValueError, match="adapter: 'os.path.join' is not a registered adapter"):  # never imported
        convert_from_settings(nn.ModuleList([GatedDeltaNet(hidden_size=HIDDEN, head_dim=16, num_heads=2)]), settings)


# GPU ---------------------------------------------------------------------------------------------------------

GPU_LAYER = dict(hidden_size=1024, head_dim=256, num_heads=4, expand_v=1, num_memories=4, topk=2, shared_mem=True,
                 layer_idx=0)
GPU_TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # (set for fp32 dots in TF32; tests/conftest.py: IEEE)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact_bf16_router(gate: nn.Linear, dims, scale=1.0) -> None:
    """Row m reads hidden dim dims[m] with weight ``scale`` (a power of 2): the logit is then one product, exact
    in fla's bf16 gate (mom.py:471) as in our fp32 router, so both pick the same memories (otherwise a token
    whose k-th and (k+1)-th logits are within bf16 rounding may route differently: see mom_wrap.fla_mom)."""
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[torch.arange(len(dims)), torch.as_tensor(dims)] = scale


@pytest.mark.gpu
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gpu_layer_equals_fla(dtype, masked):
    from fla.layers.mom import MomAttention
    torch.manual_seed(0)
    attn = randomize(MomAttention(**GPU_LAYER), gate_std=0.05).to('cuda', dtype).eval()
    if dtype == torch.bfloat16:
        exact_bf16_router(attn.gate, [3, 100, 517, 900])
    B, L = 2, 512
    x = torch.randn(B, L, 1024, device='cuda', dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.long, device='cuda')
        mask[1, :100] = 0
    with torch.no_grad():
        with stable_argsort():
            want = attn(x, attention_mask=mask)[0]
        unpatched = attn(x, attention_mask=mask)[0]  # fla with torch's own sort, for the record
        mom = import_fla_mom(attn)
        got = mom(x, attention_mask=mask)[0]
    err = rel_err(got, want)
    print(f"\n{dtype} masked={masked}: import vs fla {err:.1e}; fla's unstable vs stable sort "
          f"{rel_err(unpatched, want):.1e}")
    assert err < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gpu_model_logits_equal_fla(dtype):
    """A 2-layer MomForCausalLM at T = 512, left padding in one row. Routing made decisive (each memory's router
    row reads one hidden dim, where the embeddings put 0, 8, 16, 24 in a per-token order, far above what the
    layers add): the two models' hidden states differ at rounding level in layer 2, which must not flip a
    memory."""
    from fla.models import MomConfig, MomForCausalLM
    torch.manual_seed(0)
    cfg = MomConfig(vocab_size=256, hidden_size=1024, num_hidden_layers=2, num_heads=4, head_dim=256, expand_v=1,
                    intermediate_size=1024, num_memories=4, topk=2, shared_mem=True, fuse_cross_entropy=False)
    model = randomize(MomForCausalLM(cfg))
    dims = [3, 100, 517, 900]
    with torch.no_grad():
        emb = model.model.embeddings.weight
        emb[:, dims] = 8.0 * torch.stack([torch.randperm(4) for _ in range(emb.shape[0])]).to(emb.dtype)
        for layer in model.model.layers:
            exact_bf16_router(layer.attn.gate, dims, scale=0.125)
            layer.attn_norm.weight.copy_(torch.ones_like(layer.attn_norm.weight))
    model = model.to('cuda', dtype).eval()
    ids = torch.randint(0, 256, (2, 512), device='cuda')
    mask = torch.ones(2, 512, dtype=torch.long, device='cuda')
    mask[0, :64] = 0
    with torch.no_grad():
        with stable_argsort():
            want = model(ids, attention_mask=mask).logits
        ours = import_fla_mom(model)
        got = ours(ids, attention_mask=mask).logits
    err = rel_err(got, want)
    print(f"\n{dtype} model logits: import vs fla {err:.1e}")
    assert err < GPU_TOL[dtype]
