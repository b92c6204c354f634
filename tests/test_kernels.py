"""Our Triton kernels against the PyTorch reference ops (on the CPU through Triton's interpreter)."""
import os

import pytest
import torch

from mom_wrap.ops import segment_conv

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason='needs TRITON_INTERPRET=1 or CUDA')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.mark.parametrize('use_memory', [False, True])
@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('strided', [False, True])
def test_segment_conv_triton_matches_torch(use_memory, use_bias, activation, dtype, strided):
    g = torch.Generator().manual_seed(3)
    # segments that cross the 64-row blocks and memories that change inside a block
    lengths = [5, 70, 1, 33, 64, 2, 20]
    seg_memory = [0, 0, 1, 2, 2, 3, 4] if use_memory else [0] * len(lengths)
    E, D, W = (5 if use_memory else 1), 72, 4
    S = sum(lengths)
    memory = torch.tensor(seg_memory).repeat_interleave(torch.tensor(lengths)) if use_memory else None
    position = torch.cat([torch.arange(n) for n in lengths])
    x = torch.randn(S, D, generator=g).to(dtype)
    if strided:  # a column slice of a wider tensor, as the split of the fused projection gives
        x = torch.cat([torch.randn(S, 8, generator=g).to(dtype), x, torch.randn(S, 3, generator=g).to(dtype)], 1)
    weight = torch.randn(E, D, W, generator=g).to(dtype)
    bias = torch.randn(E, D, generator=g).to(dtype) if use_bias else None
    dy = torch.randn(S, D, generator=g).to(dtype)
    out = {}
    for backend in ('torch', 'triton'):
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (x, weight) + ((bias,) if use_bias else ())]
        b = leaves[2] if use_bias else None
        mem = memory.to(DEVICE) if memory is not None else None
        xin = leaves[0][:, 8:8 + D] if strided else leaves[0]
        assert xin.stride(0) == (D + 11 if strided else D)
        y = segment_conv(xin, leaves[1], b, mem, position.to(DEVICE), activation, backend)
        y.backward(dy.to(DEVICE))
        out[backend] = [y.detach().float().cpu()] + [t.grad.float().cpu() for t in leaves]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ref, got in zip(out['torch'], out['triton']):
        err = (ref - got).abs().max() / ref.abs().max().clamp_min(1)
        assert err < tol, err.item()
