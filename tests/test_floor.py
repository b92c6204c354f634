"""The floor of benchmarks/floor.py on the CPU: its Linear count against torch's own FLOP counter, MoM's write side
against the host's, the recurrence's growth with T, every registered host, and GatedDeltaNet by hand."""
import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mom_wrap.adapters.registry import adapter_for
from mom_wrap.wrapper import WRAPPED
from tests import hosts

_PATH = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'floor.py'
_spec = importlib.util.spec_from_file_location('mom_wrap_bench_floor', _PATH)
floor = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = floor  # (its dataclasses look their module up)
_spec.loader.exec_module(floor)

M, TOPK = 4, 2


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize('rows, d_in, d_out', [(7, 5, 3), (128, 64, 96)])
def test_linear_flops_exact(rows, d_in, d_out):
    """linear_cost's FLOPs are torch's own count of an nn.Linear: forward, and forward+backward with the weight's
    and the input's gradients."""
    lin = nn.Linear(d_in, d_out)
    x = torch.randn(rows, d_in, requires_grad=True)
    cost = floor.linear_cost(rows, d_in, d_out)
    assert cost.flops_fwd == _counted(lambda: lin(x))
    assert cost.flops('fwd+bwd') == _counted(lambda: lin(x).sum().backward())
    assert cost.flops_fwd == 2 * rows * d_in * d_out


def test_output_projection_term_is_the_linear():
    """A layer's output term is its o_proj over the N tokens, as torch counts it."""
    host = hosts.make('GatedDeltaNet')
    B, T = 2, 24
    fl = floor.count(host, B, T)
    x = torch.randn(B * T, host.o_proj.in_features)
    assert fl.terms['output'].flops_fwd == _counted(lambda: host.o_proj(x))


@pytest.mark.parametrize('host', hosts.params())
def test_every_host_has_a_positive_floor(host):
    """Every registered host (its example layer) and its MoM: finite positive FLOPs, bytes and floor times on both
    cards, each term non-negative, and MoM's floor above the host's."""
    layer = hosts.make(host)
    plain, mom = floor.count(layer, 2, 256), floor.count(layer, 2, 256, M, TOPK)
    for fl in (plain, mom):
        for mode in ('fwd', 'fwd+bwd'):
            assert math.isfinite(fl.flops(mode)) and fl.flops(mode) > 0
            assert math.isfinite(fl.bytes(mode)) and fl.bytes(mode) > 0
            for card in floor.CARDS.values():
                assert math.isfinite(fl.ms(card, mode)) and fl.ms(card, mode) > 0
        assert all(v >= 0 for c in fl.terms.values() for v in vars(c).values())
        assert fl.terms['recurrence'].flops_fwd > 0 and fl.terms['write'].flops_fwd > 0
    assert plain.terms['routing'].flops() == 0 and mom.terms['routing'].flops() > 0
    assert mom.flops() > plain.flops() and mom.ms(floor.H100_SXM) > plain.ms(floor.H100_SXM)
    # the host is copied, never wrapped itself
    assert not getattr(layer, WRAPPED, False) and all(p.device.type == 'cpu' for p in layer.parameters())


@pytest.mark.parametrize('host', hosts.params())
def test_every_built_in_host_has_its_own_rule(host):
    """The fallback rule is for a user's adapter: every built-in host's recurrence is counted by a rule of its own."""
    assert type(adapter_for(hosts.make(host))).__name__ in floor.RULES


@pytest.mark.parametrize('host', hosts.params())
@pytest.mark.parametrize('shared', [True, False])
def test_mom_slot_terms_are_slots_times_the_host(host, shared):
    """MoM's write side and recurrence run on (topk + shared) x N slot rows: their FLOPs are exactly that many times
    the host's; the read side and the output projection, once per token, are the host's."""
    layer = hosts.make(host)
    plain, mom = floor.count(layer, 1, 128), floor.count(layer, 1, 128, M, TOPK, shared)
    slots = TOPK + int(shared)
    assert mom.slots_per_token == slots
    for term in ('write', 'recurrence'):
        for mode in ('fwd', 'fwd+bwd'):
            assert mom.terms[term].flops(mode) == pytest.approx(slots * plain.terms[term].flops(mode), rel=1e-12)
    for term in ('read', 'output'):
        assert vars(mom.terms[term]) == vars(plain.terms[term])


@pytest.mark.parametrize('host', ['GatedDeltaNet', 'GatedSlotAttention', 'RWKV7Attention'])
def test_recurrence_linear_in_length(host):
    """The recurrence's FLOPs and bytes at 2T and 3T are 2 and 3 times those at T (chunked: no T^2 term); so are a
    whole layer's FLOPs (every term is per token or per slot)."""
    layer = hosts.make(host)
    base = floor.count(layer, 2, 64, M, TOPK)
    for f in (2, 3):
        longer = floor.count(layer, 2, 64 * f, M, TOPK)
        for mode in ('fwd', 'fwd+bwd'):
            assert longer.terms['recurrence'].flops(mode) == pytest.approx(f * base.terms['recurrence'].flops(mode))
            assert longer.terms['recurrence'].bytes(mode) == pytest.approx(f * base.terms['recurrence'].bytes(mode))
        assert longer.flops() == pytest.approx(f * base.flops())


def test_gated_deltanet_by_hand():
    """GatedDeltaNet, hidden 64, 2 heads of K = V = 16 (expand_v 1), short convs of width 4, output gate, at
    B x T = 1 x 128, C = 64; then MoM M=4 top-2 + shared (3 slots per token)."""
    from fla.layers import GatedDeltaNet
    with torch.device('meta'):
        layer = GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=2, expand_v=1, layer_idx=0)
    N, H, K, V, C, D = 128, 2, 16, 16, 64, 64
    # read side: q_proj 64 -> 32, g_proj 64 -> 32, q's conv (32 channels, width 4)
    read = 2 * N * D * 32 + 2 * N * D * 32 + 2 * N * 32 * 4
    # write side: k 64 -> 32, v 64 -> 32, a 64 -> 2, b 64 -> 2 (one fused GEMM); k's and v's convs
    write = 2 * N * D * (32 + 32 + 2 + 2) + 2 * (2 * N * 32 * 4)
    # recurrence (delta rule), per token and head: 3 state GEMMs (w S, k^T v_new, q S), 2CK x 3 (k k^T, w, q k^T),
    # 2CV x 2 (u, A v_new), C^2 / 3 (the triangular inverse)
    per_token_head = 3 * 2 * K * V + 3 * 2 * C * K + 2 * 2 * C * V + C * C / 3
    recurrence = N * H * per_token_head
    output = 2 * N * 32 * D  # o_proj 32 -> 64
    fl = floor.count(layer, 1, 128)
    assert fl.terms['read'].flops_fwd == read == 1081344
    assert fl.terms['write'].flops_fwd == write == 1179648
    assert fl.terms['recurrence'].flops_fwd == pytest.approx(recurrence) == pytest.approx(3364181.333)
    assert fl.terms['output'].flops_fwd == output == 524288
    assert fl.flops('fwd') == pytest.approx(read + write + recurrence + output)
    # backward: the projections twice their forward; the recurrence 8 state GEMMs, 8 x 2CK, 5 x 2CV, 4 C^2
    bwd = 2 * (read + write + output) + N * H * (8 * 2 * K * V + 8 * 2 * C * K + 5 * 2 * C * V + 4 * C * C)
    assert fl.total.flops_bwd == pytest.approx(bwd)
    # bytes of the output projection (bf16): x [N, 32], W [64, 32], y [N, 64]; backward dy, x, W, dx, dW
    assert fl.terms['output'].bytes_fwd == 2 * (N * 32 + 32 * D + N * D) == 28672
    assert fl.terms['output'].bytes_bwd == 2 * (N * D + 2 * N * 32 + 2 * 32 * D)
    # the recurrence's bytes per slot: in k, v (32 each), a, b (2 each), q (H K = 32); out o (32)
    assert fl.terms['recurrence'].bytes_fwd == 2 * N * (32 + 32 + 2 + 2 + 32 + 32)
    # the floor: the larger of compute and memory time
    t = max(fl.flops() / 989e12, fl.bytes() / 3.35e12)
    assert fl.ms(floor.H100_SXM) == pytest.approx(1e3 * t)

    mom = floor.count(layer, 1, 128, memories=4, topk=2, shared=True)
    S = 3 * N
    assert mom.terms['write'].flops_fwd == 3 * write
    assert mom.terms['recurrence'].flops_fwd == pytest.approx(3 * recurrence)
    # router 64 -> 4 per token, the combine of 3 slot outputs (32 wide) per token
    assert mom.terms['routing'].flops_fwd == 2 * N * D * 4 + 2 * S * 32
    # five copies (4 memories + shared) of the fused write weight [68, 64] and of the two convs' [32, 4]
    assert mom.terms['write'].bytes_fwd == 2 * (S * D + 5 * D * 68 + S * 68) + 2 * 2 * (5 * 32 * 4)


def test_card_names():
    assert floor.card_for('NVIDIA H100 80GB HBM3') is floor.H100_SXM
    assert floor.card_for('NVIDIA H200') is floor.H200
    assert floor.card_for('NVIDIA H100 PCIe') is None and floor.card_for('NVIDIA A100-SXM4-80GB') is None
    assert floor.card_for(None) is None
    assert floor.H100_SXM.flops == floor.H200.flops == 989e12
    assert (floor.H100_SXM.bandwidth, floor.H200.bandwidth) == (3.35e12, 4.8e12)
