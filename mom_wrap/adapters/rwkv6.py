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

The token shift is a depthwise conv of width 2 whose constant weight picks the previous token (tap 0) and
drops the current one (tap 1), run through ``TokenLayout.conv``: it then restarts at every sequence of packed
input, skips left padding, and carries each sequence's last token in the cache (``read_conv_shapes``), as
fla's ``token_shift`` (cu_seqlens) and the host's ``conv_state`` do.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import HostAdapter, WriteProjection, register_adapter
from mom_wrap.adapters.fla_common import pad_segments
from mom_wrap.dispatch import gather
from mom_wrap.ops import acc

SHIFT = 'shift'  # name of the read-side token-shift conv (its cache entry)
SHIFT_BUFFER = 'mom_token_shift_weight'  # the constant conv weight, a non-persistent buffer of the host
NUM_MIXES = 5  # x_proj makes the mixes of r, w, k, v, g, in this order

# fla's ACT2FN gates (Triton kernels, but relu) as PyTorch ops for the torch backend; fla's 'gelu' is the
# tanh approximation
_TORCH_GATES = {'relu': F.relu, 'sigmoid': torch.sigmoid, 'logsigmoid': F.logsigmoid, 'silu': F.silu,
                'swish': F.silu, 'sqrelu': lambda t: F.relu(t).square(),
                'gelu': lambda t: F.gelu(t, approximate='tanh')}
_LORA_ACTIVATIONS = {nn.Identity: None, nn.Tanh: 'tanh', nn.Sigmoid: 'sigmoid', nn.ReLU: 'relu', nn.SiLU: 'silu'}


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
    segment = torch.searchsorted(cu_seqlens[1:], torch.arange(S, device=r.device), right=True)
    L = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if G else 0
    # padded steps have k = v = 0 and w = 0 (decay 1): they leave the state unchanged, so the final state is exact
    r, k, v, w = (pad_segments(t, segment, position, G, L) for t in (acc(r) * scale, acc(k), acc(v), acc(w)))
    u = acc(u)
    state = r.new_zeros(G, H, K, V) if initial_state is None else initial_state.to(r.dtype).clone()
    out = r.new_zeros(G, L, H, V)
    for t in range(L):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum('ghk,ghkv->ghv', r[:, t], state + u[..., None] * kv)
        state = state * w[:, t].exp()[..., None] + kv
    o = out[segment, position].to(dtype)
    return o, (state if output_final_state else None)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, is_rms_norm: bool = False) -> torch.Tensor:
    """fla's GroupNorm in PyTorch: x [N, D] normalised over each of ``num_groups`` contiguous groups of
    channels (mean removed unless ``is_rms_norm``), then the per-channel affine. Returns fp32 (or fp64)."""
    xf = acc(x).unflatten(-1, (num_groups, -1))
    if not is_rms_norm:
        xf = xf - xf.mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        y = y * acc(weight)
    if bias is not None:
        y = y + acc(bias)
    return y


def _gate_name(fn) -> str | None:
    """The ACT2FN name of the host's gate function (``RWKV6Attention`` keeps the function, not its name)."""
    from fla.modules.activations import ACT2FN
    return next((name for name, f in ACT2FN.items() if f is fn), None)


def _write_projection(name: str, module: nn.Module, input_name: str) -> WriteProjection:
    """A DDLerpLinear's linear stage as a write projection reading the read-side mix ``input_name``: an
    nn.Linear, or fla's LoRA (Linear without bias -> activation -> Linear with its bias) in two stages."""
    linear = module.linear
    if isinstance(linear, nn.Linear):
        return WriteProjection(name, linear, input=input_name)
    first, act, second = linear.lora
    if type(act) not in _LORA_ACTIVATIONS:
        raise ValueError(f"{name}_proj: unsupported LoRA activation {type(act).__name__}")
    return WriteProjection(name, first, input=input_name, second=second, activation=_LORA_ACTIVATIONS[type(act)])


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
        norm = host.g_norm
        if getattr(norm, 'num_groups', None) is None:
            raise ValueError(f"g_norm: expected fla's GroupNorm, got {type(norm).__name__}")
        if SHIFT_BUFFER not in host._buffers:
            # tap 0 (the previous token) 1, tap 1 (the current one) 0: the conv returns x_{t-1}. A buffer, so
            # that it follows the layer's .to(); not persistent, so that state dicts stay the host's
            ref = next(host.parameters())
            weight = torch.zeros(host.hidden_size, 1, 2, device=ref.device, dtype=ref.dtype)
            weight[:, 0, 0] = 1
            host.register_buffer(SHIFT_BUFFER, weight, persistent=False)

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
        return [_write_projection('k', h.k_proj, 'xk'),
                _write_projection('v', h.v_proj, 'xv'),
                _write_projection('w', h.w_proj, 'xw')]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_k_dim, h.head_v_dim)

    def read_conv_shapes(self):
        # width 2 holds the last two tokens; only the newest (the next token's previous one) is read
        return {SHIFT: (self.host.hidden_size, 2)}

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> r [N, H, K], g [N, value_dim] and the write projections' inputs xk, xv, xw
        [N, hidden] (x + delta * mu of each)."""
        h = self.host
        N = x.shape[0]
        shifted = layout.conv(x, getattr(h, SHIFT_BUFFER), None, None, backend,
                              None if conv_rows is None else conv_rows[SHIFT])
        delta = shifted - x
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
            norm = h.g_norm
            y = group_norm(o, norm.num_groups, norm.weight, norm.bias, norm.eps, norm.is_rms_norm)
            gate = _TORCH_GATES[self.gate] if self.gate in _TORCH_GATES else h.gate_fn
            o = (y * acc(gate(acc(g)))).to(o.dtype)
        else:
            o = h.g_norm(o) * h.gate_fn(g)
        return h.o_proj(o)
