"""Test setup.

On the CPU, Triton's interpreter (TRITON_INTERPRET=1) runs fla's fused_recurrent kernels and its norm
modules, so the real host layer (eval mode, T <= 64) is a CI oracle. Triton's autotuner would benchmark
every config under the interpreter; here it takes the first one (``mom_wrap.interpret_on_cpu``).
Both must be set before fla (and so Triton) is imported, hence at the top of conftest. On a CUDA machine
Triton's fp32 dot products run in IEEE fp32 (TRITON_F32_DEFAULT=ieee unless set), and with MOM_WRAP_FIRST_CONFIG=1
the autotuner takes each kernel's first config there too (``mom_wrap.interpret.first_config_only``), so that the
GPU tests check values without minutes of autotuning.
"""
import importlib.util
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')  # before mom_wrap (and so Triton) is imported
    from mom_wrap.interpret import interpret_on_cpu
    interpret_on_cpu()
else:
    # fp32 tests hold fp32 kernels to fp32 references: Triton's fp32 dots in IEEE fp32, not TF32 (as
    # ``python -m mom_wrap.check`` runs them); set before any kernel compiles. TRITON_F32_DEFAULT=tf32 keeps TF32.
    os.environ.setdefault('TRITON_F32_DEFAULT', 'ieee')
    if os.environ.get('MOM_WRAP_FIRST_CONFIG') == '1':
        from mom_wrap.interpret import first_config_only
        first_config_only()

warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform.*')


HAS_MAMBA_SSM = importlib.util.find_spec('mamba_ssm') is not None


def pytest_collection_modifyitems(config, items):
    """The one rule for optional hardware and packages: tests marked ``gpu`` are skipped without CUDA, tests marked
    ``mamba_ssm`` (every test that needs the Mamba2 host: ``tests/hosts.py`` marks the host parameters) without
    mamba-ssm."""
    skip_gpu = pytest.mark.skip(reason='needs a CUDA GPU')
    skip_mamba = pytest.mark.skip(reason='needs mamba-ssm (pip install "mom_wrap[mamba]")')
    for item in items:
        if item.get_closest_marker('gpu') is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker('mamba_ssm') is not None and not HAS_MAMBA_SSM:
            item.add_marker(skip_mamba)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


if os.environ.get('MOM_WRAP_PERTURB_ROUTING', '0') != '0':  # opt-in: tests/routing_perturbation.py
    from tests.routing_perturbation import install
    install()
