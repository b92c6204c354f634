"""The real fla GatedDeltaNet layer as oracle on the CPU, through Triton's interpreter (see conftest).

In eval mode with T <= 64 the host runs fla's fused_recurrent kernel and fused norm, which the interpreter
executes; the M=1 wrapper must reproduce it with both backends (the triton backend calls the same fla
kernel on our packed segments).
"""
import copy
import os

import pytest
import torch

from mom_wrap import MixtureOfMemories
from tests.test_layer import HIDDEN, close, make_host

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason='needs TRITON_INTERPRET=1 or CUDA')]


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_one_memory_wrapper_equals_real_host_layer(backend):
    host = make_host(num_v_heads=4).eval()
    x = torch.randn(2, 24, HIDDEN)
    with torch.no_grad():
        expect = copy.deepcopy(host)(x)[0]
        mom = MixtureOfMemories(host, num_memories=1, topk=1, shared_memory=False, backend=backend).eval()
        close(mom(x)[0], expect, tol=1e-5)


def test_triton_backend_equals_torch_backend_with_routing():
    mom = MixtureOfMemories(make_host(), num_memories=4, topk=2, shared_memory=True, init='random').eval()
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    x = torch.randn(2, 20, HIDDEN)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        mom.backend = 'torch'
        expect = mom(x, attention_mask=mask)[0]
        mom.backend = 'triton'
        close(mom(x, attention_mask=mask)[0], expect, tol=1e-5)
