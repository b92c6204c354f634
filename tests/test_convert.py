"""``mom_wrap.convert`` on whole models, and the round trips of converted models: fla models through transformers
(``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``), mamba-ssm's ``MambaLMHeadModel`` through
``save_mamba`` / ``load_mamba``. Round trips give back the same modules, settings, weights and logits (fp32,
bit for bit), with no key missing or unexpected."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import mom_wrap
from mom_wrap import MixtureOfMemories, convert, set_balance_loss_weight
from mom_wrap.wrapper import INITS
from tests import hosts
from tests.test_models import MODELS, host_model, host_slots, model_params

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")
needs_preserve = pytest.mark.skipif('preserve' not in INITS, reason='init="preserve" not in mom_wrap yet')

FAMILY = {'GatedDeltaNet': 'gated_deltanet', 'GatedLinearAttention': 'gla', 'DeltaNet': 'delta_net',
          'LinearAttention': 'linear_attn', 'GatedSlotAttention': 'gsa', 'MultiScaleRetention': 'retnet',
          'HGRN2Attention': 'hgrn2', 'KimiDeltaAttention': 'kda', 'fla.Mamba2': 'mamba2', 'fla.Mamba3': 'mamba3',
          'RWKV6Attention': 'rwkv6', 'RWKV7Attention': 'rwkv7'}  # host -> fla model_type
SETTINGS = dict(num_memories=3, topk=2, shared_memory=True, balance_loss_weight=0.05)  # not the defaults


def moms(model):
    return [m for m in model.modules() if isinstance(m, MixtureOfMemories)]


def perturb(model):
    """Make every MoM parameter count: memories unlike each other and the host, routing away from uniform; a
    parameter that loading missed or swapped then changes the logits."""
    with torch.no_grad():
        for mom in moms(model):
            for p in mom.memories.parameters():
                p.add_(0.2 * p.abs().mean().clamp_min(0.05) * torch.randn_like(p))
            nn.init.normal_(mom.router.weight, std=0.5)


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_same_settings(model, want: dict, layers):
    assert sorted(m.layer_idx for m in moms(model)) == layers
    for m in moms(model):
        for key, value in want.items():
            assert getattr(m, key) == value, (key, getattr(m, key), value)


def assert_same_weights(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def mamba_model(**kw):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    options = dict(d_model=64, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8, rms_norm=True,
                   fused_add_norm=False, residual_in_fp32=True,
                   ssm_cfg=dict(layer='Mamba2', d_state=16, headdim=16, chunk_size=16, use_mem_eff_path=False))
    cfg = MambaConfig(**{**options, **kw})
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    with torch.no_grad():  # D and the norms' weights start at ones: make them count
        for layer in model.backbone.layers:
            layer.mixer.D.add_(0.3 * torch.randn_like(layer.mixer.D))
            layer.mixer.norm.weight.add_(0.3 * torch.randn_like(layer.mixer.norm.weight))
    return model


# convert ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('host', model_params())
def test_convert_wraps_every_host_layer(host):
    model = host_model(host)
    hosts = [getattr(block, name) for block, name in host_slots(model)]
    assert convert(model, init='copy', **SETTINGS) is model
    assert [getattr(block, name).host for block, name in host_slots(model)] == hosts
    assert_same_settings(model, SETTINGS, [0, 1])
    import fla.models
    assert type(model).__name__ == f'Mom{MODELS[host][1]}' and isinstance(model, getattr(fla.models, MODELS[host][1]))
    assert model.config.model_type == 'mom_' + FAMILY[host]
    assert model.config.mom == {**SETTINGS, 'backend': 'auto', 'recurrence_parts': 1, 'layers': [0, 1], 'init': 'copy'}


def test_convert_only_listed_layers():
    model = host_model('GatedLinearAttention')
    convert(model, num_memories=2, topk=1, shared_memory=False, init='copy', layers=[1])
    assert type(model.model.layers[0].attn).__name__ == 'GatedLinearAttention'
    assert isinstance(model.model.layers[1].attn, MixtureOfMemories)
    assert model.config.mom['layers'] == [1]


def test_convert_finds_host_layers_anywhere_and_shared_ones_once():
    """Generic search: host layers in any container, one module reachable by two paths wrapped once; layers
    without a layer_idx are recorded as layers=None (all of them)."""
    from fla.layers import GatedLinearAttention
    from mom_wrap.convert import mom_settings
    a, b = GatedLinearAttention(hidden_size=64, num_heads=2, layer_idx=0), \
        GatedLinearAttention(hidden_size=64, num_heads=2, layer_idx=1)
    model = nn.ModuleDict({'blocks': nn.ModuleList([nn.Sequential(nn.Linear(64, 64), a)]), 'x': b, 'alias': b})
    convert(model, num_memories=2, topk=1, init='copy')
    assert model['blocks'][0][1].host is a and model['x'].host is b and model['alias'] is model['x']
    assert len(moms(model)) == 2 and mom_settings(model)['layers'] == [0, 1]
    anonymous = nn.ModuleList([GatedLinearAttention(hidden_size=64, num_heads=2) for _ in range(2)])
    convert(anonymous, num_memories=2, topk=1, init='copy')
    assert len(moms(anonymous)) == 2 and mom_settings(anonymous)['layers'] is None


def test_random_memories_start_as_the_model_initialises_its_layers():
    """``convert(init="random")`` draws each memory's write-side weights, convs included, and the router through the
    model's own initialiser (fla's models: N(0, initializer_range)), as the model drew the host's; a layer wrapped on
    its own takes the modules' reset_parameters (PyTorch's defaults: the short conv's taps 14x larger here); an
    explicit ``initializer`` wins; anything but a function is refused."""
    import fla.models as models
    cfg = models.GatedDeltaNetConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=64,
                                     expand_v=1, initializer_range=0.02, fuse_cross_entropy=False)
    torch.manual_seed(0)
    model = convert(models.GatedDeltaNetForCausalLM(cfg), num_memories=4, topk=2, init='random')
    for mom in moms(model):
        for t in [mom.memories.weight, mom.router.weight, *mom.memories.conv.values()]:
            assert abs(t.std().item() / 0.02 - 1) < 0.1, t.shape
    alone = MixtureOfMemories(models.GatedDeltaNetForCausalLM(cfg).model.layers[0].attn, 4, 2, init='random')
    assert all(w.std().item() > 0.2 for w in alone.memories.conv.values())  # kaiming-uniform over 4 taps
    assert abs(alone.memories.weight.std().item() - 1 / (3 * 128) ** 0.5) < 0.005
    mine = convert(models.GatedDeltaNetForCausalLM(cfg), num_memories=4, topk=2, init='random',
                   initializer=lambda m: [torch.nn.init.constant_(p, 0.5) for p in m.parameters()])
    assert all((mom.memories.weight == 0.5).all() and (mom.router.weight == 0.5).all() for mom in moms(mine))
    assert 'initializer' not in mine.config.mom  # (not a setting: nothing to save)
    with pytest.raises(TypeError, match='initializer: expected a function of a module'):
        MixtureOfMemories(models.GatedDeltaNetForCausalLM(cfg).model.layers[0].attn, 4, 2, initializer=0.02)


def test_convert_errors():
    with pytest.raises(ValueError, match='model: no supported host layer'):
        convert(nn.Sequential(nn.Linear(4, 4)))
    from fla.layers import GatedLinearAttention
    with pytest.raises(ValueError, match='model: is itself a host layer'):
        convert(GatedLinearAttention(hidden_size=64, num_heads=2, layer_idx=0), init='copy')

    model = host_model('GatedLinearAttention')
    for layers in ([2], [-1], [0, 5]):
        with pytest.raises(ValueError, match=r'layers: layer -?\d is out of range \(the model has 2 layers\)'):
            convert(model, init='copy', layers=layers)
    with pytest.raises(ValueError, match='layers: empty'):
        convert(model, init='copy', layers=[])
    with pytest.raises(TypeError, match='layers'):
        convert(model, init='copy', layers=['0'])
    with pytest.raises(ValueError, match='topk'):  # the wrapper's own checks, before any layer changes
        convert(model, num_memories=2, topk=3, init='copy')
    assert not moms(model) and type(model.model.layers[0].attn).__name__ == 'GatedLinearAttention'

    model.model.layers[1].attn = nn.Linear(64, 64)  # a hybrid model: layer 1 is no host layer
    with pytest.raises(ValueError, match=r'layers: layer 1 is not a host layer \(host layers: \[0\]\)'):
        convert(model, init='copy', layers=[1])
    convert(model, init='copy')
    assert model.config.mom['layers'] == [0]
    convert(model)  # converted already, nothing left to wrap: the same settings, recorded again
    assert model.config.mom['layers'] == [0] and model.config.mom['init'] == 'copy'
    with pytest.raises(ValueError, match=r'num_memories: the model.s MixtureOfMemories layers have num_memories=4, '
                                         r'got 3'):
        convert(model, num_memories=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'topK'"):
        convert(model, topK=3)


@needs_preserve
@pytest.mark.parametrize('host', [*model_params(host_forward=True), hosts.param('Mamba2')])
def test_convert_default_preserves_the_logits(host):
    model = mamba_model() if host == 'Mamba2' else host_model(host)
    ids = torch.randint(0, 64, (2, 10))
    want = logits(model, ids)
    convert(model)
    assert model.config.mom['init'] == 'preserve' and len(moms(model)) == 2
    got = logits(model, ids)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()  # fp32


# fla models through transformers -------------------------------------------------------------------------------

def save_and_load(model, path, **kwargs):
    from transformers import AutoModelForCausalLM
    model.save_pretrained(path)
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    return loaded


@pytest.mark.parametrize('host', model_params())
def test_fla_round_trip(host, tmp_path):
    model = host_model(host)
    convert(model, init='copy', **SETTINGS)
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    want = logits(model, ids)
    loaded = save_and_load(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == ['config.json', 'generation_config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['model_type'] == 'mom_' + FAMILY[host]
    assert config['mom'] == {**SETTINGS, 'backend': 'auto', 'recurrence_parts': 1, 'layers': [0, 1], 'init': 'copy'}

    assert type(loaded) is type(model) and type(loaded.config) is type(model.config)
    assert_same_settings(loaded, SETTINGS, [0, 1])
    assert loaded.config.mom == config['mom']
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded, ids), want)


def test_fla_round_trip_listed_layers_and_later_settings(tmp_path):
    """Only layer 1 converted; a balance-loss weight set after convert is what gets saved; a loaded model saves
    and loads again."""
    model = host_model('RWKV7Attention')
    convert(model, num_memories=2, topk=1, shared_memory=False, init='copy', layers=[1])
    perturb(model)
    set_balance_loss_weight(model, 0.0)
    ids = torch.randint(0, 64, (2, 10))
    want = logits(model, ids)
    loaded = save_and_load(model, tmp_path / 'a')
    settings = dict(num_memories=2, topk=1, shared_memory=False, balance_loss_weight=0.0)
    assert_same_settings(loaded, settings, [1])
    assert type(loaded.model.layers[0].attn).__name__ == 'RWKV7Attention'
    again = save_and_load(loaded, tmp_path / 'b')
    assert_same_settings(again, settings, [1])
    assert torch.equal(logits(again, ids), want)


def test_fla_base_model_and_from_config(tmp_path):
    """The base model (``...Model``) converts and loads through AutoModel; ``from_config`` of a converted config
    builds the converted model (its init as recorded) with the same parameters."""
    from transformers import AutoModel, AutoModelForCausalLM
    lm = host_model('GatedDeltaNet')
    base = convert(lm.model, init='copy', **SETTINGS)
    assert type(base).__name__ == 'MomGatedDeltaNetModel'
    base.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded) is type(base)
    assert_same_weights(loaded, base)

    fresh = AutoModelForCausalLM.from_config(loaded.config)
    assert type(fresh).__name__ == 'MomGatedDeltaNetForCausalLM'
    assert_same_settings(fresh, SETTINGS, [0, 1])
    assert {k: v.shape for k, v in fresh.model.state_dict().items()} == \
        {k: v.shape for k, v in base.state_dict().items()}


def test_fla_save_refuses_layers_with_different_settings(tmp_path):
    model = convert(host_model('GatedLinearAttention'), init='copy')
    model.model.layers[0].attn.balance_loss_weight = 0.5
    with pytest.raises(ValueError, match='model: its MixtureOfMemories layers differ in balance_loss_weight'):
        model.save_pretrained(tmp_path)


def test_fla_load_in_a_fresh_process(tmp_path):
    """``import mom_wrap`` alone (fla's models not imported yet: registration is lazy) is enough for
    AutoModelForCausalLM to load a converted checkpoint."""
    model = host_model('RWKV7Attention')
    convert(model, init='copy', **SETTINGS)
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    model.save_pretrained(tmp_path)
    torch.save({'ids': ids, 'logits': logits(model, ids)}, tmp_path / 'want.pt')
    script = f"""
import sys, torch
from mom_wrap.interpret import interpret_on_cpu
interpret_on_cpu()
import mom_wrap
assert 'fla.models' not in sys.modules
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, output_loading_info=True)
assert not any(info.values()), info
assert type(model).__name__ == 'MomRWKV7ForCausalLM', type(model)
want = torch.load({str(tmp_path / 'want.pt')!r})
with torch.no_grad():
    assert torch.equal(model.eval()(want['ids']).logits, want['logits'])
print('ok')
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, '-c', script], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert run.returncode == 0 and run.stdout.strip().endswith('ok'), run.stderr[-3000:]


def test_every_fla_family_loads_after_import_mom_wrap_alone():
    """``import mom_wrap`` registers a placeholder for the Mom type of every model type fla defines (read from fla's
    files, without importing its models): each is one that fla's models register, and resolves to its Mom class."""
    import fla.models
    from transformers import AutoConfig, PreTrainedConfig
    from mom_wrap import hf
    registered = {c.model_type for c in vars(fla.models).values()
                  if isinstance(c, type) and issubclass(c, PreTrainedConfig)}
    assert set(hf.fla_model_types()) == registered
    config = AutoConfig.for_model('mom_hgrn2', mom=dict(num_memories=2, topk=1, shared_memory=True, layers=[0]))
    assert type(config).__name__ == 'MomHGRN2Config' and type(config).__mro__[1] is fla.models.HGRN2Config


def test_convert_more_layers_of_a_converted_model(tmp_path):
    """A converted model takes more layers with its settings (those given must equal them), and saves and loads with
    all of them."""
    model = host_model('GatedLinearAttention')
    convert(model, layers=[1], init='copy', **SETTINGS)
    first = model.model.layers[1].attn
    with pytest.raises(ValueError, match=r'topk: the model.s MixtureOfMemories layers have topk=2, got 1'):
        convert(model, layers=[0], topk=1)
    assert type(model.model.layers[0].attn).__name__ == 'GatedLinearAttention'  # nothing changed
    convert(model, layers=[0, 1])  # layer 1 is converted already: it stays as it is
    assert model.model.layers[1].attn is first
    assert_same_settings(model, SETTINGS, [0, 1])
    assert model.config.mom == {**SETTINGS, 'backend': 'auto', 'recurrence_parts': 1, 'layers': [0, 1], 'init': 'copy'}
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    loaded = save_and_load(model, tmp_path)
    assert_same_settings(loaded, SETTINGS, [0, 1])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_layers_wrapped_by_hand_save_and_load_converted_after_convert_records_them(tmp_path):
    """README's recipe wraps the layers by hand; ``convert(model)`` then wraps nothing more and records their settings
    (the init is unknown: None), so that the model saves and loads converted (it reloaded as the plain model with
    random attention weights)."""
    model = host_model('DeltaNet')
    for layer in model.model.layers:
        layer.attn = MixtureOfMemories(layer.attn, num_memories=3, topk=2, init='random', balance_loss_weight=0.05)
    convert(model)
    assert [layer.attn.num_memories for layer in model.model.layers] == [3, 3]
    assert model.config.model_type == 'mom_delta_net'
    assert model.config.mom == {**SETTINGS, 'backend': 'auto', 'recurrence_parts': 1, 'layers': [0, 1], 'init': None}
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    loaded = save_and_load(model, tmp_path)
    assert type(loaded) is type(model)
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


CUSTOM_LOAD = """
import sys, torch
from mom_wrap.interpret import interpret_on_cpu
interpret_on_cpu()
import mom_wrap
from transformers import AutoModelForCausalLM
from tests.custom_family import CustomConfig  # the user's package registers its family
path, register = sys.argv[1], sys.argv[2] == 'register'
if register:
    mom_wrap.hf.register(CustomConfig)
try:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
except ValueError as e:  # transformers: the architecture is not recognised
    print('refused:', e)
    raise SystemExit
assert not any(info.values()), info
want = torch.load(path + '/want.pt')
with torch.no_grad():
    assert torch.equal(model.eval()(want['ids']).logits, want['logits'])
print('loaded', type(model).__name__)
"""


def test_a_model_family_of_the_users_own_round_trips(tmp_path):
    """A transformers family outside fla's (tests/custom_family.py) converts, saves as ``mom_<its type>`` and loads
    converted: in the same process, and in a fresh one once ``mom_wrap.hf.register`` knows its config class; without
    that, transformers refuses the checkpoint (it never loads as the plain model with its MoM weights dropped)."""
    from transformers import AutoModelForCausalLM
    from tests.custom_family import CustomConfig, CustomForCausalLM
    model = CustomForCausalLM(CustomConfig()).eval()
    convert(model, init='copy', **SETTINGS)
    assert type(model).__name__ == 'MomCustomForCausalLM' and isinstance(model, CustomForCausalLM)
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    loaded = save_and_load(model, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'mom_mom_wrap_test_custom'
    assert type(loaded) is type(model)
    assert_same_settings(loaded, SETTINGS, [0, 1])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert type(AutoModelForCausalLM.from_config(loaded.config)) is type(model)

    torch.save({'ids': ids, 'logits': logits(model, ids)}, tmp_path / 'want.pt')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mode, want in (('register', 'loaded MomCustomForCausalLM'), ('plain', 'refused:')):
        run = subprocess.run([sys.executable, '-c', CUSTOM_LOAD, str(tmp_path), mode], cwd=root, capture_output=True,
                             text=True, timeout=300, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
        assert run.returncode == 0 and want in run.stdout, run.stderr[-3000:]
    assert 'mom_mom_wrap_test_custom' in run.stdout  # transformers' error names the type


def test_loading_without_an_adapter_for_the_layers_is_refused(tmp_path):
    """A converted checkpoint whose host layers no registered adapter takes (a user's adapter not imported) is
    refused with a clear error, not loaded half converted."""
    from transformers import AutoModelForCausalLM
    from mom_wrap.adapters.registry import _REGISTRY
    model = convert(host_model('GatedLinearAttention'), init='copy')
    model.save_pretrained(tmp_path)
    registered = list(_REGISTRY)
    _REGISTRY[:] = [a for a in registered if not a.host_class.endswith('.GatedLinearAttention')]
    try:
        with pytest.raises(ValueError, match=r"config: the 'mom' settings convert layers \[0, 1\] of this "
                                             r"MomGLAForCausalLM, but no registered adapter takes a layer of it"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        _REGISTRY[:] = registered


# mamba-ssm ---------------------------------------------------------------------------------------------------

@pytest.mark.mamba_ssm
@pytest.mark.parametrize('writer', ['save_mamba', 'mamba_ssm_save_pretrained'])
def test_mamba_round_trip(writer, tmp_path):
    model = mamba_model()
    convert(model, init='copy', **SETTINGS)
    assert [type(layer.mixer) for layer in model.backbone.layers] == [MixtureOfMemories] * 2
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    want = logits(model, ids)
    if writer == 'save_mamba':
        mom_wrap.save_mamba(model, tmp_path)
        assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
    else:
        model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['mom'] == {**SETTINGS, 'backend': 'auto', 'recurrence_parts': 1, 'layers': [0, 1], 'init': 'copy'}
    loaded = mom_wrap.load_mamba(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight  # tied, as built
    assert_same_settings(loaded, SETTINGS, [0, 1])
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded, ids), want)


@pytest.mark.mamba_ssm
def test_mamba_listed_layers_round_trip_and_errors(tmp_path):
    model = mamba_model(tie_embeddings=False)
    with pytest.raises(ValueError, match='model: .* no MixtureOfMemories layer'):
        mom_wrap.save_mamba(model, tmp_path / 'plain')
    with pytest.raises(ValueError, match=r'layers: layer 2 is out of range \(the model has 2 layers\)'):
        convert(model, init='copy', layers=[2])
    convert(model, num_memories=2, topk=1, init='copy', layers=[0])
    assert type(model.backbone.layers[1].mixer).__name__ == 'Mamba2'
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    mom_wrap.save_mamba(model, tmp_path / 'mom')
    loaded = mom_wrap.load_mamba(tmp_path / 'mom')
    assert_same_settings(loaded, dict(num_memories=2, topk=1), [0])
    assert type(loaded.backbone.layers[1].mixer).__name__ == 'Mamba2'
    assert torch.equal(logits(loaded, ids), logits(model, ids))

    (tmp_path / 'plain').mkdir()
    (tmp_path / 'plain' / 'config.json').write_text(json.dumps({'d_model': 64}))
    with pytest.raises(ValueError, match="directory: .* has no 'mom' settings"):
        mom_wrap.load_mamba(tmp_path / 'plain')


# fine-tuning and generating after conversion -------------------------------------------------------------------

@needs_preserve
@pytest.mark.parametrize('host', ['GatedDeltaNet', 'RWKV7Attention', hosts.param('Mamba2')])
def test_fine_tuning_a_converted_model_lowers_the_loss_and_moves_the_routed_memories(host):
    """A few AdamW steps on a synthetic next-token task: the loss falls and the routed memories' silenced
    stage (zero after convert) moves off zero."""
    # (mamba-ssm's Triton RMSNorm between blocks asks for CUDA in its backward: torch's LayerNorm there)
    model = mamba_model(rms_norm=False) if host == 'Mamba2' else host_model(host)
    convert(model)
    layers = moms(model)
    silenced = [m.memories.last_stage(m._adapter.silent_projection) for m in layers]
    assert all(t[:m.num_memories].abs().sum() == 0 for m, ts in zip(layers, silenced) for t in ts)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        out = model(ids).logits
        loss = nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(t[:m.num_memories].abs().sum() > 0 for m, ts in zip(layers, silenced) for t in ts)


@needs_preserve
def test_converted_model_generate_equals_full_forward_greedy_decoding():
    from tests.test_generation import left_padded_prompts
    from tests.test_models import generate_matches_full_forwards
    model = host_model('GatedDeltaNet')
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        nn.init.normal_(w, std=1.0)  # separated logits: no near-tie for argmax to flip on rounding
    model.generation_config.eos_token_id = None
    convert(model)
    perturb(model)  # routed memories that write something, so the cache has more than the host's to carry
    ids, mask = left_padded_prompts([8, 5], 8)
    generate_matches_full_forwards(model, ids, mask, new=4)
