"""Adapter for fla's ``MultiScaleRetention`` (RetNet, ``fla.layers.multiscale_retention``; model family
``RetNetForCausalLM`` / ``RetNetConfig``).

Shapes: N tokens (flattened, token order), S sorted slots, G (memory, sequence) segments; H = num_heads, Hkv =
num_kv_heads, K = head_k_dim, V = head_v_dim, R = the rotary dim (K as the host builds it).

Write side per memory: k_proj [hidden -> Hkv*K], v_proj [hidden -> Hkv*V] (the k/v short convs when
``use_short_conv``), and after them, per slot: the feature map on k, the rotary embedding on k, the head repeat.
Read side once per token: q_proj (+ q short conv), the feature map and rotary embedding on q, g_proj (the output
gate), the output norm (``g_norm_swish_gate``, or ``g_norm`` and ``gate_fn``) and o_proj.
Shared by the memories, not a parameter: each head's fixed decay gamma_h = 1 - 2^(-5-h) (fla's retention kernels
compute it from the head count; so does ``retention_decay``), and the rotary tables.
State per segment: [H, K, V] (fla's default layout, as the host caches it; the k/v heads repeated).

Rotary positions. A token's rotary position is its position in its *sequence* (among that sequence's valid tokens),
never its rank among the tokens routed to a memory: a memory sees a subsequence, but q_t . k_s must keep the
relative angle of t - s, and with M=1 the wrapper is then the host exactly. The read side makes the tables once per
token (``read``: 'cos', 'sin' [N, R/2], in x's dtype as the host's cache is); the recurrence gathers them to the
slots for k. Where the positions start:
* no cache: 0 at every sequence start: every row of a batch, every packed sequence (fla's rotary kernel restarts at
  each ``cu_seqlens`` offset too), the first valid token after left padding (the host unpads by the mask first);
* with a cache: after the sequence's tokens seen so far. fla's layer takes that count from the cache's token counter
  (``get_seq_length``, one count for all sequences, corrected by the mask's padding); one count cannot serve packed
  sequences continued through the cache (each has seen its own number of tokens), so the adapter keeps each
  sequence's count itself, in a read-side pool the cache carries per sequence (``read_conv_shapes``: 'position',
  [num_sequences, 4, 1], base-256 digits: exact in any float dtype of the pool, bf16 included, up to 2^32 tokens),
  updated with the sequence's valid tokens of each forward (a padding token of a decode step leaves it, as it
  leaves the other states). Where fla's count is right (no packing; padding only in the first chunk) the two agree.

The host's forward, which this adapter follows step by step: q, k, v (after the short convs, SiLU inside them);
the feature map on q and k; the rotary embedding on q and k at the positions above; k, v repeated from num_kv_heads
to num_heads; the recurrence (scale = K^-0.5)
    S <- gamma_h S + k_t v_t^T (S [K, V] per head);  o_t = scale q_t^T S
then the norm and output gate and o_proj.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import (fla_models, padded_segments, q_conv_shapes, q_projection, rms_norm,
                                          rms_norm_gated)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent up to this length in inference, else its mode's kernel
POSITION = 'position'  # the read-side pool of each sequence's token count (rotary offset under a cache)
DIGITS, BASE = 4, 256  # the count in base-256 digits: integers below 257 are exact in bf16


def retention_decay(num_heads: int, device=None) -> torch.Tensor:
    """RetNet's fixed per-head log decay [H], fp32: log(1 - 2^(-5-h)) for head h (the paper's gamma_h)."""
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log1p(-torch.exp2(-5.0 - h))


def retention_reference(q, k, v, cu_seqlens, position, initial_state=None, output_final_state=False, scale=None):
    """Retention over packed segments, step by step in fp32: the oracle for fla's kernels.

    q, k [S, H, K] (after feature map and rotary); v [S, H, V]; cu_seqlens [G+1]; position [S] (slot's position in
    its segment); initial_state [G, H, K, V] or None. Per segment and head h, with state S [K, V] and the fixed
    decay gamma_h (``retention_decay``):
        S <- gamma_h S + k_t v_t^T;  o_t = scale q_t^T S
    Returns o [S, H, V] (dtype of v) and the final states [G, H, K, V] (fp32) or None.
    """
    dtype, (_, H, K), V = v.dtype, q.shape, v.shape[-1]
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    segment, (q, k, v) = padded_segments(cu_seqlens, position, acc(q) * scale, acc(k), acc(v))
    L = q.shape[1]
    gamma = retention_decay(H, q.device).exp().to(q.dtype)  # [H]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [G]
    state = q.new_zeros(G, H, K, V) if initial_state is None else acc(initial_state).clone()
    out = q.new_zeros(G, L, H, V)
    for t in range(L):
        # a segment's steps past its end (zero k, v) must not decay its state either: the final state is exact
        decay = torch.where((t < lengths)[:, None], gamma, 1)  # [G, H]
        state = state * decay[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum('ghkv,ghk->ghv', state, q[:, t])
    return out[segment, position].to(dtype), (state if output_final_state else None)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotary embedding of x [N, heads, D] with per-row tables cos, sin [N, R/2] (the same for every head): the
    first R channels rotated in pairs (halves, or adjacent channels when ``interleaved``) in fp32, the rest kept."""
    R = 2 * cos.shape[-1]
    xf, c, s = acc(x[..., :R]), acc(cos)[:, None], acc(sin)[:, None]
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        y = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
    else:
        x0, x1 = xf.chunk(2, -1)
        y = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], -1)
    return torch.cat([y.to(x.dtype), x[..., R:]], -1)


def _encode(count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token counts [n] (integer) -> [n, DIGITS, 1] base-256 digits in ``dtype``."""
    place = BASE ** torch.arange(DIGITS, device=count.device)
    return (count[:, None] // place % BASE).to(dtype)[..., None]


def _decode(digits: torch.Tensor) -> torch.Tensor:
    """[n, DIGITS, 1] -> the counts [n] (long)."""
    place = BASE ** torch.arange(DIGITS, device=digits.device)
    return (digits[..., 0].round().long() * place).sum(-1)


@register_adapter
class MultiScaleRetentionAdapter(HostAdapter):
    """Every option of the host is supported (every mode, ``num_kv_heads``, ``feature_map``, ``use_short_conv``,
    ``use_output_gate``, ``gate_fn``, ``fuse_norm``, ``elementwise_affine``, ``norm_eps``), and of its rotary embedding
    ``interleaved`` and a rotary dim below head_k_dim. Refused: a rotary embedding with XPos (``scale_base``: its
    scales depend on the length of the host's cached tables, not only on positions), with ``pos_idx_in_fp32=False``,
    wider than a head, or not fla's."""

    host_class = 'fla.layers.multiscale_retention.MultiScaleRetention'
    write_modules = ('k_proj', 'v_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_host(cls):
        return cls.load_host_class()(hidden_size=64, num_heads=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        # the config's norm_eps (1e-6) is not the layer's default (1e-5); fuse_norm=False also swaps the block norms
        return fla_models('RetNet', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                     'unfused_norm': dict(fuse_norm=False),
                                     'kv_heads_relu': dict(num_kv_heads=1, feature_map='relu', expand_k=0.5),
                                     'no_output_gate': dict(use_output_gate=False, elementwise_affine=False)},
                          num_heads=2)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        # (feature_map_fn and gate_fn, transformers' activation modules, are PyTorch: both backends call them)
        rotary = getattr(h, 'rotary', None)
        if rotary is None or not hasattr(rotary, 'inv_freq'):
            raise ValueError(f"rotary: expected fla's RotaryEmbedding, got {rotary!r}")
        if rotary.scale_base is not None or not rotary.pos_idx_in_fp32 or rotary.dim > h.head_k_dim:
            raise ValueError(f"rotary: {rotary!r} (scale_base={rotary.scale_base}) is not supported by the MoM "
                             "MultiScaleRetention adapter: only plain rotary (no XPos scale_base, fp32 positions) "
                             f"over at most head_k_dim={h.head_k_dim} channels")

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                WriteProjection('v', h.v_proj, h.v_conv1d if conv else None)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_k_dim, h.head_v_dim)

    def read_conv_shapes(self):
        return {**q_conv_shapes(self.host), POSITION: (DIGITS, 1)}

    def _positions(self, layout, conv_rows) -> torch.Tensor:
        """Each token's rotary position [N] (long): its position among its sequence's valid tokens, after the
        tokens the cache has seen of that sequence (whose counts it then advances)."""
        if conv_rows is None:
            return layout.position
        rows = conv_rows[POSITION]
        old = rows.read()
        seen = _decode(old)  # [num_sequences]
        if layout.one_token_per_sequence:  # a decode step: token b is sequence b's next one
            positions, count = seen, torch.ones_like(seen)
        else:
            positions = seen[layout.sequence] + layout.position
            count = layout.cu_seqlens.diff()  # valid tokens per sequence
        rows.write(_encode(seen + count, old.dtype))  # (a decode step's padding rows keep theirs)
        return positions

    def _inv_freq(self) -> torch.Tensor:
        """The rotary inverse frequencies [R/2], fp32 (recomputed as the host does where its buffer was cast)."""
        rotary = self.host.rotary
        if rotary.inv_freq.dtype == torch.float32:
            return rotary.inv_freq
        dim = rotary.dim
        return 1.0 / (rotary.base ** (torch.arange(0, dim, 2, device=rotary.inv_freq.device,
                                                   dtype=torch.float32) / dim))

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (conv, feature map, rotary: once per token), the rotary tables 'cos',
        'sin' [N, R/2] of each token's position (k's, per slot, in ``recurrence``) and, with the output gate,
        'gate' [N, value_dim]."""
        h = self.host
        angles = self._positions(layout, conv_rows).float()[:, None] * self._inv_freq()[None]  # [N, R/2] fp32
        cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
        q = q_projection(h, x, layout, backend, conv_rows).unflatten(-1, (h.num_heads, h.head_k_dim))
        if h.feature_map_fn is not None:
            q = h.feature_map_fn(q)
        read = {'q': _rotate(q, cos, sin, h.rotary.interleaved), 'cos': cos, 'sin': sin}
        if h.use_output_gate:
            read['gate'] = h.g_proj(x)
        return read

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k' [S, Hkv*K], 'v' [S, Hkv*V] per sorted slot; initial_state [G, H, K, V] or None.
        Returns o [S, H, V] and the final states [G, H, K, V] (or None)."""
        h = self.host
        q = gather(read['q'], dispatch)
        k = write['k'].unflatten(-1, (h.num_kv_heads, h.head_k_dim))
        v = write['v'].unflatten(-1, (h.num_kv_heads, h.head_v_dim))
        if h.feature_map_fn is not None:
            k = h.feature_map_fn(k)
        # rotary at each slot's token position (the memory's rank of it does not matter), before the head repeat
        k = _rotate(k, gather(read['cos'], dispatch), gather(read['sin'], dispatch), h.rotary.interleaved)
        if h.num_kv_groups > 1:  # kv head j serves query heads j*groups .. j*groups + groups-1, as fla repeats
            k, v = (t.repeat_interleave(h.num_kv_groups, dim=1) for t in (k, v))
        if backend == 'torch':
            return retention_reference(q, k, v, dispatch.cu_seqlens, dispatch.position, initial_state,
                                       output_final_state)
        return self._kernel(q, k, v, dispatch, initial_state, output_final_state)

    def _kernel(self, q, k, v, dispatch, initial_state, output_final_state):
        """fla's retention functions' own bodies on all segments at once (varlen, per-segment states): the
        simple_gla kernel of the host's mode rule with the fixed decay ``g_gamma`` (each segment's decay counted
        from its own start). Called below fla's ``*_retention`` to pass chunk_simple_gla the host-side
        ``cu_seqlens_cpu`` (``chunk_retention`` drops it)."""
        from fla.ops.simple_gla import (chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla,
                                        parallel_simple_gla)
        g_gamma = retention_decay(q.shape[1], q.device)
        kw = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=dispatch.cu_seqlens)
        # the host's rule: chunk whenever gradients are on, else fused_recurrent up to 64 tokens (on the longest
        # segment here), else its mode's kernel; 'parallel' keeps no state: chunk where one goes in or comes out
        mode = 'chunk' if torch.is_grad_enabled() else \
            'fused_recurrent' if dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN else self.host.mode
        if mode == 'parallel' and (initial_state is not None or output_final_state):
            mode = 'chunk'
        if mode == 'chunk':
            o, state = chunk_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma,
                                        cu_seqlens_cpu=dispatch.cu_seqlens_cpu, **kw)
        elif mode == 'fused_chunk':
            o, state = fused_chunk_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma, **kw)
        elif mode == 'parallel':
            g = g_gamma.expand(1, q.shape[0], -1)  # the per-token form of the fixed decay
            o, state = parallel_simple_gla(q[None], k[None], v[None], g=g, cu_seqlens=dispatch.cu_seqlens,
                                           cu_seqlens_cpu=dispatch.cu_seqlens_cpu)
            state = None
        else:
            o, state = fused_recurrent_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma, **kw)
        return o[0].to(v.dtype), state if output_final_state else None

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: the host's norm and output gate, then o_proj."""
        h = self.host
        if h.fuse_norm_and_gate:  # FusedRMSNormGated: rms_norm(o) * weight * swish(gate), per head
            norm, gate = h.g_norm_swish_gate, read['gate'].unflatten(-1, (-1, h.head_v_dim))
            o = rms_norm_gated(o, gate, norm.weight, norm.bias, norm.eps, norm.activation) if backend == 'torch' \
                else norm(o, gate)
            return h.o_proj(o.flatten(1))
        norm = h.g_norm  # RMSNorm per head (fp32 weights), then gate_fn(g) over the flat value dim
        o = rms_norm(o, norm.weight, norm.bias, norm.eps).to(o.dtype) if backend == 'torch' else norm(o)
        o = o.flatten(1)
        if h.use_output_gate:
            o = o * h.gate_fn(read['gate'])
        return h.o_proj(o)

