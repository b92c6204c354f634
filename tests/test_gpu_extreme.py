"""Extreme routing at T = 65536 on the GPU (issue 12), fp32, bf16 and fp16 (marked ``gpu``).

One sequence of 65,536 tokens through MoM(GatedDeltaNet) at the paper's layer size (M=4; fla's autotune cache
covers these shapes), routed to the extremes: every token to one memory (top-1: one segment of 65,536 slots
beside the shared memory's), and one memory starved (top-2 of 4, memory 3 never chosen, the other three
all used). The routing is exact in every dtype: the router reads input features 0-3 through one-hot rows, and
those features hold small integers, so bf16 and fp16 route every token exactly as fp32 does.

The reference is the torch backend's step-by-step recurrence in fp32 with the fp32 weights, computed once per
routing without autograd (its graph over 65,536 steps would not fit); each dtype's layer is the same layer cast
to that dtype, run on the triton backend (fla's chunk kernels on our segments). A backward then gives finite
gradients that reach exactly the memories that got tokens.
"""
import pytest
import torch
from fla.layers import GatedDeltaNet

from mom_wrap import MixtureOfMemories
from mom_wrap.testing import norm_rel_err as rel_err  # (the GPU tests' measure)

pytestmark = pytest.mark.gpu
T = 65536
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
STARVED = {'one_memory': [0, 1, 3], 'starved': [3]}  # memories that get no token (4: the shared one gets all)
_REFERENCE = {}


def layer_and_input(routing):
    """The fp32 layer (triton backend) and x [1, T, 1024] for ``routing``, the same on every call."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    host = GatedDeltaNet(hidden_size=1024, head_dim=256, num_heads=4, expand_v=1, layer_idx=0)
    mom = MixtureOfMemories(host, num_memories=4, topk=1 if routing == 'one_memory' else 2, shared_memory=True,
                            init='random', balance_loss_weight=0.01)
    x = torch.randn(1, T, 1024, generator=gen)
    if routing == 'one_memory':  # feature 2 = 8 beats features 0, 1, 3 in {0, 1, 2}
        x[0, :, :4] = torch.randint(0, 3, (T, 4), generator=gen).float()
        x[0, :, 2] = 8.0
    else:  # feature 3 = -4 loses to features 0-2, a permutation of {1, 2, 3} per token
        x[0, :, :3] = torch.argsort(torch.rand(T, 3, generator=gen), dim=1).float() + 1
        x[0, :, 3] = -4.0
    with torch.no_grad():
        mom.router.weight.zero_()
        mom.router.weight[:, :4] = torch.eye(4)
    return mom.cuda().train(), x.to(torch.bfloat16).float().cuda()  # x exact in bf16 and fp16 too


def reference(routing):
    if routing not in _REFERENCE:
        mom, x = layer_and_input(routing)
        mom.backend = 'torch'
        with torch.no_grad():
            _REFERENCE[routing] = mom(x)[0]
        del mom
        torch.cuda.empty_cache()
    return _REFERENCE[routing]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
@pytest.mark.parametrize('routing', ['one_memory', 'starved'])
def test_extreme_routing_at_64k_tokens(routing, dtype):
    want = reference(routing)
    mom, x = layer_and_input(routing)
    mom = mom.to(dtype)
    mom.backend = 'triton'
    x = x.to(dtype).requires_grad_(True)
    y = mom(x)[0]
    chosen = mom.router_logits[0].topk(mom.topk, -1).indices
    used = torch.bincount(chosen.flatten(), minlength=4)
    assert used[[e for e in STARVED[routing] if e < 4]].sum() == 0 and (used > 0).sum() == 4 - len(STARVED[routing])
    err = rel_err(y, want)
    # a gradient of order 1 per element: a mean over 67M outputs would make it ~1e-8, zero in fp16
    y.backward(0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
    print(f"\n{routing} {dtype} T={T}: rel err vs the torch backend in fp32 {err:.2e}")
    assert torch.isfinite(y).all() and err < TOL[dtype], err
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mom.parameters() if p.grad is not None)
    fed = [e for e in range(5) if e not in STARVED[routing]]
    for name, g in mom.memories.split(mom.memories.weight.grad).items():
        assert not g[STARVED[routing]].any() and all(g[e].any() for e in fed), name
