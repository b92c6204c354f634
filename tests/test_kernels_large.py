"""Our Triton kernels on tensors whose element offsets pass 2**31: int32 index arithmetic wraps there.

On the CPU the big tensors cost almost nothing: a CPU ``torch.empty`` of a few GiB is an mmap whose pages are
committed only when touched, so a tensor with few rows and a huge row stride (or a pool of many rows of
which a few are used) spans more than 2**31 elements while only the touched rows take RAM (each test's
docstring gives its sizes; the child process checks its peak RSS). A wrapped offset reads or writes outside
the tensor, which under Triton's interpreter is a segfault more often than a wrong value, so every case runs
in a child process (as ``tests/test_kernels_compile.py`` does): a crash is a failed test, not a dead session.
With CUDA the cases run on the GPU (a few GiB of real memory), and the ``gpu`` test runs the segment conv
at the size of a real fused projection.
"""
import os
import resource
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason='needs TRITON_INTERPRET=1 or CUDA')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOL = 2e-2  # bf16 outputs, relative to the reference's largest entry (as in test_kernels.py)
PEAK_RSS = 2 << 30  # a child's peak RSS on the CPU (0.4 GiB seen: torch, triton, the touched rows), not 4 GiB


def run_isolated(case: str, *args: str) -> None:
    """Run ``case(*args)`` (a function of this module) in a child process; TRITON_INTERPRET passes down from
    conftest. The child's output shows under ``pytest -s``."""
    env = dict(os.environ, PYTHONFAULTHANDLER='1')  # a crash prints the Python stack it happened in
    done = subprocess.run([sys.executable, __file__, case, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    print(done.stdout, end='')
    # a negative code is the signal that killed the child: -11 a segfault (a wrapped offset, most likely)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1)).item()


# name: segment lengths, their memories, the first row past 2**31 elements, BLOCK_T, ROWS_PER_PROGRAM
SEGMENT_CONV_CASES = {
    # the kernels' blocks: a block starts below 2**31 and reaches past it (64-bit pointer, int32 in-block
    # offsets); the launcher cuts the weight-gradient programs to 64 rows so that theirs stay int32 too
    'blocks64': ([5, 70, 1, 33, 2, 17], [0, 0, 0, 1, 1, 1], 120, 64, 1024),
    # blocks of 8 rows: the last ones start past 2**31, so the block offsets r0 * SX themselves need 64 bits
    'blocks8': ([5, 70, 1, 33, 2, 17], [0, 0, 0, 1, 1, 1], 120, 8, 8),
    # rows 2**31 / 40 apart: a 64-row block's int32 offsets would wrap, so the launcher copies x
    'copied': ([5, 20, 1, 13, 9], [0, 0, 0, 1, 1], 40, 64, 1024),
}


@pytest.mark.parametrize('case', list(SEGMENT_CONV_CASES))
def test_segment_conv_rows_past_2_31(case):
    """Forward and backward (dx, dweight, dbias) of ``segment_conv_triton`` on x [S, 24] bf16 (S = 128, or 48
    for 'copied') whose row stride puts its last rows past 2**31 elements (stride 2**31 / 120, or / 40): x
    spans 4.2 GiB (4.7 GiB), of which S rows are touched. The last segment's taps read rows on both sides of
    2**31; a 70-row segment crosses the 64-row blocks; two memories, rows sorted memory-major."""
    run_isolated('case_segment_conv_rows_past_2_31', case)


def case_segment_conv_rows_past_2_31(case):
    import mom_wrap.kernels.segment_conv as kernel
    from mom_wrap.ops import segment_conv
    lengths, seg_memory, first_past, kernel.BLOCK_T, kernel.ROWS_PER_PROGRAM = SEGMENT_CONV_CASES[case]
    g = torch.Generator().manual_seed(7)
    S, D, E, W = sum(lengths), 24, 2, 4
    SX = 2**31 // first_past + 1
    assert (first_past - 1) * SX + D < 2**31 <= first_past * SX < (S - 1) * SX
    memory = torch.tensor(seg_memory).repeat_interleave(torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    base = torch.empty((S - 1) * SX + D, dtype=torch.bfloat16, device=DEVICE)
    x = base.as_strided((S, D), (SX, 1))  # a column slice of a very wide tensor, as the fused projection gives
    x.copy_(torch.randn(S, D, generator=g))
    weight = torch.randn(E, D, W, generator=g).bfloat16()
    bias = torch.randn(E, D, generator=g).bfloat16()
    dy = torch.randn(S, D, generator=g).bfloat16()
    out = {}
    for backend in ('torch', 'triton'):
        # the reference gets a contiguous copy; the kernels the strided view itself (a leaf, so that its
        # gradient is [S, D] and not one of the base's size)
        xin = (x.detach().clone() if backend == 'torch' else x.detach()).requires_grad_()
        w, b = (t.to(DEVICE).requires_grad_() for t in (weight, bias))
        y = segment_conv(xin, w, b, memory.to(DEVICE), position.to(DEVICE), 'silu', backend)
        out[backend] = [y] + list(torch.autograd.grad(y, (xin, w, b), dy.to(DEVICE)))
    for name, ref, got in zip(('y', 'dx', 'dweight', 'dbias'), out['torch'], out['triton']):
        err = rel_err(got, ref)
        assert err < TOL, (name, err)


def test_conv_step_pool_rows_past_2_31():
    """``conv_step_triton`` on a pool [2**21 + 8, 256, 4] bf16 (4.0 GiB, 8 rows touched) whose indexed rows
    start at and past element 2**31, with x [4, 256] whose rows are 699,051 pool rows apart (a third of 2**21:
    its last row starts past 2**31 too). x's rows lie in pool rows that no index names, so one lazily
    committed buffer holds both."""
    run_isolated('case_conv_step_pool_rows_past_2_31')
    # offsets within a pool row stay int32: a pool whose rows' elements lie 2**30 apart is refused (meta
    # tensors: the check comes before any launch)
    from mom_wrap.kernels.conv_step import conv_step_triton
    permuted = torch.empty(3, 256, 4, device='meta').as_strided((3, 256, 4), (1024, 4, 2**30))
    with pytest.raises(ValueError, match='pool'):
        conv_step_triton(torch.empty(2, 256, device='meta'), permuted, None, torch.empty(1, 256, 4, device='meta'),
                         None, None, None, True)


def case_conv_step_pool_rows_past_2_31():
    from mom_wrap.kernels.conv_step import conv_step_triton
    from mom_wrap.ops import conv_step
    g = torch.Generator().manual_seed(8)
    G, D, W, E = 4, 256, 4, 3
    F = D * W  # elements per pool row
    R = 2**31 // F + 8
    K = 2**31 // F // 3 + 1  # x's row stride in pool rows: x row 3 starts in pool row 3K, past 2**31
    base = torch.empty(R * F, dtype=torch.bfloat16, device=DEVICE)
    pool = base.view(R, D, W)
    x = base.as_strided((G, D), (K * F, 1))
    index = torch.tensor([R - 1, 3, 2**31 // F, 2 * K + 1])  # row 2**31 // F starts at 2**31 exactly
    assert 3 * K * F > 2**31 and not set(index.tolist()) & {0, K, 2 * K, 3 * K}
    neighbours = torch.tensor([R - 2, 2, 2**31 // F - 1, 2 * K + 2])
    pool[index] = torch.randn(G, D, W, generator=g).bfloat16().to(DEVICE)
    x.copy_(torch.randn(G, D, generator=g))
    x_before, old, kept = x.clone(), pool[index].clone(), pool[neighbours].clone()
    valid = torch.tensor([True, True, False, True])
    memory = torch.tensor([2, 0, 1, 2])
    weight = torch.randn(E, D, W, generator=g).bfloat16()
    bias = torch.randn(E, D, generator=g).bfloat16()
    y_ref, new_ref = conv_step(x.cpu(), old.cpu(), weight, bias, memory, 'silu')
    with torch.no_grad():
        y = conv_step_triton(x, pool, index.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), memory.to(DEVICE),
                             valid.to(DEVICE), True)
    assert rel_err(y.cpu(), y_ref) < TOL
    want = torch.where(valid[:, None, None], new_ref, old.cpu())
    assert torch.equal(pool[index].cpu(), want)  # a state is a copy of inputs: exact
    assert torch.equal(pool[neighbours], kept) and torch.equal(x, x_before)


def test_scatter_rows_past_2_31():
    """``scatter_rows_`` into a pool [4098, 2**19 + 1000] bf16 (rows of about 1 MiB, 4.0 GiB in all, 4 rows
    touched) at rows starting past element 2**31; the neighbouring row and the invalid row keep theirs."""
    run_isolated('case_scatter_rows_past_2_31')


def case_scatter_rows_past_2_31():
    from mom_wrap.kernels.rows import scatter_rows_
    g = torch.Generator().manual_seed(9)
    F = 2**19 + 1000  # not a multiple of the kernel's block
    R = 4098
    assert (R - 3) * F > 2**31
    dst = torch.empty(R, F, dtype=torch.bfloat16, device=DEVICE)
    index = torch.tensor([R - 1, 3, R - 2], device=DEVICE)
    valid = torch.tensor([True, True, False], device=DEVICE)
    dst[R - 3:] = torch.randn(3, F, generator=g).bfloat16().to(DEVICE)
    before = dst[R - 3:].clone()
    src = torch.randn(3, F, generator=g, dtype=torch.float32).to(DEVICE)
    scatter_rows_(dst, index, src, valid)
    assert torch.equal(dst[R - 1], src[0].bfloat16()) and torch.equal(dst[3], src[1].bfloat16())
    assert torch.equal(dst[R - 3:R - 1], before[:2])  # row R-3 not named, row R-2 invalid


@pytest.mark.gpu
def test_segment_conv_fused_projection_540k_rows():
    """``segment_conv_triton`` forward and backward in bf16 on x [540_000, 4096], a column slice of a fused
    [540_000, 4620] projection, 4 memories in sorted memory-major segments of 1..2048 rows.

    Row * 4620 passes 2**31 from row 464,824 and row * 4096 (y, dy, dx and the fp32 dpre) from row 524,288:
    at 540,000 rows both do, not only x's (470,000 rows, where a GPU first faulted). y, dx, dweight and dbias
    are checked against the torch reference run in fp32 over chunks of whole segments (the conv never
    crosses a segment, so the chunks' y and dx are the full input's, and the weight and bias gradients are
    the chunks' sums): every row is checked. Peak GPU memory 25.3 GiB, all of it the conv's own (fused x
    4.6 GiB; y, dy and dx 4.1 each; the backward's dpre 8.2): the reference's chunks of 32k rows fit in what
    the backward frees. About 7 s on an H200, most of it the child's start and the kernels' compile.
    """
    run_isolated('case_segment_conv_fused_projection_540k_rows')


def case_segment_conv_fused_projection_540k_rows():
    from mom_wrap.ops import segment_conv
    g = torch.Generator().manual_seed(10)
    S, FUSED, OFF, D, E, W = 540_000, 4620, 256, 4096, 4, 4
    lengths = torch.randint(1, 2049, (S // 512,), generator=g)
    lengths = lengths[:int((lengths.cumsum(0) < S).sum()) + 1]
    lengths[-1] -= lengths.sum() - S  # the last segment ends at row S
    seg_memory = torch.randint(0, E, (len(lengths),), generator=g).sort().values
    starts = lengths.cumsum(0) - lengths
    position = (torch.arange(S) - starts.repeat_interleave(lengths)).cuda()
    memory = seg_memory.repeat_interleave(lengths).cuda()
    fused = torch.randn(S, FUSED, device='cuda', dtype=torch.bfloat16)
    x = fused[:, OFF:OFF + D].detach().requires_grad_()  # a leaf view: dx is [S, D], not the fused tensor's size
    assert x.stride(0) * (S - 1) > 2**31 and D * (S - 1) > 2**31
    weight = torch.randn(E, D, W, device='cuda').bfloat16().requires_grad_()
    bias = torch.randn(E, D, device='cuda').bfloat16().requires_grad_()
    y = segment_conv(x, weight, bias, memory, position, 'silu', 'triton')
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), dy)
    torch.cuda.synchronize()  # an illegal address surfaces here, if not sooner
    print(f"peak GPU memory of the triton conv: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    y = y.detach()
    dw_ref = torch.zeros(E, D, W, device='cuda')
    db_ref = torch.zeros(E, D, device='cuda')
    ends = lengths.cumsum(0).tolist()
    lo, errs = 0, {'y': 0., 'dx': 0.}
    while lo < S:
        hi = next((e for e in ends if e - lo >= 32_768), S)  # chunks of whole segments
        xc, w32, b32 = (t.detach().float().requires_grad_() for t in (x[lo:hi], weight, bias))
        yc = segment_conv(xc, w32, b32, memory[lo:hi], position[lo:hi], 'silu', 'torch')
        dxc, dwc, dbc = torch.autograd.grad(yc, (xc, w32, b32), dy[lo:hi].float())
        errs['y'] = max(errs['y'], rel_err(y[lo:hi], yc))
        errs['dx'] = max(errs['dx'], rel_err(dx[lo:hi], dxc))
        dw_ref += dwc
        db_ref += dbc
        lo = hi
    errs.update(dweight=rel_err(dw, dw_ref), dbias=rel_err(db, db_ref))
    print(f"peak GPU memory with the reference: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; errors {errs}")
    assert max(errs.values()) < TOL, errs


if __name__ == '__main__':
    globals()[sys.argv[1]](*sys.argv[2:])
    if DEVICE == 'cpu':  # the big tensors stayed lazily committed
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{sys.argv[1:]}: peak RSS {peak / 2**30:.2f} GiB")
        assert peak < PEAK_RSS, f"peak RSS {peak / 2**30:.2f} GiB"
