"""examples/mom_wrap_example, the out-of-tree adapter package, without installing it (its directory on sys.path): its
adapter passes the parity suite, and a model of its family converts, saves and loads. CI also installs it and runs
``python -m mom_wrap.check ToyGatedAttention`` and its check_example.py (.ci/run, step 3)."""
import os
from pathlib import Path

import pytest
import torch

from mom_wrap.adapters import registry
from mom_wrap.testing import rel_err

EXAMPLE = Path(__file__).resolve().parent.parent / 'examples' / 'mom_wrap_example'

needs_host_kernels = pytest.mark.skipif(
    os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
    reason="the parity suite runs the triton backend (fla's kernels): TRITON_INTERPRET=1 or CUDA")


@pytest.fixture
def example(monkeypatch):
    """``mom_example.adapters``, imported from the example's directory, its adapter registered; the registry as it
    was after the test (so that no other test sees the adapter). The installed packages' entry points are loaded
    first, as any lookup would (where mom-wrap-example is installed, its adapter then stays registered, as it would
    without this test)."""
    registry.registered_adapters()
    monkeypatch.setattr(registry, '_REGISTRY', list(registry._REGISTRY))
    monkeypatch.setattr(registry, '_VARIANTS', list(registry._VARIANTS))
    monkeypatch.setattr(registry, '_entry_points_loaded', registry._entry_points_loaded)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import mom_example.adapters
    registry.register_adapter(mom_example.adapters.ToyGatedAttentionAdapter)  # imported by an earlier test: again
    return mom_example.adapters


@pytest.mark.interpreter
@needs_host_kernels
def test_the_example_adapter_passes_the_parity_suite(example):
    from mom_wrap.testing import run_checks

    adapter = example.ToyGatedAttentionAdapter
    results = run_checks(adapter.example_host, 'ToyGatedAttention', adapter=adapter)
    checks = {r.check for r in results}
    assert {'one_memory_equals_host[torch]', 'one_memory_equals_host[triton]', 'preserve_equals_host',
            'model_one_memory_equals_host[default]', 'model_one_memory_equals_host[norm_eps=1e-2]',
            'cached_chunks_equal_full_forward', 'left_padding', 'packed_sequences'} <= checks
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_the_example_model_converts_saves_and_loads(example, tmp_path):
    from transformers import AutoModelForCausalLM

    from mom_example.model import ToyConfig, ToyForCausalLM
    from mom_wrap import MixtureOfMemories, convert
    model = ToyForCausalLM(ToyConfig()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        convert(model, num_memories=4, topk=2, init='preserve')
        layers = [m for m in model.modules() if isinstance(m, MixtureOfMemories)]
        assert len(layers) == 2 and all(type(m._adapter) is example.ToyGatedAttentionAdapter for m in layers)
        assert rel_err(model(ids).logits, want) <= 1e-4  # init='preserve': the logits unchanged
        for p in model.parameters():  # as after training: every weight counts
            p.add_(0.05 * torch.randn_like(p))
        want = model(ids).logits
    assert model.config.model_type == 'mom_toy_gated'
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(loaded).__name__ == 'MomToyForCausalLM'
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, want)
