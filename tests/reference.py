"""Independent references for the tests: the host layer's math and MoM as a naive per-memory loop.

Built only from torch (F.linear, F.conv1d) and fla's own ``naive_recurrent_gated_delta_rule``: nothing
here goes through mom_wrap's dispatch, segment conv, grouped linear or reference recurrence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from mom_wrap.testing import routed


def _conv(x, conv_weight, conv_bias):
    """Causal depthwise conv + SiLU over x [T, D] with weight [D, 1, W] (one sequence)."""
    W = conv_weight.shape[-1]
    y = F.conv1d(x.t()[None], conv_weight, conv_bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]]
    return F.silu(y.t())


def _l2(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _finish(host, o, gate):
    """o [T, HV, V] -> [T, hidden]: the host's gated RMS norm and output projection."""
    n = host.o_norm
    of = o.float()
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight.float()
    if host.use_gate:
        y = y * F.silu(gate.float())
    return F.linear(y.to(o.dtype).flatten(1), host.o_proj.weight)


def gdn_write(host, x, weights):
    """The write side over one (sub)sequence x [T, hidden] with weights {k, v, a, b, k_conv, v_conv}."""
    H, HV, K, V = host.num_heads, host.num_v_heads, host.head_k_dim, host.head_v_dim
    if host.use_short_conv:
        k = _conv(F.linear(x, weights['k']), weights['k_conv'], weights.get('k_conv_bias')).view(-1, H, K)
        v = _conv(F.linear(x, weights['v']), weights['v_conv'], weights.get('v_conv_bias')).view(-1, HV, V)
    else:
        k = F.silu(F.linear(x, weights['k'])).view(-1, H, K)
        v = F.silu(F.linear(x, weights['v'])).view(-1, HV, V)
    g = -host.A_log.float().exp() * F.softplus(F.linear(x, weights['a']).float() + host.dt_bias.float())
    beta = F.linear(x, weights['b']).float().sigmoid() * (2.0 if host.allow_neg_eigval else 1.0)
    return k, v, g, beta


def gdn_read(host, x):
    """Read side of one sequence x [T, hidden]: query (after its conv) [T, H, K] and output gate."""
    q = F.linear(x, host.q_proj.weight)
    q = _conv(q, host.q_conv1d.weight, host.q_conv1d.bias) if host.use_short_conv else F.silu(q)
    q = q.view(-1, host.num_heads, host.head_k_dim)
    gate = F.linear(x, host.g_proj.weight).view(-1, host.num_v_heads, host.head_v_dim) if host.use_gate else None
    return q, gate


def gdn_memory(host, q, k, v, g, beta):
    """One memory's outputs on its token subsequence, via fla's naive recurrence. -> [T, HV, V]."""
    rep = host.num_v_heads // host.num_heads
    q, k = _l2(q.float()).repeat_interleave(rep, 1), _l2(k.float()).repeat_interleave(rep, 1)
    o, _ = naive_recurrent_gated_delta_rule(q[None], k[None], v.float()[None], beta[None], g[None])
    return o[0]


def host_weights(host):
    w = dict(k=host.k_proj.weight, v=host.v_proj.weight, a=host.a_proj.weight, b=host.b_proj.weight)
    if host.use_short_conv:
        w.update(k_conv=host.k_conv1d.weight, v_conv=host.v_conv1d.weight,
                 k_conv_bias=host.k_conv1d.bias, v_conv_bias=host.v_conv1d.bias)
    return w


def gdn_host_reference(host, x):
    """The plain GatedDeltaNet layer, x [B, T, hidden] -> [B, T, hidden] (needs the unwrapped host)."""
    out = []
    for xb in x:
        q, gate = gdn_read(host, xb)
        o = gdn_memory(host, q, *gdn_write(host, xb, host_weights(host)))
        out.append(_finish(host, o.to(x.dtype), gate))
    return torch.stack(out)


def memory_weights(mom, e):
    bank = mom.memories
    w = dict(k=bank.proj['k'][e], v=bank.proj['v'][e], a=bank.proj['a'][e], b=bank.proj['b'][e])
    for n in bank.conv:
        w[f'{n}_conv'] = bank.conv[n][e][:, None]
        if n in bank.conv_bias:
            w[f'{n}_conv_bias'] = bank.conv_bias[n][e]
    return w


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing from ``mom.router``."""
    host = mom.host
    M, k = mom.num_memories, mom.topk
    out = []
    for xb in x:
        probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
        # the documented rule (ties to the lower memory index), written out by ranks in mom_wrap.testing.routed:
        # a tie at probability 0 (fp32 underflow) still decides which memory is written
        top_p, top_i = routed(probs, k)
        q, gate = gdn_read(host, xb)
        o = torch.zeros(xb.shape[0], host.num_v_heads, host.head_v_dim)
        for e in range(M):
            sel = (top_i == e).any(-1).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            w = (top_p * (top_i == e)).sum(-1)[sel]
            o_e = gdn_memory(host, q[sel], *gdn_write(host, xb[sel], memory_weights(mom, e)))
            o[sel] += w[:, None, None] * o_e
        if mom.shared_memory:
            o += gdn_memory(host, q, *gdn_write(host, xb, memory_weights(mom, M)))
        out.append(_finish(host, o.to(x.dtype), gate))
    return torch.stack(out)
