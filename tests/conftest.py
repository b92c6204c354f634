"""Test setup.

On the CPU, Triton's interpreter (TRITON_INTERPRET=1) runs fla's fused_recurrent kernels and its norm
modules, so the real host layer (eval mode, T <= 64) is a CI oracle. Triton's autotuner would benchmark
every config under the interpreter; here it runs the kernel once instead. Both must be set before fla
(and so triton) is imported, hence at the top of conftest. On a CUDA machine nothing is changed.
"""
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
    from triton.runtime import autotuner

    def _run_once(kernel_call, quantiles=None, **kwargs):
        kernel_call()
        return [0.0, 0.0, 0.0]

    autotuner.Autotuner.do_bench = property(lambda self: _run_once)

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
