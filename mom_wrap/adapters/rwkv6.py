"""Adapter for fla's ``RWKV6Attention`` (RWKV-6 "Finch" time mixing).

The host, per token t (x_t [hidden]; delta_t = x_{t-1} - x_t, zero history at each sequence start):
    mu_t = tanh(lerp(x_t, delta_t) @ x_proj) @ x_proj_out + x_bias        five data-dependent mixes (r, w, k, v, g)
    r = r_proj(x + delta * mu_r);  k = k_proj(x + delta * mu_k);  v = v_proj(x + delta * mu_v)
    w = -exp(w_proj(x + delta * mu_w));  g = g_proj(x + delta * mu_g)     w_proj: a tanh LoRA with a bias
    o_t = r_t (S + diag(u) k_t v_t^T);  S <- diag(exp(w_t)) S + k_t v_t^T  (per head; S [K, V]; u: ``bonus``)
    out = o_proj(group_norm(o) * gate_fn(g))

Write side per memory: the linear / LoRA stages of k_proj, v_proj and w_proj. Each reads its own mix of x and
the token-shifted x, made once per token in token order over the whole sequence (read side): every memory
sees the same mixes, only the projections after them are per memory.
Read side once per token: the token shift, the x_proj data-dependent mixes (x_proj, x_bias), r_proj, g_proj,
the bonus u (shared by all memories), g_norm, gate_fn and o_proj.
State per segment: [H, K, V] (the host's own cache layout, fla's RWKV6 kernels' ``[N, H, K, V]``).
The token shift: ``rwkv_common``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import fla_models, padded_segments
from mom_wrap.adapters.rwkv_common import (check_group_norm, group_norm, install_token_shift, lora_projection,
                                           previous_token, token_shift_shapes)
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

NUM_MIXES = 5  # x_proj makes the mixes of r, w, k, v, g, in this order

# fla's ACT2FN gates (Triton kernels, but relu) as PyTorch ops for the torch backend; fla's 'gelu' is the
# tanh approximation
_TORCH_GATES = {'relu': F.relu, 'sigmoid': torch.sigmoid, 'logsigmoid': F.logsigmoid, 'silu': F.silu,
                'swish': F.silu, 'sqrelu': lambda t: F.relu(t).square(),
                'gelu': lambda t: F.gelu(t, approximate='tanh')}


def rwkv6_reference(r, k, v, w, u, cu_seqlens, position, scale=1.0, initial_state=None, output_final_state=False):
    """The RWKV-6 recurrence over packed segments, step by step in fp32: the oracle for fla's kernels.

    r, k, w [S, H, K]; v [S, H, V] (sorted slots, each segment contiguous and time-ordered); w: the log decay,
    as fla's kernels take it (the host passes -exp(w_proj)); u [H, K] the bonus; cu_seqlens [G+1];
    position [S]; initial_state [G, H, K, V] or None. Per segment and head, with state S [K, V]:
        o_t = (S + diag(u) k_t v_t^T)^T (scale r_t);  S <- diag(exp(w_t)) S + k_t v_t^T
    Returns o [S, H, V] (dtype of v) and the final states [G, H, K, V] fp32 (or None).
    """
    S, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    # padded steps have k = v = 0 and w = 0 (decay 1): they leave the state unchanged, so the final state is exact
    segment, (r, k, v, w) = padded_segments(cu_seqlens, position, acc(r) * scale, acc(k), acc(v), acc(w))
    L = r.shape[1]
    u = acc(u)
    state = r.new_zeros(G, H, K, V) if initial_state is None else initial_state.to(r.dtype).clone()
    out = r.new_zeros(G, L, H, V)
    for t in range(L):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum('ghk,ghkv->ghv', r[:, t], state + u[..., None] * kv)
        state = state * w[:, t].exp()[..., None] + kv
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


def _gate_name(fn) -> str | None:
    """The ACT2FN name of the host's gate function (``RWKV6Attention`` keeps the function, not its name)."""
    from fla.modules.activations import ACT2FN
    return next((name for name, f in ACT2FN.items() if f is fn), None)


@register_adapter
class RWKV6Adapter(HostAdapter):
    host_class = 'fla.layers.rwkv6.RWKV6Attention'
    write_modules = ('k_proj', 'v_proj', 'w_proj')

    def __init__(self, host: nn.Module):
        super().__init__(host)
        self.gate = _gate_name(host.gate_fn)
        if self.gate == 'bias_gelu':  # fla's bias_gelu takes (x, bias): the host's one-argument call fails too
            raise ValueError("gate_fn: 'bias_gelu' needs a bias argument, which RWKV6Attention never passes; "
                             f"use one of {sorted(_TORCH_GATES)}")
        check_group_norm(host.g_norm)
        install_token_shift(host)

    @classmethod
    def example_models(cls):
        return fla_models('RWKV6', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2)}, proj_low_rank_dim=8,
                          gate_low_rank_dim=8)

    @classmethod
    def example_host(cls):
        """RWKV6Attention(hidden_size=64, layer_idx=0), default options, with the parameters the host
        initialises to zero redrawn (fixed seed): the lerp mu, x_bias, the bonus u and the LoRA first stages.
        At zero the token shift, the data-dependent mixes and u change nothing, and checks could not see them."""
        host = cls.load_host_class()(hidden_size=64, layer_idx=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in host.named_parameters():
                if name.endswith('mu') or name in ('x_bias', 'bonus'):
                    p.copy_(torch.rand(p.shape, generator=g))
                elif name.endswith('lora.0.weight'):
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        return host

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        # each DDLerpLinear's linear stage (an nn.Linear or fla's LoRA) reading its own mix
        return [lora_projection('k', h.k_proj.linear, 'xk'),
                lora_projection('v', h.v_proj.linear, 'xv'),
                lora_projection('w', h.w_proj.linear, 'xw')]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_k_dim, h.head_v_dim)

    def read_conv_shapes(self):
        return token_shift_shapes(self.host)

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> r [N, H, K], g [N, value_dim] and the write projections' inputs xk, xv, xw
        [N, hidden] (x + delta * mu of each)."""
        h = self.host
        N = x.shape[0]
        delta = previous_token(h, x, layout, backend, conv_rows) - x
        lerp = h.x_proj[0]
        low = h.x_proj[1](lerp.linear(x + delta * lerp.mu)).view(N, NUM_MIXES, -1)
        # x_proj[2] as the host applies it: block-diagonal, each mix from its own rank slice
        mix = torch.einsum('nfr,dfr->nfd', low, h.x_proj[2].weight.view(h.hidden_size, NUM_MIXES, -1)) + h.x_bias
        mu_r, mu_w, mu_k, mu_v, mu_g = mix.unbind(1)
        return {'r': h.r_proj.linear(x + delta * mu_r).unflatten(-1, (-1, h.head_k_dim)),
                'g': h.g_proj.linear(x + delta * mu_g),
                'xk': x + delta * mu_k, 'xv': x + delta * mu_v, 'xw': x + delta * mu_w}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        h = self.host
        r = gather(read['r'], dispatch)
        k = write['k'].unflatten(-1, (-1, h.head_k_dim))
        v = write['v'].unflatten(-1, (-1, h.head_v_dim))
        w = write['w'].unflatten(-1, (-1, h.head_k_dim))
        if backend == 'torch':
            return rwkv6_reference(r, k, v, -acc(w).exp(), h.bonus, dispatch.cu_seqlens, dispatch.position,
                                   initial_state=initial_state, output_final_state=output_final_state)
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
        w = -w.exp()  # the host's log decay, in its dtype
        kwargs = dict(scale=1.0, initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=dispatch.cu_seqlens)
        # chunk whenever gradients flow: fla's fused_recurrent_rwkv6 backward drops the final state's gradient
        # (dht), which a cache chained under autograd needs; otherwise the host's rule, fused_recurrent for
        # short eval inputs (the host: 'fused_recurrent' if T <= 64 else self.mode)
        if torch.is_grad_enabled() or h.training or (dispatch.max_seqlen > 64 and h.mode == 'chunk'):
            o, state = chunk_rwkv6(r[None], k[None], v[None], w[None], h.bonus,
                                   cu_seqlens_cpu=dispatch.cu_seqlens_cpu, **kwargs)
        else:
            o, state = fused_recurrent_rwkv6(r[None], k[None], v[None], w[None], h.bonus, **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, V] -> [N, hidden]: group norm, times gate_fn(g), o_proj."""
        h = self.host
        o = o.flatten(1)
        g = read['g']
        if backend == 'torch':
            y = group_norm(o, h.g_norm)
            gate = _TORCH_GATES[self.gate] if self.gate in _TORCH_GATES else h.gate_fn
            o = (y * acc(gate(acc(g)))).to(o.dtype)
        else:
            o = h.g_norm(o) * h.gate_fn(g)
        return h.o_proj(o)
