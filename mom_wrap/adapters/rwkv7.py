"""Adapter for fla's ``RWKV7Attention`` (RWKV-7 "Goose" time mixing).

The host, per token t (x_t [hidden]; delta_t = x_{t-1} - x_t, zero history at each sequence start):
    x_c = x + delta * x_c  for c in r, w, k, v, a, g                    the lerp mixes (fla's fused_addcmul)
    r = r_proj(x_r);  g = g_lora(x_g)                                    (LoRA: sigmoid between, no bias)
    k = k_proj(x_k);  v = v_proj(x_v);  w = -e^{-1/2} sigmoid(w_lora(x_w));  a = sigmoid(a_lora(x_a))
    layer 0: v_first = v;  later layers: v = lerp(v, v_first, sigmoid(v_lora(x_v)))
    kk = normalize(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    S_t = (diag(exp w_t) - kk_t (kk_t a_t)^T) S_{t-1} + k_t v_t^T;  o_t = S_t^T r_t   (per head; S [K, V])
    out = o_proj((g_norm(o) + (r . (k * r_k)) v) * g)                   (the last term per head)

Write side per memory: k_proj, v_proj, the decay LoRA w_lora, the in-context-rate LoRA a_lora and, after
layer 0, the v_first mixing LoRA v_lora: every path the state is written through. What they feed (w, a, kk,
the updated k, the lerp towards v_first) is computed per slot from the memory's own projections.
Read side once per token: the token shift (``rwkv_common``), the lerp mixes, r_proj, g_lora, k_k, k_a, r_k,
g_norm and o_proj.
State per segment: [H, K, V] (fla's RWKV7 kernels' ``[N, H, K, V]``, the host's cache layout).

Two choices MoM has to make for this host:

* The output correction ``(r . (k * r_k)) v`` reads the memory's k and v, so each memory makes its own, and
  the host adds it after the group norm. ``recurrence`` returns each slot's kernel output and correction side
  by side, [S, H, 2V]; the combine mixes both halves with the routing weights (it is linear) and ``finish``
  normalises the first half only, then adds the second. Copies of the host (M=1, or top-k = M without shared
  memory) give the host's output.
* ``v_first``: layer 0 returns the routing-weighted mean of the token's memories' v,
  ``sum_s w_s v_s / sum_s w_s`` over its slots (the shared memory's with weight 1): the mix the layer reads
  its memories with, normalised so that it stays a value of v's scale. Later layers lerp each memory's own v
  towards it with that memory's own v_lora gate. For copies of the host it is the host's v_first. Padding
  tokens get 0, as the host's v_proj (no bias) of its zeroed padding does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.adapters.fla_common import fla_models, l2norm, padded_segments
from mom_wrap.adapters.rwkv_common import (check_group_norm, group_norm, install_token_shift, lora_projection,
                                           previous_token, token_shift_shapes)
from mom_wrap.dispatch import combine, gather
from mom_wrap.ops import acc

DECAY_SCALE = math.exp(-0.5)  # w = -e^{-1/2} sigmoid(.): the host's 0.6065306597126334, its log-decay bound
RECURRENT_MAX_LEN = 63  # the host's eval rule: fused_mul_recurrent below 64 tokens, chunk from 64 on
MIXES = ('r', 'w', 'k', 'v', 'a', 'g')


def rwkv7_reference(r, w, k, v, a, b, cu_seqlens, position, scale=1.0, initial_state=None,
                    output_final_state=False):
    """RWKV-7's diagonal-plus-low-rank recurrence over packed segments, step by step in fp32: the oracle for
    fla's kernels.

    r, w, k, a, b [S, H, K]; v [S, H, V] (sorted slots, each segment contiguous and time-ordered); w: the log
    decay; cu_seqlens [G+1]; position [S]; initial_state [G, H, K, V] or None. Per segment and head, with
    state S [K, V] (the host passes a = -kk, b = kk * a):
        S <- diag(exp w_t) S + b_t (a_t^T S) + k_t v_t^T;  o_t = S^T (scale r_t)
    Returns o [S, H, V] (dtype of v) and the final states [G, H, K, V] fp32 (or None).
    """
    S, H, K = r.shape
    V = v.shape[-1]
    dtype = v.dtype
    G = cu_seqlens.numel() - 1
    # padded steps have w = a = b = k = v = 0: they leave the state unchanged, so the final state is exact
    segment, (r, w, k, v, a, b) = padded_segments(cu_seqlens, position, acc(r) * scale,
                                                  *(acc(t) for t in (w, k, v, a, b)))
    L = r.shape[1]
    state = r.new_zeros(G, H, K, V) if initial_state is None else initial_state.to(r.dtype).clone()
    out = r.new_zeros(G, L, H, V)
    for t in range(L):
        ah = torch.einsum('ghk,ghkv->ghv', a[:, t], state)
        state = state * w[:, t].exp()[..., None] + b[:, t, ..., None] * ah[:, :, None] \
            + k[:, t, ..., None] * v[:, t, :, None]
        out[:, t] = torch.einsum('ghk,ghkv->ghv', r[:, t], state)
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


@register_adapter
class RWKV7Adapter(HostAdapter):
    host_class = 'fla.layers.rwkv7.RWKV7Attention'
    write_modules = ('k_proj', 'v_proj', 'w_lora', 'a_lora', 'v_lora')
    # init="preserve" zeroes k, not v: after layer 0 a zero v still lerps towards v_first. With k = 0 nothing is
    # written (S stays 0, so the kk terms and their gradient vanish too) and the correction (r . k r_k) v is 0
    silent_projection = 'k'

    def __init__(self, host: nn.Module):
        super().__init__(host)
        check_group_norm(host.g_norm)
        install_token_shift(host)

    @classmethod
    def example_models(cls):
        """Layer 0 returns v_first, layer 1 takes it; fuse_norm (the config's default): fla's GroupNorm and l2_norm."""
        ranks = dict(head_dim=32, decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8)
        return fla_models('RWKV7', {'default': {}, 'norm_eps=1e-2': dict(norm_eps=1e-2),
                                    'fuse_norm=False': dict(fuse_norm=False)}, **ranks)

    @classmethod
    def example_host(cls):
        """RWKV7Attention(hidden_size=64, head_dim=32, LoRA ranks 8) as layer 1 of 2: a later layer, which
        takes v_first and has the v_lora path (layer 0 returns v_first: the tests check that one). The
        parameters the host initialises to zero or to one constant (o_proj, the LoRAs' first stages, k_a, r_k,
        the norm's affine) are redrawn (fixed seed): at zero or constant the checks could not see them. g_lora's
        second stage is scaled up 10x, to outputs of about 1 (the checks' errors are relative to max(|out|, 1))."""
        host = cls.load_host_class()(hidden_size=64, head_dim=32, decay_low_rank_dim=8, gate_low_rank_dim=8,
                                     a_low_rank_dim=8, v_low_rank_dim=8, layer_idx=1, num_hidden_layers=2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in host.parameters():
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(noise * p.shape[-1] ** -0.5 if p.dim() == 2 else p + 0.3 * noise)
            host.g_lora.lora[2].weight.mul_(10)
        return host

    @classmethod
    def example_inputs(cls, x):
        """v_first for the example layer 1: a fixed function of x at each position (any tensor of that shape
        would do; this one slices, pads and packs along with x)."""
        return {'v_first': torch.sin(3 * x).flip(-1)}

    def write_projections(self):
        h = self.host
        projections = [lora_projection('k', h.k_proj, 'xk'), lora_projection('v', h.v_proj, 'xv'),
                       lora_projection('w', h.w_lora, 'xw'), lora_projection('a', h.a_lora, 'xa')]
        if h.layer_idx != 0:
            projections.append(lora_projection('v_mix', h.v_lora, 'xv'))
        return projections

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_dim, h.head_v_dim)

    def read_conv_shapes(self):
        return token_shift_shapes(self.host)

    def host_inputs(self, kwargs, layout):
        """v_first [B, T, value_dim] -> [N, value_dim]: needed after layer 0, ignored by layer 0 (fla's models
        pass it zeros)."""
        h = self.host
        if h.layer_idx == 0:
            return {}
        v_first = kwargs.get('v_first')
        if v_first is None:
            raise ValueError(f"v_first: RWKV7 layers after layer 0 (this one: layer_idx={h.layer_idx}) take the "
                             "v_first that layer 0 returns as its fourth output")
        if not isinstance(v_first, torch.Tensor):
            raise TypeError(f"v_first: expected a torch.Tensor, got {type(v_first).__name__}")
        shape = (layout.batch_size, layout.seq_len, h.value_dim)
        if tuple(v_first.shape) != shape:
            raise ValueError(f"v_first: expected shape {list(shape)} ([batch, seq_len, value_dim]), got "
                             f"{list(v_first.shape)}")
        return {'v_first': v_first.reshape(-1, h.value_dim)}

    def host_outputs(self, kwargs, write, dispatch, layout):
        """v_first: layer 0 makes it (see the module docstring), later layers pass on the one they got."""
        h = self.host
        if h.layer_idx != 0:
            return (kwargs['v_first'],)
        shape = (layout.batch_size, layout.seq_len, h.value_dim)
        if write is None:  # every token is padding
            return (torch.zeros(shape, device=layout.device, dtype=h.o_proj.weight.dtype),)
        v = combine(write['v'], dispatch)
        total = dispatch.token_weight.to(acc(v).dtype).sum(-1, keepdim=True)
        return ((acc(v) / total.clamp_min(torch.finfo(torch.float32).tiny)).to(v.dtype).view(shape),)

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> r [N, key_dim], g [N, value_dim] and the write projections' inputs x_k, x_v, x_w,
        x_a [N, hidden]."""
        h = self.host
        delta = previous_token(h, x, layout, backend, conv_rows) - x
        mixes = {c: torch.addcmul(x, delta, getattr(h, f'x_{c}').view(-1)) for c in MIXES}
        return {'r': h.r_proj(mixes['r']), 'g': h.g_lora(mixes['g']),
                'xk': mixes['k'], 'xv': mixes['v'], 'xw': mixes['w'], 'xa': mixes['a']}

    def _normalize(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """kk's per-head normalisation as the host makes it: fla's l2_norm (x rsqrt(sum x^2 + 1e-6)) with
        ``fuse_norm``, F.normalize otherwise."""
        if self.host.fuse_norm:
            if backend == 'torch':
                return l2norm(x)
            from fla.modules.l2norm import l2_norm
            return l2_norm(x)
        return F.normalize(x, dim=-1, p=2.0)

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """Per slot: w, a, kk, the updated k and (after layer 0) the lerp towards v_first from the memory's own
        projections; then the kernel, and the output correction. Returns [S, H, 2V]: output | correction."""
        h = self.host
        dtype = write['v'].dtype
        cast = acc if backend == 'torch' else (lambda t: t)  # the reference computes in fp32 (fp64 stays)
        r, k, v = cast(gather(read['r'], dispatch)), cast(write['k']), cast(write['v'])
        w = -DECAY_SCALE * torch.sigmoid(cast(write['w']))
        a = torch.sigmoid(cast(write['a']))
        if 'v_mix' in write:
            v_first = gather(read['v_first'], dispatch).to(v.dtype)
            v = torch.lerp(v, v_first, torch.sigmoid(cast(write['v_mix'])))
        heads = (-1, h.head_dim)
        kk = self._normalize((k * h.k_k).unflatten(-1, heads), backend)
        k = k.addcmul(k * (a - 1), h.k_a)  # fla's k_update_ref: k (1 + (a - 1) k_a)
        r, w, k, a = (t.unflatten(-1, heads) for t in (r, w, k, a))
        v = v.unflatten(-1, (-1, h.head_v_dim))
        if backend == 'torch':
            o, state = rwkv7_reference(r, w, k, v, -kk, kk * a, dispatch.cu_seqlens, dispatch.position,
                                       initial_state=initial_state, output_final_state=output_final_state)
        else:
            o, state = self._kernel(r, w, k, v, kk, a, dispatch, initial_state, output_final_state)
        correction = (r * k * h.r_k).sum(-1, keepdim=True) * v
        return torch.cat([o, correction], -1).to(dtype), state

    def _kernel(self, r, w, k, v, kk, a, dispatch, initial_state, output_final_state):
        """fla's kernels, as the host picks them: chunk whenever gradients flow or in training (fla's recurrent
        RWKV7 kernel has no backward) and for segments of 64 tokens and more, fused_mul_recurrent otherwise."""
        from fla.ops.rwkv7 import chunk_rwkv7, fused_mul_recurrent_rwkv7
        h = self.host
        kwargs = dict(scale=1.0, initial_state=initial_state, output_final_state=output_final_state)
        if torch.is_grad_enabled() or h.training or dispatch.max_seqlen > RECURRENT_MAX_LEN:
            o, state = chunk_rwkv7(r[None], w[None], k[None], v[None], -kk[None], (kk * a)[None],
                                   cu_seqlens=dispatch.cu_seqlens, cu_seqlens_cpu=dispatch.cu_seqlens_cpu,
                                   safe_gate=True, lower_bound=-DECAY_SCALE, chunk_size=64, **kwargs)
            return o[0], state
        if dispatch.token_major:  # a decode step, one token per segment: as a batch, fla's one-step path
            o, state = fused_mul_recurrent_rwkv7(*(t[:, None] for t in (r, w, k, v, kk, a)), **kwargs)
            return o[:, 0], state
        o, state = fused_mul_recurrent_rwkv7(*(t[None] for t in (r, w, k, v, kk, a)),
                                             cu_seqlens=dispatch.cu_seqlens, **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, 2V] (output | correction) -> [N, hidden]: (g_norm(output) + correction) * g, o_proj."""
        h = self.host
        o, correction = _halves(o)
        g = read['g']
        if backend == 'torch':
            o = ((group_norm(o, h.g_norm) + acc(correction)) * acc(g)).to(o.dtype)
        else:
            o = (h.g_norm(o) + correction) * g
        return h.o_proj(o)


def _halves(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, 2V] -> the outputs and the corrections, [N, H * V] each."""
    V = o.shape[-1] // 2
    return o[..., :V].flatten(1), o[..., V:].flatten(1)
