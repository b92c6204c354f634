"""Our Triton kernels against the PyTorch reference ops (on the CPU through Triton's interpreter)."""
import os

import pytest
import torch

from mom_wrap.dispatch import plan_dispatch
from mom_wrap.ops import segment_conv

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason='needs TRITON_INTERPRET=1 or CUDA')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.mark.parametrize('use_memory', [False, 'sorted', 'unsorted'])
@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('strided', [False, True])
def test_segment_conv_triton_matches_torch(use_memory, use_bias, activation, dtype, strided, monkeypatch):
    import mom_wrap.kernels.segment_conv as kernel
    # fp32 runs: one weight-gradient program per 64 rows, so many programs add into each memory's weights;
    # bf16 runs: the default, one program for all rows and every memory
    if dtype == torch.float32:
        monkeypatch.setattr(kernel, 'ROWS_PER_PROGRAM', 64)
    g = torch.Generator().manual_seed(3)
    # segments that cross the 64-row blocks and memories that change inside a block
    lengths = [5, 70, 1, 33, 64, 2, 20]
    seg_memory = {False: [0] * len(lengths), 'sorted': [0, 0, 1, 2, 2, 3, 4],
                  'unsorted': [3, 0, 4, 1, 0, 2, 1]}[use_memory]
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


@pytest.mark.parametrize('use_memory', [False, True])
@pytest.mark.parametrize('use_index', [False, True])
@pytest.mark.parametrize('use_valid', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('W', [4, 3])
def test_conv_step_triton_updates_pool_like_reference(use_memory, use_index, use_valid, dtype, W):
    """The in-place decode conv kernel against ``ops.conv_step`` on gathered rows plus a scatter back:
    same outputs, the touched rows' new windows, untouched and invalid rows bit-identical."""
    from mom_wrap.kernels.conv_step import conv_step_triton
    from mom_wrap.ops import conv_step
    g = torch.Generator().manual_seed(5)
    G, D, E, R = 7, 200, 3, 11  # D spans two column blocks, unevenly
    pool = torch.randn(R if use_index else G, D, W, generator=g).to(dtype)
    index = torch.randperm(R, generator=g)[:G] if use_index else None
    valid = torch.tensor([True, False, True, True, False, True, True]) if use_valid else None
    memory = torch.randint(0, E, (G,), generator=g) if use_memory else None
    weight = torch.randn(E if use_memory else 1, D, W, generator=g).to(dtype)
    bias = torch.randn(E if use_memory else 1, D, generator=g).to(dtype)
    wide = torch.randn(G, D + 9, generator=g).to(dtype)
    x = wide[:, 4:4 + D]  # strided rows, as a slice of the fused projection
    rows = index if use_index else torch.arange(G)
    y_ref, new_ref = conv_step(x, pool[rows], weight, bias, memory, 'silu')
    want = pool.clone()
    keep = valid if use_valid else torch.ones(G, dtype=torch.bool)
    want[rows[keep]] = new_ref[keep]
    got_pool = pool.to(DEVICE)
    with torch.no_grad():
        y = conv_step_triton(x.to(DEVICE), got_pool, None if index is None else index.to(DEVICE), weight.to(DEVICE),
                             bias.to(DEVICE), None if memory is None else memory.to(DEVICE),
                             None if valid is None else valid.to(DEVICE), True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y.float().cpu() - y_ref.float()).abs().max() / y_ref.float().abs().max()) < tol
    assert torch.equal(got_pool.cpu(), want)  # a state is a copy of inputs: exact, also in bf16


@pytest.mark.parametrize('use_valid', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_scatter_rows_equals_index_copy(use_valid, dtype):
    """Rows longer than a block, a dtype cast from fp32, rows not named and invalid rows left bit-identical."""
    from mom_wrap.kernels.rows import scatter_rows_
    g = torch.Generator().manual_seed(6)
    R, G = 9, 4
    pool = torch.randn(R, 3, 1500, generator=g).to(dtype)
    index = torch.tensor([7, 0, 3, 5])
    src = torch.randn(G, 3, 1500, generator=g)
    valid = torch.tensor([True, False, True, True]) if use_valid else None
    want = pool.clone()
    keep = valid if use_valid else torch.ones(G, dtype=torch.bool)
    want.index_copy_(0, index[keep], src[keep].to(dtype))
    got = pool.to(DEVICE)
    scatter_rows_(got, index.to(DEVICE), src.to(DEVICE), None if valid is None else valid.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match='src'):
        scatter_rows_(got, index.to(DEVICE), src[:3].to(DEVICE))


@pytest.mark.parametrize('M,k,shared', [(4, 2, True), (8, 3, False), (5, 1, True), (3, 3, True), (16, 2, True)])
@pytest.mark.parametrize('grads', ['both', 'weights', 'probs'])
def test_route_triton_matches_torch(M, k, shared, grads):
    """The router's selection kernel (``kernels.route``) against the PyTorch ops it replaces: probabilities,
    weights (with the shared slot), indices exactly, and the gradient of the logits from the weights, the
    probabilities or both (the balancing loss reads the probabilities)."""
    from mom_wrap.router import Router
    torch.manual_seed(0)
    router = Router(24, M, k, device=DEVICE)
    x = torch.randn(150, 24, device=DEVICE)  # more rows than one program's
    gp = torch.randn(150, M, device=DEVICE)
    gw = torch.randn(150, k + int(shared), device=DEVICE)
    out = {}
    for kernels in (False, True):
        xi = x.clone().requires_grad_()
        _, probs, weights, indices = router.route(xi, shared, kernels)
        loss = (probs * gp).sum() * (grads != 'weights') + (weights * gw).sum() * (grads != 'probs')
        loss.backward()
        out[kernels] = probs.detach(), weights.detach(), indices, xi.grad, router.weight.grad
        router.weight.grad = None
    assert torch.equal(out[True][2], out[False][2])
    for a, b, name in zip(out[True], out[False], ('probs', 'weights', 'indices', 'dx', 'dweight')):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_route_triton_ties_go_to_the_lower_memory():
    """Equal probabilities (a zero router; and exact pairs) pick the lower memory first, as the stable sort does."""
    from mom_wrap.kernels.route import route_triton
    logits = torch.zeros(5, 6, device=DEVICE)
    logits[1] = torch.tensor([0., 1., 1., 0., 2., 2.])
    logits[2] = torch.tensor([3., 3., 3., 3., 3., 3.])
    logits[3, 5] = 1.0
    probs, weights, indices = route_triton(logits, 3, True)
    assert indices.tolist() == [[0, 1, 2, 6], [4, 5, 1, 6], [0, 1, 2, 6], [5, 0, 1, 6], [0, 1, 2, 6]]
    torch.testing.assert_close(weights[:, :3].sum(1), torch.ones(5, device=DEVICE))
    assert (weights[:, 3] == 1).all()
    torch.testing.assert_close(probs, logits.softmax(-1))


@pytest.mark.parametrize('masked', [False, True])
def test_plan_kernels_equal_the_pytorch_plan_over_many_blocks(masked):
    """The Triton plan (``kernels.plan``) and the PyTorch one on 40,000 tokens (157 blocks of 256: the scan over
    earlier blocks takes three tiles of 64), 3 sequences of unequal length, top-2 of 7 + shared, field by field."""
    g = torch.Generator().manual_seed(0)
    lengths = [15000, 9000, 16000]
    N, E = sum(lengths), 8
    sequence = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).to(DEVICE)
    memory = torch.cat([torch.stack([torch.randperm(E - 1, generator=g)[:2] for _ in range(64)])
                        .repeat(N // 64 + 1, 1)[:N], torch.full((N, 1), E - 1)], 1)
    memory = memory[torch.randperm(N, generator=g)].to(DEVICE)
    weight = torch.rand(N, 3, generator=g).to(DEVICE)
    valid = (torch.rand(N, generator=g) < 0.8).to(DEVICE) if masked else None
    want = plan_dispatch(memory, weight, sequence, valid, 3, E)
    got = plan_dispatch(memory, weight, sequence, valid, 3, E, kernels=True)
    for field in ('token', 'slot', 'memory', 'position', 'restore', 'token_weight', 'memory_offsets',
                  'memory_counts', 'cu_seqlens_cpu', 'segment_memory', 'segment_sequence', 'memory_offsets_cpu'):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.max_seqlen == want.max_seqlen


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('unused', [None, 1, 2])
def test_split_convs_triton_equals_split_then_convs(dtype, unused):
    """The write side's split with its convs inside (``SplitConvsTriton``: the convs' dx written into the fused
    gradient's columns, the others copied in) against ``y.split`` and one reference conv per block: outputs and
    the gradients of y, the conv weights and biases; ``unused``: one output gets no gradient (None)."""
    from mom_wrap.kernels.segment_conv import split_convs_triton
    torch.manual_seed(0)
    E, W, S = 3, 4, 150
    widths = [40, 24, 3, 36]  # a conv with bias and SiLU, a plain block, a plain block, a conv without bias
    convs = ((True, True), None, None, (False, False))
    memory = torch.sort(torch.randint(0, E, (S,))).values.to(DEVICE)
    position = torch.cat([torch.arange(n) for n in torch.bincount(memory.cpu(), minlength=E).tolist()]).to(DEVICE)
    y = torch.randn(S, sum(widths), device=DEVICE, dtype=dtype)
    w0, b0 = torch.randn(E, 40, W, device=DEVICE, dtype=dtype), torch.randn(E, 40, device=DEVICE, dtype=dtype)
    w3 = torch.randn(E, 36, W, device=DEVICE, dtype=dtype)
    grads = [torch.randn(S, n, device=DEVICE, dtype=dtype) for n in widths]
    if unused is not None:
        grads[unused] = None
    runs = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (y, w0, b0, w3)]
        yy, ww0, bb0, ww3 = leaves
        if fused:
            outs = split_convs_triton(yy, widths, convs, memory, position, [ww0, bb0, ww3])
        else:
            p = yy.split(widths, dim=1)
            outs = [segment_conv(p[0], ww0, bb0, memory, position, 'silu'), p[1], p[2],
                    segment_conv(p[3], ww3, None, memory, position, None)]
        torch.autograd.backward([o for o, g in zip(outs, grads) if g is not None], [g for g in grads if g is not None])
        runs.append([o.detach() for o in outs] + [t.grad for t in leaves])
        if fused:
            assert all(o.is_contiguous() for o in outs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*runs):
        torch.testing.assert_close(a.float(), b.float(), **tol)
