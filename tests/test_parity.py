"""The public parity suite (``mom_wrap.testing``) over every supported host, and its command line."""
import os

import pytest
import torch

import mom_wrap.check as check
import mom_wrap.ops as ops
import mom_wrap.testing as testing
from tests import hosts

needs_host_kernels = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                        reason="the host layers' forwards need TRITON_INTERPRET=1 or CUDA")
ADAPTERS = hosts.ADAPTERS


@needs_host_kernels
@pytest.mark.parametrize('host', hosts.params(host_forward=True))
def test_parity_suite_passes(host):
    adapter = ADAPTERS[host]
    results = testing.run_checks(adapter.example_host, host)
    # every check ran (left padding only where the host's forward takes a padding mask)
    ran = {r.check for r in results}
    assert {'one_memory_equals_host[torch]', 'one_memory_equals_host[triton]', 'topk_copies_equal_host',
            'preserve_equals_host', 'naive_loop[shared=False]', 'naive_loop[shared=True]', 'causal',
            'batch_rows_independent', 'packed_sequences', 'cached_chunks_equal_full_forward',
            'every_parameter_gets_a_gradient', 'preserve_routed_memories_get_gradients',
            *(['left_padding', 'cached_chunks_with_padding'] if adapter.convention.padding_mask else []),
            *(f'model_one_memory_equals_host[{label}]' for label in adapter.example_models())} <= ran, ran
    failed = [r for r in results if not r.passed]
    assert not failed, failed


def test_naive_loop_catches_a_broken_write_side(monkeypatch):
    """The suite's naive loop runs none of our write-side code: a wrong segment conv shows."""
    real = ops.segment_conv
    monkeypatch.setattr('mom_wrap.memories.segment_conv', lambda *a, **k: real(*a, **k) * 1.01)
    mom = testing.wrap(ADAPTERS['GatedDeltaNet'].example_host()).eval()
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        assert testing.rel_err(mom(x)[0], testing.naive_mom(mom, x)) > 1e-3


def test_check_command_prints_a_table_and_fails_on_any_failure(monkeypatch, capsys):
    fake = [testing.Result('Host', 'good', 1e-7, 1e-4), testing.Result('Host', 'bad', 0.5, 1e-4, 'why'),
            testing.Result('Host', 'nan', float('nan'), 1e-4)]
    monkeypatch.setattr(testing, 'run_checks', lambda *a, **k: fake)
    assert check.main(['GatedDeltaNet']) == 1
    out = capsys.readouterr().out
    assert 'good' in out and 'FAIL  why' in out and '1 passed, 2 failed' in out
    with pytest.raises(SystemExit):
        check.main(['NoSuchHost'])


def test_check_command_on_cuda_runs_fp32_dots_in_ieee_unless_told(monkeypatch):
    """On CUDA the command sets TRITON_F32_DEFAULT=ieee before any kernel compiles (--tf32: left alone)."""
    seen = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # the command refuses --device cuda without CUDA
    monkeypatch.setattr(testing, 'run_checks', lambda *a, **k: seen.append(os.environ.get('TRITON_F32_DEFAULT'))
                        or [testing.Result('Host', 'good', 0.0, 1e-4)])
    monkeypatch.setenv('TRITON_F32_DEFAULT', 'tf32')  # recorded, so that teardown restores what was there
    monkeypatch.delenv('TRITON_F32_DEFAULT')
    assert check.main(['GatedDeltaNet', '--device', 'cuda', '--tf32']) == 0
    assert check.main(['GatedDeltaNet', '--device', 'cuda']) == 0
    assert seen == [None, 'ieee']


def test_parity_suite_in_fp64_allows_the_routers_fp32_rounding_across_shapes():
    """In fp64 the checks that route the same tokens in calls of other shapes (batch rows, packing, padding, cached
    chunks) allow the router's fp32 rounding (``testing.routing_rounding``): MKL's AVX2 kernels (MKL_CBWR=AVX2, set
    before torch starts: a subprocess) round 1 to 3 rows unlike 40, and the cached chunks were 3.4e-8 off against
    fp64's 1e-9."""
    import subprocess
    import sys
    code = ("import torch; from mom_wrap import interpret_on_cpu; interpret_on_cpu(); "
            "from mom_wrap.testing import run_checks; from mom_wrap.adapters.gated_deltanet import GatedDeltaNetAdapter; "
            "rows = run_checks(GatedDeltaNetAdapter.example_host, dtype=torch.float64, interpret=False); "
            "bad = [r for r in rows if not r.passed]; print('failed:', bad) if bad else print('ok', len(rows))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'MKL_CBWR': 'AVX2', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'})
    assert run.returncode == 0 and run.stdout.strip().startswith('ok'), run.stdout[-2000:] + run.stderr[-2000:]


@needs_host_kernels
def test_model_check_sees_a_norm_eps_the_model_sets(monkeypatch):
    """The suite's model-level check (``example_models``: the host layers inside their model): an adapter that took
    its output norm's eps from anywhere but the layer's own norm (which the model's config sets) fails it, as the
    layer-level checks on ``example_host`` cannot see."""
    from mom_wrap.adapters import fla_common
    make = ADAPTERS['GatedDeltaNet'].example_models()['norm_eps=1e-2']
    real = fla_common.rms_norm_gated

    def check():
        with torch.no_grad():
            return testing.rel_err(*testing._one_memory_model(make, 'cpu', torch.float32, None,
                                                              torch.Generator().manual_seed(0)))
    assert check() <= testing.TOL[torch.float32]
    monkeypatch.setattr(fla_common, 'rms_norm_gated', lambda x, g, w, b, eps, *a: real(x, g, w, b, 1e-6, *a))
    assert check() > 2 * testing.TOL[torch.float32]  # the check fails (measured: 7e-4)


@needs_host_kernels
def test_host_kernel_rounding_widens_only_the_comparisons_with_the_host(monkeypatch):
    """``HostAdapter.host_kernel_rounding`` (default 0; mamba-ssm's Mamba3: bf16's on CUDA) is added to the tolerance
    of the checks against the host layer, and of no other check."""
    adapter = ADAPTERS['LinearAttention']
    assert adapter.host_kernel_rounding(torch.device('cuda'), torch.float32) == 0.0
    monkeypatch.setattr(adapter, 'host_kernel_rounding', classmethod(lambda cls, device, dtype: 0.5))
    rows = {r.check: r.tolerance for r in testing.run_checks(adapter.example_host, 'LinearAttention')}
    tol = testing.TOL[torch.float32]
    against_host = {c for c in rows if c.startswith(('one_memory_equals_host', 'topk_copies', 'preserve_equals',
                                                     'model_one_memory'))}
    assert len(against_host) >= 5 and all(rows[c] == tol + 0.5 for c in against_host)
    assert rows['naive_loop[shared=True]'] == tol and rows['causal'] == tol


def test_mamba3_kernels_round_as_bf16_on_cuda_only():
    from mom_wrap.adapters.mamba3 import Mamba3Common
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert Mamba3Common.host_kernel_rounding(cuda, torch.float32) == 2e-2
    assert Mamba3Common.host_kernel_rounding(cuda, torch.bfloat16) == 0.0
    assert Mamba3Common.host_kernel_rounding(cpu, torch.float32) == 0.0  # interpret_on_cpu drops the casts
    assert all(a.host_kernel_rounding(cuda, torch.float32) == 0.0 for n, a in ADAPTERS.items()
               if not issubclass(a, Mamba3Common))
