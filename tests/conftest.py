"""Test setup.

On the CPU, Triton's interpreter (TRITON_INTERPRET=1) runs fla's fused_recurrent kernels and its norm
modules, so the real host layer (eval mode, T <= 64) is a CI oracle. Triton's autotuner would benchmark
every config under the interpreter; here it takes the first one (``mom_wrap.check.interpret_on_cpu``).
Both must be set before fla (and so Triton) is imported, hence at the top of conftest. On a CUDA machine
nothing is changed.
"""
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')  # before mom_wrap (and so Triton) is imported
    from mom_wrap.check import interpret_on_cpu
    interpret_on_cpu()

warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform.*')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
