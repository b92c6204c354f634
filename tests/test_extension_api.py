"""The extension API: registering an adapter (``register_adapter``: registered or a variant; the
``mom_wrap.adapters`` entry point group), and an adapter named in ``MixtureOfMemories``, ``convert``, ``run_checks``
and a saved model's config."""
import importlib.metadata
import os

import pytest
import torch

from mom_wrap import MixtureOfMemories, convert
from mom_wrap.adapters import registry
from mom_wrap.adapters.gla import GatedLinearAttentionAdapter
from tests.extension_example import MyGLAAdapter, NotInstalledAdapter
from tests.test_convert import logits, perturb, save_and_load
from tests.test_models import host_model

needs_host_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                        reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry as it is, restored after the test (which may register and load entry points)."""
    monkeypatch.setattr(registry, '_REGISTRY', list(registry._REGISTRY))
    monkeypatch.setattr(registry, '_VARIANTS', list(registry._VARIANTS))
    monkeypatch.setattr(registry, '_entry_points_loaded', registry._entry_points_loaded)


def gla_layer():
    from fla.layers import GatedLinearAttention
    return GatedLinearAttention(hidden_size=64, num_heads=2, layer_idx=0)


def test_register_a_variant_used_only_where_named(clean_registry):
    assert registry.register_adapter(variant=True)(MyGLAAdapter) is MyGLAAdapter
    registry.register_adapter(MyGLAAdapter, variant=True)  # twice: no-op
    assert registry._VARIANTS.count(MyGLAAdapter) == 1 and MyGLAAdapter not in registry.registered_adapters()
    assert type(MixtureOfMemories(gla_layer(), 2, 1)._adapter) is GatedLinearAttentionAdapter
    mom = MixtureOfMemories(gla_layer(), 2, 1, adapter=MyGLAAdapter)
    assert type(mom._adapter) is MyGLAAdapter and mom.adapter_path == 'tests.extension_example.MyGLAAdapter'
    assert registry.adapter_by_path('tests.extension_example.MyGLAAdapter') is MyGLAAdapter
    with pytest.raises(TypeError, match='cls: expected a HostAdapter subclass'):
        registry.register_adapter(int)


def test_a_registered_adapter_takes_its_hosts_and_lists_them_where_installed(clean_registry):
    registry.register_adapter(NotInstalledAdapter)
    assert NotInstalledAdapter in registry.registered_adapters()
    assert NotInstalledAdapter not in registry.registered_adapters(installed=True)
    assert 'not_an_installed_package.layers.Attention' not in registry.supported_hosts()
    with pytest.raises(ValueError, match='supported once its package is installed: .*not_an_installed_package'):
        MixtureOfMemories(torch.nn.Linear(4, 4), 2, 1)


def test_entry_points_register_on_first_lookup_and_a_broken_one_warns(clean_registry, monkeypatch):
    group = registry.ENTRY_POINTS
    points = [importlib.metadata.EntryPoint('mine', 'tests.extension_example:NotInstalledAdapter', group),
              importlib.metadata.EntryPoint('module', 'tests.extension_example', group),
              importlib.metadata.EntryPoint('broken', 'tests.no_such_module:Adapter', group)]
    asked = []
    monkeypatch.setattr(registry.importlib.metadata, 'entry_points',
                        lambda group: asked.append(group) or [p for p in points if p.group == group])
    monkeypatch.setattr(registry, '_entry_points_loaded', False)
    assert NotInstalledAdapter not in registry._REGISTRY
    with pytest.warns(RuntimeWarning, match=r"entry point 'broken' \(tests.no_such_module:Adapter\) failed to load"):
        adapters = registry.registered_adapters()
    assert NotInstalledAdapter in adapters and asked == [group]
    registry.registered_adapters()
    assert asked == [group]  # once


@needs_host_kernels
def test_convert_with_a_named_adapter_saves_and_loads_with_it(clean_registry, tmp_path):
    registry.register_adapter(MyGLAAdapter, variant=True)
    model = host_model('GatedLinearAttention')
    convert(model, num_memories=2, topk=1, init='copy', adapter=MyGLAAdapter)
    assert all(type(layer.attn._adapter) is MyGLAAdapter for layer in model.model.layers)
    assert model.config.mom['adapter'] == 'tests.extension_example.MyGLAAdapter'
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    loaded = save_and_load(model, tmp_path)
    assert all(type(layer.attn._adapter) is MyGLAAdapter for layer in loaded.model.layers)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    registry._VARIANTS.remove(MyGLAAdapter)  # a fresh process that did not import the package
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="adapter: 'tests.extension_example.MyGLAAdapter' is not a registered adapter"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_convert_with_an_adapter_that_takes_no_layer_says_so():
    model = host_model('DeltaNet')
    with pytest.raises(ValueError, match='model: no layer that adapter MyGLAAdapter takes in DeltaNetForCausalLM'):
        convert(model, adapter=MyGLAAdapter)


@needs_host_kernels
def test_run_checks_with_a_named_adapter(clean_registry):
    from mom_wrap.testing import run_checks
    registry.register_adapter(MyGLAAdapter, variant=True)
    seen = set()
    original = MyGLAAdapter.recurrence
    try:
        MyGLAAdapter.recurrence = lambda self, *a, **k: seen.add(type(self)) or original(self, *a, **k)
        results = run_checks(GatedLinearAttentionAdapter.example_host, 'MyGLA', adapter=MyGLAAdapter)
    finally:
        MyGLAAdapter.recurrence = original
    assert seen == {MyGLAAdapter} and all(r.passed for r in results), [r for r in results if not r.passed]


def test_toolkit_exports_what_the_builtin_adapters_use():
    """The toolkit's names are the very functions the built-in adapters call (no second copy to drift)."""
    from mom_wrap import dispatch
    from mom_wrap.adapters import fla_common, gla, toolkit
    assert all(hasattr(toolkit, name) for name in toolkit.__all__)
    assert toolkit.gather is dispatch.gather and toolkit.gla_reference is gla.gla_reference
    assert toolkit.rms_norm is fla_common.rms_norm


def test_a_family_named_in_the_models_entry_point_group_gets_its_placeholder(monkeypatch):
    """``mom_wrap.models`` entry points: at import, the placeholder of ``mom_<name>`` without importing the package;
    reading such a config imports the config class (the package) and registers its Mom classes."""
    import sys
    from transformers import AutoConfig
    from mom_wrap import hf
    point = importlib.metadata.EntryPoint('mom_wrap_test_entry', 'tests.entry_family:EntryConfig', hf.MODEL_ENTRY_POINTS)
    monkeypatch.setattr(hf.importlib.metadata, 'entry_points',
                        lambda group: [point] if group == hf.MODEL_ENTRY_POINTS else [])
    hf.register_lazy()
    assert 'tests.entry_family' not in sys.modules  # only its name was read
    config = AutoConfig.for_model('mom_mom_wrap_test_entry', mom={})
    assert type(config).__name__ == 'MomEntryConfig' and 'tests.entry_family' in sys.modules
