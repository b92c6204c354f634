"""``ToyGatedAttention``: the layer of one's own that this example brings to mom_wrap. It is no layer of fla's (or of
any package mom_wrap knows): mom_wrap learns to wrap it from ``mom_example.adapters``.

A gated linear attention with a per-channel decay, per head h (K = V = hidden_size / num_heads):

    q_t, k_t, v_t = q_proj(x_t), k_proj(x_t), v_proj(x_t)           (split into heads)
    a_t = logsigmoid(g_proj(x_t)) / gate_logit_normalizer           (log decay per key channel, < 0)
    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T                        (S [K, V], S_0 = 0)
    o_t = S_t^T (q_t / sqrt(K))
    y_t = o_proj(RMSNorm(o_t) per head)

The recurrence is written out below, one time step at a time, in plain PyTorch: it calls nothing of mom_wrap's, so
that mom_wrap's parity suite ("one memory equals the host") compares the wrapped layer with an implementation of its
own. The layer is called as fla's layers are, ``(hidden_states, attention_mask=None, past_key_values=None, ...)``, and
returns ``(o, None, past_key_values)``; it keeps no cache and takes no padding or packed sequences (it refuses them,
naming the argument). Wrapped as a Mixture-of-Memories layer it does all three: mom_wrap's wrapper runs padding,
packing and the cache itself.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, in fp32, with a weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class ToyGatedAttention(nn.Module):
    """Gated linear attention with a per-channel decay (see the module's docstring).

    hidden_size: the model width, a multiple of ``num_heads``; layer_idx: the layer's index in its model (where a
    cache would keep its state); gate_logit_normalizer: divides the log decay (16: the decay starts close to 1, as in
    GLA); norm_eps: the output norm's eps.
    """

    def __init__(self, hidden_size: int = 64, num_heads: int = 2, layer_idx: int | None = None,
                 gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: {hidden_size} is not a multiple of num_heads={num_heads}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_dim = hidden_size // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=True)  # the decay's logits, per key channel
        self.norm = RMSNorm(self.head_dim, norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, output_attentions: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        if past_key_values is not None:
            raise ValueError("past_key_values: ToyGatedAttention keeps no cache (wrapped by mom_wrap it does)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: ToyGatedAttention takes no padding (wrapped by mom_wrap it does)")
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: ToyGatedAttention takes no packed sequences (wrapped by mom_wrap it does)")
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        x = hidden_states
        q = self.q_proj(x).float().view(B, T, H, D) * D ** -0.5
        k = self.k_proj(x).float().view(B, T, H, D)
        v = self.v_proj(x).float().view(B, T, H, D)
        decay = (F.logsigmoid(self.g_proj(x).float()) / self.gate_logit_normalizer).exp().view(B, T, H, D)
        state = x.new_zeros(B, H, D, D, dtype=torch.float32)  # [key, value] per head
        out = []
        for t in range(T):
            state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            out.append((q[:, t, :, :, None] * state).sum(-2))  # [B, H, V]
        o = torch.stack(out, 1).to(x.dtype) if T else x.new_zeros(B, 0, H, D)
        o = self.o_proj(self.norm(o).reshape(B, T, H * D))
        return o, None, past_key_values
