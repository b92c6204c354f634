"""The floor of a layer: the FLOPs and the minimum HBM bytes of one forward (and of one forward+backward) of a
host layer or of a MixtureOfMemories around it, and the time no implementation can beat on a given card,

    floor_s = max(FLOPs / peak_flops, bytes / peak_bandwidth)

counted from the real layer objects (issue 24, "Record"). Standard library and torch; no GPU: the layers are built
on the meta device (on the CPU where a host's constructor needs values), wrapped, and only their shapes are read.

    python benchmarks/floor.py --host GatedDeltaNet --batch 8 --seq-len 2048 [--memories 4 --topk 2]

Terms, N = B x T tokens, S = s x N slots (s = topk + shared for a MixtureOfMemories, 1 for the plain host), E = the
memories' weight copies (M + shared; 1 for the host), bf16 (2 bytes) for activations, weights and gradients:

* ``read``: the read side, once per token: every nn.Linear of the host that is neither a write projection nor the
  output projection, [N, in] @ [in, out]: 2 N in out FLOPs forward, twice that backward (dx and dW); every short
  conv (depthwise, width W over D channels): 2 N D W forward, twice that backward.
* ``write``: the write side, once per slot: each write projection ``WriteProjection`` (``adapter.write_projections``,
  stacked by the wrapper into ``MemoryBank``), its low-rank second stage and its short conv, on S rows with E copies
  of the weights: 2 S in out (+ 2 S rank out + 2 S D W), backward twice that.
* ``recurrence``: the host's chunked recurrence over the S slots, per slot and head, for each (K, V) pass that the
  host's state holds (``adapter.state_shape()`` read through ``RULES``), with chunk size C = 64:

      forward  = 2 K V a_s + 2 C K a_k + 2 C V a_v + C^2 a_q
      backward = 2 K V b_s + 2 C K b_k + 2 C V b_v + C^2 b_q

  2 K V per [K]x[V] GEMM per token (the state passing between chunks: the state update k^T v, the read q S, ...),
  2 C K and 2 C V per [C, C] attention matrix q k^T or its product with v inside a chunk, C^2 per token for the
  delta rule's triangular (I + A)^-1 (C^3 / 3 FLOPs per chunk forward; its backward two [C, C] GEMMs, 4 C^2 per
  token). The coefficients of each family (``LINEAR``, ``DELTA``, ``DPLR``) are below with the fla kernels they
  count; the backward is, as a rule, every forward GEMM twice (one per operand's gradient) plus what fla's backward
  recomputes.
* ``routing`` (MixtureOfMemories only): the router [N, hidden] @ [hidden, M] in fp32 logits, the top-k, and the
  weighted combine of the s slot outputs of each token, 2 s N D_o FLOPs (D_o: the output projection's input width).
* ``output``: the output projection (``o_proj``, mamba-ssm's ``out_proj``), once per token.

Bytes are each term's inputs, outputs and weights, once each (forward: inputs, weights, outputs; backward: the output
gradient, the inputs, the weights, the input and weight gradients): what stays inside a term (a projection's output
before its conv, a LoRA's middle, the recurrence's per-chunk states) is taken as on-chip. That is a floor, not what
today's kernels move: fla's chunk kernels also write the chunk states [K, V] (one per C tokens) between their
kernels, and a gathered slot's input is read once per slot.

Left out: elementwise work (norms, gates, activations, casts, the L2 norms of q and k), biases, the sort and the
plan's bookkeeping, partly filled chunks at segment ends (a segment of L tokens pays ceil(L / C) chunks), and the
causal masks (full [C, C] blocks are counted, as fla computes them).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

CHUNK = 64  # fla's chunk size for every host's chunked kernel as mom_wrap calls it (RWKV7: chunk_size=64 passed)
ELEM = 2    # bytes of bf16: activations, weights, gradients
FP32 = 4    # the router's logits and weights


@dataclass(frozen=True)
class Card:
    """A GPU's peaks: dense bf16 tensor-core FLOP/s and HBM bytes/s."""
    name: str
    flops: float
    bandwidth: float
    source: str


# NVIDIA's datasheets give bf16 tensor-core throughput "with sparsity" (1,979 TFLOPS for both); dense is half.
H100_SXM = Card('H100 SXM', 989e12, 3.35e12,
                'NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity '
                '(989 dense), GPU memory bandwidth 3.35 TB/s')
H200 = Card('H200', 989e12, 4.8e12,
            'NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity '
            '(989 dense), GPU memory bandwidth 4.8 TB/s')
CARDS = {'H100': H100_SXM, 'H200': H200}


def card_for(device_name: str | None) -> Card | None:
    """The card of ``torch.cuda.get_device_name()``: H200 for any H200 name, H100 SXM for the H100's HBM3/SXM part
    ("NVIDIA H100 80GB HBM3"); None for any other card (the PCIe and NVL H100s have other peaks)."""
    name = (device_name or '').upper()
    if 'H200' in name:
        return H200
    if 'H100' in name and 'PCIE' not in name and 'NVL' not in name:
        return H100_SXM
    return None


@dataclass
class Cost:
    """FLOPs and bytes of one term, forward and backward apart."""
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops_fwd + other.flops_fwd, self.flops_bwd + other.flops_bwd,
                    self.bytes_fwd + other.bytes_fwd, self.bytes_bwd + other.bytes_bwd)

    def flops(self, mode: str = 'fwd+bwd') -> float:
        return self.flops_fwd + (self.flops_bwd if mode == 'fwd+bwd' else 0.0)

    def bytes(self, mode: str = 'fwd+bwd') -> float:
        return self.bytes_fwd + (self.bytes_bwd if mode == 'fwd+bwd' else 0.0)


def linear_cost(rows: int, in_features: int, out_features: int, copies: int = 1, elem: int = ELEM) -> Cost:
    """y [rows, out] = x [rows, in] @ W^T, W [out, in] (``copies`` of W, one per memory, each read once).
    FLOPs: 2 rows in out forward; backward dx = dy W and dW = dy^T x, 4 rows in out. Bytes: forward x, W, y;
    backward dy, x, W, dx, dW."""
    mm = 2 * rows * in_features * out_features
    w = copies * in_features * out_features
    return Cost(mm, 2 * mm, elem * (rows * in_features + w + rows * out_features),
                elem * (rows * out_features + 2 * rows * in_features + 2 * w))


def conv_cost(rows: int, channels: int, width: int, copies: int = 1, elem: int = ELEM, io: bool = True) -> Cost:
    """A depthwise causal conv of ``width`` taps over [rows, channels]: 2 rows channels width FLOPs forward, twice
    that backward (input and weight gradients). With ``io`` its input and output bytes (forward: x, y; backward:
    dy, x, dx) and weights; without (a conv fused after its projection): its weights only."""
    f = 2 * rows * channels * width
    w = copies * channels * width
    act = rows * channels if io else 0
    return Cost(f, 2 * f, elem * (2 * act + w), elem * (3 * act + 2 * w))


@dataclass(frozen=True)
class Family:
    """The chunked recurrence's coefficients (see the module docstring): per token and head, forward
    2 K V state + 2 C K k + 2 C V v + C^2 square, backward likewise with the ``b`` ones; ``kernels``: what they
    count, in fla's source."""
    name: str
    state: float
    k: float
    v: float
    square: float
    b_state: float
    b_k: float
    b_v: float
    b_square: float
    kernels: str

    def flops(self, K: int, V: int, C: int = CHUNK) -> tuple[float, float]:
        """(forward, backward) FLOPs per token and head of one (K, V) pass."""
        return (2 * K * V * self.state + 2 * C * K * self.k + 2 * C * V * self.v + C * C * self.square,
                2 * K * V * self.b_state + 2 * C * K * self.b_k + 2 * C * V * self.b_v + C * C * self.b_square)


LINEAR = Family(
    'linear attention (decay gated)', 2, 1, 1, 0, 5, 3, 2, 0,
    'fla/ops/common/chunk_h.py chunk_fwd_h: S += k_c^T v_c per chunk (2KV per token); chunk_o.py chunk_fwd_o: '
    'q S (2KV), A = q k^T (2CK), A v (2CV). Backward: h recomputed (2KV), dh = q^T do (2KV), dq = do h^T, '
    'dk = v dh^T, dv = k dh (6KV); A recomputed, dq += dA k, dk += dA^T q (6CK); dA = do v^T, dv += A^T do (4CV). '
    'Also chunk_gla (per-channel gates, intra-chunk in 16-row sub-blocks), chunk_simple_gla, chunk_rwkv6; ours: '
    'mom_wrap/kernels/scalar_decay.py chunk_scalar_decay (Mamba2)')
DELTA = Family(
    'delta rule (WY / UT transform)', 3, 3, 2, 1 / 3, 8, 8, 5, 4,
    'fla/ops/common/chunk_scaled_dot_kkt.py: A = beta k k^T (2CK); solve_tril: (I + A)^-1 (C^3/3 per chunk); '
    'gated_delta_rule/wy_fast.py recompute_w_u: w = A beta k (2CK), u = A beta v (2CV); common/chunk_delta_h.py: '
    'v_new = u - w S (2KV), S += k^T v_new (2KV); chunk_o.py: q S (2KV), q k^T (2CK), A v_new (2CV). Backward: '
    'every GEMM twice, the inverse\'s gradient -A^T dA A^T (4C^2), and the recomputed w, u (2CK + 2CV), S and v_new '
    '(4KV) and q k^T (2CK). DeltaNet (delta_rule/chunk.py), GatedDeltaNet (gated_delta_rule/chunk.py), KDA '
    '(kda/chunk.py)')
DPLR = Family(
    'diagonal plus low rank (generalized delta rule)', 4, 5, 4, 1 / 3, 11, 15, 10, 4 + 1 / 3,
    'fla/ops/generalized_delta_rule/dplr/chunk.py chunk_dplr_fwd: chunk_A_fwd: A_qk, A_qb, A_ak, A_ab (8CK); '
    'wy_fast_fwd: A_ab^-1 (C^3/3 per chunk), w = A_ab^-1 a (2CK), u = A_ab^-1 (A_ak v) (4CV); chunk_h_fwd: '
    'v_new = u + w S (2KV), S += k^T v + b^T v_new (4KV); chunk_o_fwd: q S (2KV), A_qk v + A_qb v_new (4CV). '
    'Backward (recomputing all of it but o): every GEMM twice plus the recomputation. RWKV7 (rwkv7/chunk.py)')


def _gdn_like(shape):    # [HV, V, K] (fla's state_v_first layout)
    return shape[0], [(shape[2], shape[1])]


def _kv(shape):          # [H, K, V]
    return shape[0], [(shape[1], shape[2])]


def _vk(shape):          # [H, V, K]
    return shape[0], [(shape[2], shape[1])]


@dataclass(frozen=True)
class Rule:
    """A host's recurrence: its family, and its heads and (K, V) passes from (adapter, state_shape)."""
    family: Family
    passes: Callable
    note: str


# adapter class name -> rule. passes(adapter, state_shape) -> (heads, [(K, V) of each chunked pass]).
RULES: dict[str, Rule] = {
    'GatedDeltaNetAdapter': Rule(DELTA, lambda a, s: _gdn_like(s), 'chunk_gated_delta_rule; state [HV, V, K]'),
    'KimiDeltaAttentionAdapter': Rule(DELTA, lambda a, s: _gdn_like(s), 'chunk_kda; state [HV, V, K]'),
    'DeltaNetAdapter': Rule(DELTA, lambda a, s: _kv(s), 'chunk_delta_rule; state [H, K, V]'),
    'GatedLinearAttentionAdapter': Rule(LINEAR, lambda a, s: _vk(s), 'chunk_gla; state [H, V, K]'),
    'HGRN2Adapter': Rule(LINEAR, lambda a, s: _vk(s), 'chunk_gla (k = 1 - f); state [H, i, f]'),
    'RWKV6Adapter': Rule(LINEAR, lambda a, s: _kv(s), 'chunk_rwkv6; state [H, K, V]'),
    'MultiScaleRetentionAdapter': Rule(LINEAR, lambda a, s: _kv(s), 'chunk_simple_gla (g_gamma); state [H, K, V]'),
    'LinearAttentionAdapter': Rule(LINEAR, lambda a, s: _kv(s),
                                   'chunk_simple_gla; state [H, F, V (+1: the normaliser\'s column)]'),
    'Mamba2Adapter': Rule(LINEAR, lambda a, s: _vk(s), 'chunk_scalar_decay (ours); state [H, P, N]: K = N, V = P'),
    'FlaMamba2Adapter': Rule(LINEAR, lambda a, s: _vk(s), 'chunk_scalar_decay (ours); state [H, P, N]: K = N, V = P'),
    'Mamba3Adapter': Rule(LINEAR, lambda a, s: (s[0], [(a.N, a.P)]),
                          'mamba3_siso_combined: one scalar-decay pass (rotation and trapezoid inside); the packed '
                          'state [H, P N + N + P + A]: K = N, V = P'),
    'FlaMamba3Adapter': Rule(LINEAR, lambda a, s: (s[0], [(a.N, a.P)]),
                             'mamba3_siso_combined (mamba-ssm\'s): as Mamba3Adapter'),
    'RWKV7Adapter': Rule(DPLR, lambda a, s: _kv(s), 'chunk_rwkv7 -> chunk_dplr_delta_rule; state [H, K, V]'),
    # fla/ops/gsa/chunk.py chunk_gsa: two chunk_gla-like passes, q k^T over K into the M slots (state [K, M]), a
    # softmax over the slots, then over M into the values (state [M, V]); the adapter's state is [H, M, K + V]
    'GatedSlotAttentionAdapter': Rule(LINEAR, lambda a, s: (s[0], [(a.host.head_k_dim, s[1]),
                                                                     (s[1], s[2] - a.host.head_k_dim)]),
                                      'chunk_gsa: two passes, (K, M) then (M, V); state [H, M, K + V]'),
}
DEFAULT_RULE = Rule(LINEAR, lambda a, s: (s[0], [(s[1], math.prod(s[2:]))]),
                    'no entry in floor.RULES: counted as decay-gated linear attention, state [H, K, V]')
OUTPUT_NAMES = ('o_proj', 'out_proj')  # the host's output projection (fla; mamba-ssm and fla's Mamba2)
TERMS = ('read', 'write', 'recurrence', 'routing', 'output')


@dataclass
class Floor:
    """The floor of one layer at B x T: its terms (``TERMS`` -> Cost) and what they were counted from."""
    name: str
    batch: int
    seq_len: int
    slots_per_token: int
    terms: dict[str, Cost] = field(default_factory=dict)
    rule: str = ''

    @property
    def total(self) -> Cost:
        out = Cost()
        for cost in self.terms.values():
            out = out + cost
        return out

    def flops(self, mode: str = 'fwd+bwd') -> float:
        return self.total.flops(mode)

    def bytes(self, mode: str = 'fwd+bwd') -> float:
        return self.total.bytes(mode)

    def seconds(self, card: Card, mode: str = 'fwd+bwd') -> float:
        """max(FLOPs / peak FLOP/s, bytes / peak bandwidth) of the whole layer: each term at its own peak would
        give a higher floor (sum of the terms' maxima); this one is the bound any schedule of them meets."""
        return max(self.flops(mode) / card.flops, self.bytes(mode) / card.bandwidth)

    def ms(self, card: Card, mode: str = 'fwd+bwd') -> float:
        return 1e3 * self.seconds(card, mode)

    def bound(self, card: Card, mode: str = 'fwd+bwd') -> str:
        return 'compute' if self.flops(mode) / card.flops >= self.bytes(mode) / card.bandwidth else 'memory'

    def record(self, card: Card | None, mode: str = 'fwd+bwd') -> dict:
        """The keys a benchmark row gets: floor_ms (None without a known card), floor_flops, floor_bytes,
        floor_card, floor_bound."""
        return {'floor_ms': None if card is None else round(self.ms(card, mode), 4),
                'floor_flops': self.flops(mode), 'floor_bytes': self.bytes(mode),
                'floor_card': None if card is None else card.name,
                'floor_bound': None if card is None else self.bound(card, mode)}


def _linears(module: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def _convs(module: nn.Module) -> list[tuple[int, int]]:
    """(channels, width) of every depthwise conv (fla's ShortConvolution, torch's Conv1d)."""
    return [(m.weight.shape[0], m.weight.shape[-1]) for m in module.modules() if isinstance(m, nn.Conv1d)]


def count_wrapped(mom, batch: int, seq_len: int, routed: bool = True, chunk: int = CHUNK,
                  name: str | None = None) -> Floor:
    """The floor of the MixtureOfMemories ``mom`` at ``batch`` x ``seq_len``; with ``routed=False`` that of its
    host alone (a one-memory wrap, as ``count`` makes it: no router, no combine, one slot per token)."""
    N = batch * seq_len
    s = mom.topk + int(mom.shared_memory) if routed else 1
    S, E = s * N, mom.num_slots_memories
    bank, host, adapter = mom.memories, mom.host, mom._adapter
    hidden = mom.hidden_size

    # write side, per slot: the projections of x (one fused [E, sum(out), hidden] weight), the others' own inputs,
    # the low-rank second stages and the short convs (fused after their projection: no bytes of their own)
    write, out_width = Cost(), {}
    if bank.weight is not None:
        write = write + linear_cost(S, hidden, bank.weight.shape[1], E)
        out_width.update(zip(bank.x_names, bank.out_features))
    for n, w in bank.input_weight.items():
        write = write + linear_cost(S, w.shape[2], w.shape[1], E)
        out_width[n] = w.shape[1]
    for n, w in bank.second.items():  # [E, out, rank]: the rank-wide middle stays on chip (forward: the first
        # stage's output and this stage's input; backward: this stage's input and input gradient, the first's dy)
        c = linear_cost(S, w.shape[2], w.shape[1], E)
        write = write + Cost(c.flops_fwd, c.flops_bwd, c.bytes_fwd - ELEM * 2 * S * w.shape[2],
                             c.bytes_bwd - ELEM * 4 * S * w.shape[2])
        out_width[n] = w.shape[1]
    for n, w in bank.conv.items():  # [E, D, W]
        write = write + conv_cost(S, w.shape[1], w.shape[2], E, io=False)

    # read side, per token: the host's Linears and convs left after the wrap, but its output projection
    out_name = next((n for n, _ in _linears(host) if n in OUTPUT_NAMES), None)
    if out_name is None:
        raise ValueError(f"{type(host).__name__}: no output projection named one of {OUTPUT_NAMES}")
    o_proj = host.get_submodule(out_name)
    read = Cost()
    for _, lin in _linears(host, skip=(out_name,)):
        read = read + linear_cost(N, lin.in_features, lin.out_features)
    for channels, width in _convs(host):
        read = read + conv_cost(N, channels, width)
    output = linear_cost(N, o_proj.in_features, o_proj.out_features)

    # recurrence, per slot: inputs the write side's outputs and the gathered query, output D_o wide
    rule = RULES.get(type(adapter).__name__, DEFAULT_RULE)
    heads, passes = rule.passes(adapter, tuple(adapter.state_shape()))
    flops_fwd = flops_bwd = 0.0
    for K, V in passes:
        f, b = rule.family.flops(K, V, chunk)
        flops_fwd, flops_bwd = flops_fwd + S * heads * f, flops_bwd + S * heads * b
    d_in = sum(out_width.values()) + heads * passes[0][0]  # + q [H, K] per slot
    d_out = o_proj.in_features
    recurrence = Cost(flops_fwd, flops_bwd, ELEM * S * (d_in + d_out), ELEM * S * (2 * d_in + d_out))

    terms = {'read': read, 'write': write, 'recurrence': recurrence, 'routing': Cost(), 'output': output}
    if routed:  # logits fp32 [N, M]; the s weights (fp32) and indices (int64) per token; the combine
        M = mom.num_memories
        router = linear_cost(N, hidden, M)
        router = Cost(router.flops_fwd, router.flops_bwd,
                      ELEM * (N * hidden + hidden * M) + FP32 * N * M + (FP32 + 8) * N * s,
                      ELEM * (2 * N * hidden + 2 * hidden * M) + FP32 * (N * M + N * s))
        combine = Cost(2 * S * d_out, 4 * S * d_out, ELEM * (S * d_out + N * d_out) + FP32 * S,
                       ELEM * (N * d_out + 2 * S * d_out) + FP32 * 2 * S)
        terms['routing'] = router + combine
    label = name or (f"MoM({type(host).__name__}) M={mom.num_memories} top-{mom.topk}"
                     f"{' + shared' if mom.shared_memory else ''}" if routed else type(host).__name__)
    return Floor(label, batch, seq_len, s, terms, f"{rule.family.name}: {rule.note}")


def _wrap(host: nn.Module, memories: int, topk: int, shared: bool):
    from mom_wrap import MixtureOfMemories
    return MixtureOfMemories(copy.deepcopy(host), num_memories=memories, topk=topk, shared_memory=shared)


def count(host: nn.Module, batch: int, seq_len: int, memories: int | None = None, topk: int = 2,
          shared: bool = True, chunk: int = CHUNK) -> Floor:
    """The floor of the unwrapped layer ``host`` at ``batch`` x ``seq_len`` (``memories=None``), or of a
    MixtureOfMemories of ``memories`` memories, top-``topk`` (+ the shared memory) around a copy of it. The host
    is copied, never changed; build it on the meta device to count a large layer without its memory."""
    if memories is None:  # one memory, one slot per token: the host's write side as the wrapper stacks it
        return count_wrapped(_wrap(host, 1, 1, False), batch, seq_len, routed=False, chunk=chunk,
                             name=type(host).__name__)
    return count_wrapped(_wrap(host, memories, topk, shared), batch, seq_len, chunk=chunk)


def count_layer(layer: nn.Module, batch: int, seq_len: int, chunk: int = CHUNK) -> Floor:
    """The floor of a layer as a benchmark holds it: a MixtureOfMemories as it is, a plain host (``count``)."""
    from mom_wrap import MixtureOfMemories
    if isinstance(layer, MixtureOfMemories):
        return count_wrapped(layer, batch, seq_len, chunk=chunk)
    return count(layer, batch, seq_len, chunk=chunk)


def build(factory: Callable[[], nn.Module]) -> nn.Module:
    """factory() on the meta device (no memory, no init work); on the CPU where the host's constructor needs
    values (RWKV7's reads one with ``.item()``)."""
    try:
        with torch.device('meta'):
            return factory()
    except (RuntimeError, NotImplementedError):
        return factory()


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def table(floors: list[Floor], cards: list[Card]) -> str:
    """Per layer: each term's FLOPs and bytes (forward / backward), the totals, and the floor on each card."""
    lines = []
    for fl in floors:
        lines.append(f"{fl.name}  B x T = {fl.batch} x {fl.seq_len}  ({fl.slots_per_token} slot(s) per token; "
                     f"recurrence: {fl.rule})")
        lines.append(f"  {'term':<12}{'FLOPs fwd':>14}{'FLOPs bwd':>14}{'bytes fwd':>14}{'bytes bwd':>14}")
        for t in TERMS + ('total',):
            c = fl.total if t == 'total' else fl.terms[t]
            lines.append(f"  {t:<12}{_si(c.flops_fwd, 'F'):>14}{_si(c.flops_bwd, 'F'):>14}"
                         f"{_si(c.bytes_fwd, 'B'):>14}{_si(c.bytes_bwd, 'B'):>14}")
        for card in cards:
            lines.append(f"  floor on {card.name}: fwd {fl.ms(card, 'fwd'):.3f} ms ({fl.bound(card, 'fwd')} bound), "
                         f"fwd+bwd {fl.ms(card):.3f} ms ({fl.bound(card)} bound)")
        lines.append('')
    if len(floors) == 2:
        a, b = floors
        lines.append(f"{b.name} / {a.name}: FLOPs {b.flops() / a.flops():.2f}x, bytes {b.bytes() / a.bytes():.2f}x, "
                     + ', '.join(f"floor on {c.name} {b.ms(c) / a.ms(c):.2f}x" for c in cards) + ' (fwd+bwd)')
    lines.append('Peaks: ' + '; '.join(f"{c.name} {c.flops / 1e12:.0f} TFLOP/s bf16 dense, "
                                       f"{c.bandwidth / 1e12:.2f} TB/s ({c.source})" for c in cards))
    return '\n'.join(lines)


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_layer import host_factory, layer_args  # the benchmark's layer sizes and options
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_args(p)
    p.add_argument('--no-shared', action='store_true', help='no shared memory')
    p.add_argument('--card', choices=sorted(CARDS), nargs='+', default=sorted(CARDS))
    args = p.parse_args(argv)
    host = build(host_factory(args.host, args.hidden, args.heads, args.head_dim))
    floors = [count(host, args.batch, args.seq_len),
              count(host, args.batch, args.seq_len, args.memories, args.topk, not args.no_shared)]
    print(table(floors, [CARDS[c] for c in args.card]))


if __name__ == '__main__':
    main()
