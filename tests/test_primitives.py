"""The routing primitives on the CPU, each against an obvious reference written here (plain loops, F.conv1d,
F.linear), never against the code under test: plan_dispatch / gather / combine, segment_conv,
grouped_linear (grouped-GEMM path and fallback), TokenLayout."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import mom_wrap.ops as ops
from mom_wrap.dispatch import combine, gather, inverse_permutation, permute_rows, plan_dispatch
from mom_wrap.layout import TokenLayout
from mom_wrap.ops import grouped_linear, segment_conv


def close(a, b, tol=2e-5):
    err = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
    scale = b.float().abs().max().item() if b.numel() else 0.0
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (ref max {scale:.3e})"


def causal_conv_ref(x, w, b, activation):
    """x [L, D], w [D, W], b [D] or None -> [L, D]: depthwise causal conv, tap W-1 on the current token."""
    L, D = x.shape
    W = w.shape[-1]
    if L == 0:
        return x.clone()
    y = F.conv1d(x.t()[None], w[:, None, :], b, padding=W - 1, groups=D)[0, :, :L].t()
    return F.silu(y) if activation == 'silu' else y


# ------------------------------------------------------------------------------------------------ plan_dispatch

@st.composite
def routings(draw):
    Q = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 7), min_size=Q, max_size=Q).filter(lambda l: sum(l) > 0))
    E = draw(st.integers(1, 5))
    s = draw(st.integers(1, E))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return Q, lengths, E, s, masked, seed


@pytest.mark.parametrize('kernels', [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get('TRITON_INTERPRET') != '1', reason='the Triton plan on CPU tensors: TRITON_INTERPRET=1'))])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(routings())
def test_plan_dispatch_matches_loop_reference(kernels, case):
    """The plan against a sort written out, in PyTorch ops and (``kernels``) as the Triton counting sort."""
    Q, lengths, E, s, masked, seed = case
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    sequence = torch.repeat_interleave(torch.arange(Q), torch.tensor(lengths))
    memory = torch.stack([torch.randperm(E, generator=g)[:s] for _ in range(N)])  # distinct memories per token
    weight = torch.rand(N, s, generator=g)
    valid = torch.rand(N, generator=g) < 0.7 if masked else None
    d = plan_dispatch(memory, weight, sequence, valid, Q, E, kernels=kernels)

    # reference: all slots of valid tokens, sorted by (memory, sequence, time); flat index n is time order
    is_valid = [True] * N if valid is None else valid.tolist()
    slots = sorted((memory[n, j].item(), sequence[n].item(), n, j)
                   for n in range(N) for j in range(s) if is_valid[n])
    S = len(slots)
    assert d.num_slots == S
    assert d.token.tolist() == [n for _, _, n, _ in slots]
    assert d.memory.tolist() == [m for m, _, _, _ in slots]

    # segments: contiguous runs of equal (memory, sequence), positions 0..len-1
    seg_keys, seg_lens, position = [], [], []
    for m, q, _, _ in slots:
        if seg_keys and seg_keys[-1] == (m, q):
            seg_lens[-1] += 1
        else:
            seg_keys.append((m, q))
            seg_lens.append(1)
        position.append(seg_lens[-1] - 1)
    assert len(set(seg_keys)) == len(seg_keys)  # each (memory, sequence) pair is one contiguous segment
    assert d.position.tolist() == position
    cu = [0]
    for L in seg_lens:
        cu.append(cu[-1] + L)
    assert d.cu_seqlens_cpu.device.type == 'cpu'
    assert d.cu_seqlens_cpu.tolist() == cu
    assert d.cu_seqlens.tolist() == cu
    assert d.num_segments == len(seg_keys)
    assert d.segment_memory.tolist() == [m for m, _ in seg_keys]
    assert d.segment_sequence.tolist() == [q for _, q in seg_keys]
    assert d.max_seqlen == max(seg_lens, default=0)

    # per-memory blocks
    counts = [sum(1 for m, *_ in slots if m == e) for e in range(E)]
    assert d.memory_offsets.dtype == torch.int32
    assert d.memory_offsets.tolist() == [sum(counts[:e + 1]) for e in range(E)]
    assert d.memory_offsets_cpu.device.type == 'cpu'
    assert d.memory_offsets_cpu.tolist() == d.memory_offsets.tolist()

    # restore: every valid token slot -> the sorted row that holds it; padding slots -> >= S
    row_of = {(n, j): r for r, (_, _, n, j) in enumerate(slots)}
    for n in range(N):
        for j in range(s):
            r = d.restore[n, j].item()
            if is_valid[n]:
                assert r == row_of[(n, j)]
            else:
                assert r >= S

    # gather picks rows by token
    D = 3
    x = torch.randn(N, D, generator=g)
    got = gather(x, d)
    assert got.shape == (S, D)
    for r, (_, _, n, _) in enumerate(slots):
        assert torch.equal(got[r], x[n])

    # combine: sum over a token's slots of weight * y, y a function of (token, memory); padding -> zeros
    table = torch.randn(N, E, D, generator=g)
    y = torch.stack([table[n, m] for m, _, n, _ in slots]) if S else torch.zeros(0, D)
    out = combine(y, d)
    expect = torch.zeros(N, D)
    for n in range(N):
        if is_valid[n]:
            for j in range(s):
                expect[n] += weight[n, j] * table[n, memory[n, j]]
    assert out.shape == (N, D)
    close(out, expect, tol=1e-6)
    for n in range(N):
        if not is_valid[n]:
            assert torch.equal(out[n], torch.zeros(D))


def test_combine_bf16_accumulates_and_returns_dtype():
    N, s, E, D = 5, 2, 3, 4
    memory = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    weight = torch.rand(N, s)
    d = plan_dispatch(memory, weight, torch.zeros(N, dtype=torch.long), None, 1, E)
    table = torch.randn(N, E, D)
    y = torch.stack([table[n, m] for n, m in zip(d.token.tolist(), d.memory.tolist())]).bfloat16()
    out = combine(y, d)
    assert out.dtype == torch.bfloat16
    expect = torch.stack([sum(weight[n, j] * table[n, memory[n, j]].bfloat16().float() for j in range(s))
                          for n in range(N)])
    close(out, expect, tol=1e-2)


# ------------------------------------------------------------------------------------------------ segment_conv

def make_segments(lengths):
    memory = torch.cat([torch.full((L,), m, dtype=torch.long) for L, m in lengths])
    position = torch.cat([torch.arange(L) for L, _ in lengths])
    return memory, position


SEGMENTS = [(3, 0), (1, 0), (6, 1), (2, 2), (4, 1), (5, 2), (1, 1)]  # (length, memory); some shorter than W


@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('W', [4, 2])
def test_segment_conv_matches_conv1d_per_segment(activation, use_bias, W):
    E, D = 3, 5
    g = torch.Generator().manual_seed(1)
    memory, position = make_segments(SEGMENTS)
    x = torch.randn(memory.numel(), D, generator=g)
    weight = torch.randn(E, D, W, generator=g)
    bias = torch.randn(E, D, generator=g) if use_bias else None
    y = segment_conv(x, weight, bias, memory, position, activation)
    start = 0
    for L, m in SEGMENTS:
        ref = causal_conv_ref(x[start:start + L], weight[m], bias[m] if use_bias else None, activation)
        close(y[start:start + L], ref, tol=1e-5)
        start += L
    assert start == y.shape[0]


def test_segment_conv_single_memory_without_memory_index():
    D, W = 4, 4
    lengths = [5, 2, 7]
    x = torch.randn(sum(lengths), D)
    weight = torch.randn(1, D, W)
    bias = torch.randn(1, D)
    position = torch.cat([torch.arange(L) for L in lengths])
    y = segment_conv(x, weight, bias, None, position, 'silu')
    start = 0
    for L in lengths:
        close(y[start:start + L], causal_conv_ref(x[start:start + L], weight[0], bias[0], 'silu'), tol=1e-5)
        start += L


def test_segment_conv_does_not_leak_across_segments():
    E, D, W = 3, 4, 4
    memory, position = make_segments(SEGMENTS)
    x = torch.randn(memory.numel(), D)
    weight = torch.randn(E, D, W)
    bias = torch.randn(E, D)
    y = segment_conv(x, weight, bias, memory, position, None)
    start = 0
    for i, (L, _) in enumerate(SEGMENTS[:-1]):
        # change every row before the next segment: that segment's output must not move
        x2 = x.clone()
        x2[:start + L] = torch.randn(start + L, D) * 100
        y2 = segment_conv(x2, weight, bias, memory, position, None)
        assert torch.equal(y2[start + L:], y[start + L:]), f"segment {i + 1} reads segment {i}"
        start += L


def test_segment_conv_rejects_unknown_activation():
    with pytest.raises(ValueError, match='activation'):
        segment_conv(torch.randn(3, 2), torch.randn(1, 2, 4), None, None, torch.arange(3), 'relu')


# ------------------------------------------------------------------------------------------------ grouped_linear

def linear_loop(x, weight, memory):
    return torch.stack([F.linear(x[r], weight[memory[r]]) for r in range(x.shape[0])])


def routed_rows(counts, D_in, dtype, g):
    """Rows sorted memory-major: x [R, D_in], memory [R], and the blocks' ends (device int32, host)."""
    memory = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ends = torch.tensor(counts).cumsum(0)
    x = torch.randn(memory.numel(), D_in, generator=g).to(dtype)
    return x, memory, (ends.to(torch.int32), ends)


@pytest.fixture(params=['grouped', 'fallback'])
def path(request, monkeypatch):
    if request.param == 'fallback':
        monkeypatch.setattr(ops, '_grouped_mm_ok', lambda x, weight: False)
    return request.param


# zero rows for the first, a middle and the last memory
COUNTS = [[3, 5, 2, 4], [0, 4, 0, 3, 0], [7], [0, 0, 5]]


@pytest.mark.parametrize('counts', COUNTS)
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_linear_matches_linear_loop(path, counts, dtype, tol):
    D_in, D_out = 16, 8  # 16-byte aligned rows in fp32 and bf16
    g = torch.Generator().manual_seed(2)
    x, memory, offsets = routed_rows(counts, D_in, dtype, g)
    weight = torch.randn(len(counts), D_out, D_in, generator=g).to(dtype)
    if path == 'grouped' and not ops._grouped_mm_ok(x, weight):
        pytest.skip(f"torch has no grouped GEMM for cpu/{dtype}")
    y = grouped_linear(x, weight, memory, *offsets)
    assert y.shape == (x.shape[0], D_out) and y.dtype == dtype
    close(y, linear_loop(x.float(), weight.float(), memory), tol=tol)


@pytest.mark.parametrize('counts', COUNTS)
def test_grouped_linear_gradients_match_linear_loop(path, counts):
    D_in, D_out = 16, 8
    g = torch.Generator().manual_seed(3)
    x, memory, offsets = routed_rows(counts, D_in, torch.float32, g)
    weight = torch.randn(len(counts), D_out, D_in, generator=g)
    grad = torch.randn(x.shape[0], D_out, generator=g)
    if path == 'grouped':
        assert ops._grouped_mm_ok(x, weight), "expected the grouped-GEMM path for cpu/fp32"
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grouped_linear(x1, w1, memory, *offsets).backward(grad)
    x2, w2 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_loop(x2, w2, memory).backward(grad)
    close(x1.grad, x2.grad, tol=1e-5)
    close(w1.grad, w2.grad, tol=1e-5)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(w1.grad[e], torch.zeros(D_out, D_in))


def test_add_memory_bias_equals_indexing_and_reduces_its_gradient_in_fp32():
    torch.manual_seed(0)
    memory = torch.randint(0, 3, (200,))
    y, bias = torch.randn(200, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, b: ops.add_memory_bias(y, b, memory),
                                    (y.requires_grad_(), bias.requires_grad_()))
    out = ops.add_memory_bias(y, bias, memory)
    torch.testing.assert_close(out, y + bias[memory], rtol=0, atol=0)
    # bf16: the 200 rows are summed per memory in fp32, then rounded once
    yb, bb = y.detach().bfloat16().requires_grad_(), bias.detach().bfloat16().requires_grad_()
    g = torch.randn(200, 5, dtype=torch.bfloat16)
    out = ops.add_memory_bias(yb, bb, memory)
    out.backward(g)
    assert out.dtype == torch.bfloat16 and yb.grad.dtype == torch.bfloat16 and torch.equal(yb.grad, g)
    expected = torch.zeros(3, 5, dtype=torch.float64).index_add_(0, memory, g.double()).bfloat16()
    assert torch.equal(bb.grad, expected)


def test_grouped_linear_unaligned_rows_take_fallback():
    # 5 fp32 features = 20 bytes per row: not 16-byte aligned, so grouped_linear must not take the grouped path
    g = torch.Generator().manual_seed(4)
    x, memory, offsets = routed_rows([2, 0, 3], 5, torch.float32, g)
    weight = torch.randn(3, 6, 5, generator=g)
    assert not ops._grouped_mm_ok(x, weight)
    close(grouped_linear(x, weight, memory, *offsets), linear_loop(x, weight, memory), tol=1e-5)


def mm_flops(fn):
    """Matrix-multiply FLOPs of fn() as torch counts them (its counter does not see grouped GEMMs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def grouped_calls(monkeypatch):
    """A list that grows by one for each grouped GEMM call."""
    calls = []
    real = ops._grouped_mm
    monkeypatch.setattr(ops, '_grouped_mm', lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize('D_out', [6, 5, 4620 // 64])  # rows of 24, 20, 288 bytes in fp32; 72 = 4620 / 64
def test_grouped_linear_any_output_width_takes_grouped_path(grouped_calls, D_out):
    """Regression: an output width whose rows are not 16-byte aligned (fla's default GatedDeltaNet size fuses
    to 4620 columns) used to send every forward to the E-fold product. torch's grouped GEMM takes any output
    width; only its backward wants aligned gradient rows, which ``_AlignedGrad`` provides."""
    g = torch.Generator().manual_seed(6)
    x, memory, ends = routed_rows([3, 0, 4, 2], 16, torch.float32, g)
    weight = torch.randn(4, D_out, 16, generator=g)
    grad = torch.randn(x.shape[0], D_out, generator=g)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grouped_linear(x1, w1, memory, *ends).backward(grad)
    assert grouped_calls, "grouped GEMM not used"
    x2, w2 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_loop(x2, w2, memory).backward(grad)
    close(x1.grad, x2.grad)
    close(w1.grad, w2.grad)


def test_grouped_linear_fallback_costs_one_product_per_row(monkeypatch):
    """Without a grouped GEMM, memory-major rows cost R x out x in multiply-adds: one product per memory block
    (E launches), never every memory for every row."""
    monkeypatch.setattr(ops, '_grouped_mm_ok', lambda x, weight: False)
    g = torch.Generator().manual_seed(7)
    x, memory, ends = routed_rows([30, 0, 20, 14], 16, torch.float32, g)
    weight = torch.randn(4, 72, 16, generator=g)
    want = linear_loop(x, weight, memory)
    assert mm_flops(lambda: close(grouped_linear(x, weight, memory, *ends), want)) == 2 * x.shape[0] * 72 * 16


def test_grouped_linear_many_unsorted_rows_sort_on_device(monkeypatch, grouped_calls):
    """Rows in token order with j memories each (a decode step): up to DENSE_MAX_ROWS every memory's product is
    taken (E per row); past it the slots are sorted by memory for one grouped GEMM, forward and backward."""
    g = torch.Generator().manual_seed(8)
    E, j, R = 5, 2, 12
    x = torch.randn(R, 16, generator=g)
    memory = torch.stack([torch.randperm(E, generator=g)[:j] for _ in range(R)]).reshape(-1)
    weight = torch.randn(E, 8, 16, generator=g)
    want = linear_loop(x.repeat_interleave(j, 0), weight, memory)
    assert mm_flops(lambda: close(grouped_linear(x, weight, memory), want)) == 2 * R * E * 8 * 16
    assert not grouped_calls
    monkeypatch.setattr(ops, 'DENSE_MAX_ROWS', 4)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = grouped_linear(x1, w1, memory)
    assert len(grouped_calls) == 1 and mm_flops(lambda: grouped_linear(x, weight, memory)) == 0
    close(y, want)
    grad = torch.randn(R * j, 8, generator=g)
    y.backward(grad)
    x2, w2 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_loop(x2.repeat_interleave(j, 0), w2, memory).backward(grad)
    close(x1.grad, x2.grad)
    close(w1.grad, w2.grad)


def test_grouped_linear_backward_from_sum_on_grouped_path():
    """torch's grouped GEMM backward rejects stride-0 gradients (from .sum().backward()); ours must not."""
    g = torch.Generator().manual_seed(5)
    x, memory, offsets = routed_rows([2, 3], 16, torch.float32, g)
    weight = torch.randn(2, 8, 16, generator=g)
    assert ops._grouped_mm_ok(x, weight)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grouped_linear(x1, w1, memory, *offsets).sum().backward()
    x2, w2 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_loop(x2, w2, memory).sum().backward()
    close(x1.grad, x2.grad)
    close(w1.grad, w2.grad)


@pytest.mark.parametrize('use_memory', [False, True])
@pytest.mark.parametrize('activation', [None, 'silu'])
def test_segment_conv_gradients_match_conv1d_per_segment(use_memory, activation):
    g = torch.Generator().manual_seed(11)
    lengths, E, D, W = [3, 1, 6, 2, 5], 3, 5, 4
    memory = torch.tensor([0, 0, 1, 2, 2]).repeat_interleave(torch.tensor(lengths)) if use_memory else None
    position = torch.cat([torch.arange(n) for n in lengths])
    x = torch.randn(sum(lengths), D, generator=g, requires_grad=True)
    weight = torch.randn(E if use_memory else 1, D, W, generator=g, requires_grad=True)
    bias = torch.randn(E if use_memory else 1, D, generator=g, requires_grad=True)
    dy = torch.randn(sum(lengths), D, generator=g)
    (segment_conv(x, weight, bias, memory, position, activation) * dy).sum().backward()
    got = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    outs, start = [], 0
    seg_memory = [0, 0, 1, 2, 2] if use_memory else [0] * len(lengths)
    for n, e in zip(lengths, seg_memory):
        xs = x[start:start + n]
        y = F.conv1d(xs.t()[None], weight[e][:, None], bias[e], padding=W - 1, groups=D)[0, :, :n].t()
        outs.append(F.silu(y) if activation else y)
        start += n
    (torch.cat(outs) * dy).sum().backward()
    for a, b in zip(got, (x.grad, weight.grad, bias.grad)):
        close(a, b, tol=1e-5)


# ------------------------------------------------------------------------------------------------ TokenLayout

@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('use_bias', [False, True])
def test_layout_conv_with_holey_mask_matches_conv1d_over_valid_tokens(activation, use_bias):
    B, T, D, W = 3, 6, 4, 4
    mask = torch.tensor([[1, 0, 1, 1, 0, 1],
                         [0, 0, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0]])
    layout = TokenLayout.build(B, T, torch.device('cpu'), attention_mask=mask)
    assert layout.num_sequences == B
    assert layout.sequence.tolist() == [b for b in range(B) for _ in range(T)]
    assert layout.valid.tolist() == mask.bool().reshape(-1).tolist()
    for b in range(B):
        k = 0
        for t in range(T):
            if mask[b, t]:
                assert layout.position[b * T + t].item() == k
                k += 1
    x = torch.randn(B * T, D)
    weight = torch.randn(D, 1, W)
    bias = torch.randn(D) if use_bias else None
    y = layout.conv(x, weight, bias, activation)
    assert y.shape == (B * T, D)
    for b in range(B):
        rows = [b * T + t for t in range(T) if mask[b, t]]
        ref = causal_conv_ref(x[rows], weight[:, 0], bias, activation)
        close(y[rows], ref, tol=1e-5)


def test_layout_mask_longer_than_seq_len_uses_last_columns():
    B, T, D, W = 2, 4, 3, 3
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 0, 1]])  # last T columns are the current tokens
    layout = TokenLayout.build(B, T, torch.device('cpu'), attention_mask=mask)
    cur = mask[:, -T:]
    assert layout.valid.tolist() == cur.bool().reshape(-1).tolist()
    x = torch.randn(B * T, D)
    weight = torch.randn(D, 1, W)
    y = layout.conv(x, weight, None, None)
    for b in range(B):
        rows = [b * T + t for t in range(T) if cur[b, t]]
        close(y[rows], causal_conv_ref(x[rows], weight[:, 0], None, None), tol=1e-5)


def test_layout_dense_batch():
    B, T = 2, 5
    layout = TokenLayout.build(B, T, torch.device('cpu'))
    assert layout.valid is None and layout.num_sequences == B
    assert layout.sequence.tolist() == [0] * T + [1] * T
    assert layout.position.tolist() == list(range(T)) * B
    assert layout.token_bounds.tolist() == [0, T, 2 * T]
    masked = TokenLayout.build(B, T, torch.device('cpu'), attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1] * 5]))
    assert masked.token_bounds.tolist() == [0, T, 2 * T]  # rows, padding included (cu_seqlens counts valid tokens)
    assert masked.cu_seqlens.tolist() == [0, 3, 8]


@pytest.mark.parametrize('cu', [[0, 3, 10, 12], [0, 4, 4, 9, 12], [0, 12]])  # incl. an empty sequence
def test_layout_cu_seqlens_sequence_position_and_conv(cu):
    T, D, W = 12, 4, 4
    layout = TokenLayout.build(1, T, torch.device('cpu'), cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert layout.num_sequences == len(cu) - 1
    assert layout.valid is None
    seq, pos = [], []
    for i in range(len(cu) - 1):
        seq += [i] * (cu[i + 1] - cu[i])
        pos += list(range(cu[i + 1] - cu[i]))
    assert layout.sequence.tolist() == seq
    assert layout.position.tolist() == pos
    assert layout.token_bounds.tolist() == cu
    x = torch.randn(T, D)
    weight = torch.randn(D, 1, W)
    bias = torch.randn(D)
    y = layout.conv(x, weight, bias, 'silu')
    for i in range(len(cu) - 1):
        close(y[cu[i]:cu[i + 1]], causal_conv_ref(x[cu[i]:cu[i + 1]], weight[:, 0], bias, 'silu'), tol=1e-5)


def test_layout_rejects_bad_inputs():
    cpu = torch.device('cpu')
    with pytest.raises(ValueError, match='batch size 1'):
        TokenLayout.build(2, 4, cpu, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match='cannot both'):
        TokenLayout.build(1, 4, cpu, attention_mask=torch.ones(1, 4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match='attention_mask'):
        TokenLayout.build(2, 4, cpu, attention_mask=torch.ones(2, 3))


@pytest.mark.parametrize('use_memory', [False, True])
@pytest.mark.parametrize('activation', [None, 'silu'])
def test_conv_step_equals_segment_conv_with_state_on_single_rows(use_memory, activation):
    from mom_wrap.ops import conv_step, segment_conv_with_state
    g = torch.Generator().manual_seed(4)
    G, D, W, E = 6, 5, 4, 3
    x = torch.randn(G, D, generator=g)
    state = torch.randn(G, D, W, generator=g)
    weight = torch.randn(E if use_memory else 1, D, W, generator=g)
    bias = torch.randn(E if use_memory else 1, D, generator=g)
    memory = torch.randint(0, E, (G,), generator=g) if use_memory else None
    y, s = conv_step(x, state, weight, bias, memory, activation)
    y_ref, s_ref = segment_conv_with_state(x, weight, bias, memory, torch.arange(G + 1), state, activation)
    close(y, y_ref, tol=1e-6)
    assert torch.equal(s, s_ref)


def test_permute_rows_is_index_select_both_ways():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(7, generator=g)
    y = permute_rows(x, perm, inverse_permutation(perm))
    dy = torch.randn(7, 3, 2, generator=g, dtype=torch.float64)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_()
    x2.index_select(0, perm).backward(dy)
    assert torch.equal(y, x.index_select(0, perm)) and torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize('lengths', [[1], [64], [65, 1, 128, 200], [3, 0, 5]])
def test_chunk_indices_equal_fla(lengths):
    from fla.ops.utils.index import prepare_chunk_indices

    from mom_wrap.dispatch import chunk_indices
    cu = torch.tensor([0] + lengths).cumsum(0)
    for chunk in (4, 64):
        assert torch.equal(chunk_indices(cu, chunk), prepare_chunk_indices(cu.clone(), chunk))
