"""Adapter for fla's ``KimiDeltaAttention`` (KDA, Kimi Linear's gated delta rule with a per-channel gate;
``fla.layers.kda``, model family ``KDAForCausalLM`` / ``KDAConfig``).

Shapes: N tokens (flattened, token order), S sorted slots, G (memory, sequence) segments; H = num_heads (q/k heads),
HV = num_v_heads (value, gate and beta heads; HV = H unless grouped value attention), K = head_k_dim (= head_dim),
V = head_v_dim (= head_dim * expand_v), R = head_v_dim too (the rank of fla's low-rank f_proj and g_proj).

Write side per memory: k_proj [hidden -> H*K], v_proj [hidden -> HV*V] and their short convs (SiLU inside) when
``use_short_conv``; f_proj, the gate input, low rank in two stages without activation [hidden -> R -> HV*K]; b_proj,
the beta logits [hidden -> HV]. From them, per slot: SiLU on k and v where the host has no short conv, and the
kernels' own steps (the gate, beta's sigmoid, k's L2 norm).
Read side once per token: q_proj [hidden -> H*K] (+ q short conv, or SiLU); g_proj, the output gate, low rank
[hidden -> R -> HV*V] (bias on its second stage); after the combine o_norm (fla's FusedRMSNormGated per value head,
sigmoid gate) and o_proj. Host constants, shared by the memories: A_log [HV] and dt_bias [HV*K] of the gate, the
layer's ``lower_bound`` (float or None) and ``allow_neg_eigval``.
State per segment: [HV, V, K] (fla's ``state_v_first=True`` layout, as the host caches it).

The host's forward (fla 0.6.0), which this adapter follows step by step (shapes per token):
    q = silu(conv(q_proj(x)))  [H, K];  k = silu(conv(k_proj(x)))  [H, K];  v = silu(conv(v_proj(x)))  [HV, V]
        (without short convs: silu of the projections)
    f = f_proj(x)  [HV, K];  b = b_proj(x)  [HV]
    gate (log decay, per channel)  g = -exp(A_log) softplus(f + dt_bias)            without a lower bound,
                                   g = lower_bound * sigmoid(exp(A_log) (f + dt_bias))  with one (safe_gate or not)
    beta = sigmoid(b) (times 2 with allow_neg_eigval);  q, k L2-normalised (eps 1e-6), q scaled by K^-0.5
    per value head (its q/k head: hv // (HV / H)), S [V, K]:
        S <- S diag(exp(g_t));  S <- S + beta_t (v_t - S k_t) k_t^T;  o_t = S q_t
    out = o_proj(rms_norm(o; o_norm.weight, eps=norm_eps) * sigmoid(g_proj(x)))   per value head, then flattened
The gate and beta run inside fla's kernels (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``), as the host
calls them: both take varlen segments (``cu_seqlens``) with an initial and a final state per segment.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import (check_value_heads, fla_models, l2norm, padded_segments, q_conv_shapes,
                                          q_projection, rms_norm_gated)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

FUSED_RECURRENT_MAX_LEN = 64  # the host runs fused_recurrent for eval inputs up to this length, else its mode's
MODES = ('chunk', 'fused_recurrent')
SAFE_LOWER_BOUND = (-5.0, 0.0)  # chunk_kda's range for safe_gate's lower bound: [-5, 0)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
             lower_bound: float | None = None) -> torch.Tensor:
    """KDA's log decay per key channel from the gate input f [..., HV, K] (A_log [HV], dt_bias [HV*K]), in f's
    accumulation dtype: -exp(A_log) softplus(f + dt_bias), or with ``lower_bound`` lower_bound * sigmoid(exp(A_log)
    (f + dt_bias)) (in [lower_bound, 0))."""
    HV, K = f.shape[-2:]
    x = acc(f) + acc(dt_bias).view(HV, K)
    A = acc(A_log).exp()[:, None]
    return -A * F.softplus(x) if lower_bound is None else lower_bound * torch.sigmoid(A * x)


def kda_reference(q, k, v, f, b, A_log, dt_bias, cu_seqlens, position, lower_bound=None, allow_neg_eigval=False,
                  scale=None, initial_state=None, output_final_state=False):
    """KDA over packed segments, step by step in fp32 (fp64 for fp64 inputs): the oracle for fla's kernels.

    q, k [S, H, K]; v [S, HV, V]; f [S, HV, K] the raw gate input, b [S, HV] the beta logits (the gate, beta's
    sigmoid and the q/k L2 norms applied here as fla's kernels apply them); cu_seqlens [G+1]; position [S];
    initial_state [G, HV, V, K] or None. Per segment and value head, with state S [V, K]:
        S <- S diag(exp(g_t));  S <- S + beta_t (v_t - S k_t) k_t^T;  o_t = S (scale q_t)
    Returns o [S, HV, V] (dtype of v) and the final states [G, HV, V, K] in the accumulation dtype (or None).
    """
    S_, H, K = q.shape
    HV, V = v.shape[1:]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    q, k = l2norm(acc(q)) * scale, l2norm(acc(k))
    if HV != H:  # grouped value heads: q/k head j serves value heads j*HV/H .. (j+1)*HV/H - 1
        q, k = q.repeat_interleave(HV // H, dim=1), k.repeat_interleave(HV // H, dim=1)
    g = kda_gate(f, A_log, dt_bias, lower_bound)
    beta = acc(b).sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    # padded steps have g = 0 and beta = 0: they leave the state unchanged, so the final state is exact
    segment, (q, k, v, g, beta) = padded_segments(cu_seqlens, position, q, k, acc(v), g, beta)
    state = q.new_zeros(G, HV, V, K) if initial_state is None else initial_state.to(q.dtype).clone()
    out = q.new_zeros(G, q.shape[1], HV, V)
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[:, :, None, :]
        k_t = k[:, t]
        delta = (v[:, t] - torch.einsum('ghvk,ghk->ghv', state, k_t)) * beta[:, t, :, None]
        state = state + delta[..., None] * k_t[:, :, None, :]
        out[:, t] = torch.einsum('ghvk,ghk->ghv', state, q[:, t])
    return out[segment, position].to(dtype), (state if output_final_state else None)


@register_adapter
class KimiDeltaAttentionAdapter(HostAdapter):
    """Every option of fla 0.6.0's layer is supported: num_heads, num_v_heads (grouped value heads), head_dim,
    expand_v, mode ('chunk', 'fused_recurrent'), use_short_conv (conv_size, conv_bias), allow_neg_eigval, lower_bound
    (with or without safe_gate), norm_eps. Refused (ValueError naming it): an unknown ``mode``, ``safe_gate`` without
    a ``lower_bound`` in [-5, 0) (fla's chunk kernel raises on it, so the host fails whenever it trains), and
    projections unlike the host's own."""

    host_class = 'fla.layers.kda.KimiDeltaAttention'
    write_modules = ('k_proj', 'v_proj', 'f_proj', 'b_proj', 'k_conv1d', 'v_conv1d')

    @classmethod
    def example_host(cls):
        """KimiDeltaAttention(hidden_size=64, head_dim=16, num_heads=2, expand_v=2): K = 16, V = 32; its o_norm
        weight (ones) redrawn from a fixed seed, to count."""
        host = cls.load_host_class()(hidden_size=64, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)
        with torch.no_grad():
            w = host.o_norm.weight
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return host

    @classmethod
    def example_models(cls):
        # the config's norm_eps (1e-6) is not the layer's default (1e-5); the lower bound changes the gate's form
        return fla_models('KDA', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                  'gva_neg_eigval': dict(num_v_heads=4, allow_neg_eigval=True, expand_v=2),
                                  'lower_bound_safe_gate': dict(safe_gate=True, lower_bound=-5.0),
                                  'no_short_conv_fused_recurrent': dict(use_short_conv=False,
                                                                        attn_mode='fused_recurrent')},
                          head_dim=16, num_heads=2, expand_v=1)

    def __init__(self, host: nn.Module):
        super().__init__(host)
        h = host
        if h.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES} (the host's), got {h.mode!r}")
        if h.safe_gate and not (h.lower_bound is not None and SAFE_LOWER_BOUND[0] <= h.lower_bound
                                < SAFE_LOWER_BOUND[1]):
            raise ValueError(f"safe_gate: needs a lower_bound in [-5, 0) (fla's chunk_kda refuses it otherwise), "
                             f"got lower_bound={h.lower_bound!r}")
        check_value_heads(h)
        R = h.head_v_dim
        for name, dims in (('q_proj', (h.key_dim,)), ('k_proj', (h.key_dim,)), ('v_proj', (h.value_dim,)),
                           ('b_proj', (h.num_v_heads,)), ('f_proj', (R, h.gate_dim)), ('g_proj', (R, h.value_dim))):
            m = getattr(h, name, None)
            stages = list(m) if isinstance(m, nn.Sequential) else [m]
            ins = (h.hidden_size, *dims[:-1])
            if not (len(stages) == len(dims) and all(isinstance(s, nn.Linear) and (s.in_features, s.out_features)
                                                     == (i, o) for s, i, o in zip(stages, ins, dims))):
                raise ValueError(f"{name}: expected the host's Linear stages {list(zip(ins, dims))}, got {m!r}")

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        conv = h.use_short_conv
        return [WriteProjection('k', h.k_proj, h.k_conv1d if conv else None),
                WriteProjection('v', h.v_proj, h.v_conv1d if conv else None),
                WriteProjection('f', h.f_proj[0], second=h.f_proj[1], activation=None),
                WriteProjection('b', h.b_proj)]

    def state_shape(self):
        h = self.host
        return (h.num_v_heads, h.head_v_dim, h.head_k_dim)

    def read_conv_shapes(self):
        return q_conv_shapes(self.host)

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (q_proj, its conv or SiLU) and 'gate' [N, HV, V] (g_proj): once per
        token."""
        h = self.host
        q = q_projection(h, x, layout, backend, conv_rows)
        if not h.use_short_conv:  # the host's SiLU without the conv
            q = F.silu(q)
        return {'q': q.unflatten(-1, (h.num_heads, h.head_k_dim)),
                'gate': h.g_proj(x).unflatten(-1, (h.num_v_heads, h.head_v_dim))}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k' [S, H*K], 'v' [S, HV*V], 'f' [S, HV*K], 'b' [S, HV] per sorted slot; read: 'q' [N, H, K].
        Returns o [S, HV, V] and the final states [G, HV, V, K] (or None)."""
        h = self.host
        q = gather(read['q'], dispatch)
        k, v = write['k'], write['v']
        if not h.use_short_conv:
            k, v = F.silu(k), F.silu(v)
        k, v = k.unflatten(-1, (h.num_heads, h.head_k_dim)), v.unflatten(-1, (h.num_v_heads, h.head_v_dim))
        f, b = write['f'].unflatten(-1, (h.num_v_heads, h.head_k_dim)), write['b']
        if backend == 'torch':
            return kda_reference(q, k, v, f, b, h.A_log, h.dt_bias, dispatch.cu_seqlens, dispatch.position,
                                 h.lower_bound, h.allow_neg_eigval, initial_state=initial_state,
                                 output_final_state=output_final_state)
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
        kwargs = dict(A_log=h.A_log, dt_bias=h.dt_bias, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                      use_beta_sigmoid_in_kernel=True, allow_neg_eigval=h.allow_neg_eigval,
                      lower_bound=h.lower_bound, state_v_first=True, cu_seqlens=dispatch.cu_seqlens)
        # the host's rule (on the longest segment here): chunk whenever gradients flow or in training (it asserts
        # chunk there), fused_recurrent for eval inputs up to 64 tokens, else its mode's kernel
        if torch.is_grad_enabled() or h.training or (dispatch.max_seqlen > FUSED_RECURRENT_MAX_LEN
                                                     and h.mode == 'chunk'):
            # use_graph: chunk_kda takes no chunk indices from its caller and otherwise uploads the ones it makes
            # on the host with a blocking copy, a second host sync per forward; with it, fla builds them on the
            # device from cu_seqlens (its fixed-shape graph mode: one chunk list of ceil(S / 64) + G - 1 rows, the
            # rows past the segments' chunks skipped by its kernels; every segment here is a real one, so every
            # output row is written)
            o, state = chunk_kda(q[None], k[None], v[None], f[None], b[None], safe_gate=h.safe_gate,
                                 use_graph=True, **kwargs)
        else:
            o, state = fused_recurrent_kda(q[None], k[None], v[None], f[None], b[None], **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, HV, V] -> [N, hidden]: o_norm (RMS norm per value head, times sigmoid of the gate), o_proj."""
        h = self.host
        norm = h.o_norm
        if backend == 'torch':
            o = rms_norm_gated(o, read['gate'], norm.weight, norm.bias, norm.eps, norm.activation)
        else:
            o = norm(o, read['gate'])
        return h.o_proj(o.flatten(1))
