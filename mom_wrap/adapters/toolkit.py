"""What an adapter needs beside the protocol (``mom_wrap.adapters.base``), public: import from here, not from the
modules these live in.

Per token and per slot. The core calls ``read`` on the layer's tokens, flattened: tensors [N, ...] in token order
(N = batch x length; ``layout`` says which are padding). It hands ``recurrence`` the write side per sorted slot:
[S, ...], one row per (token, selected memory), sorted by memory, then sequence, then time; a read-side tensor the
recurrence needs per slot (a query, say) it gathers itself:

* ``gather(t, dispatch)``: t [N, ...] per token -> [S, ...] per slot (row s is token ``dispatch.token[s]``'s);
  its backward sums the slots of a token. ``combine`` is the core's way back (weighted by the routing).

The plan, ``dispatch`` (``mom_wrap.dispatch.Dispatch``), also gives what a varlen kernel takes: ``cu_seqlens`` [G+1]
(the G non-empty (memory, sequence) segments' row offsets, on the device; ``cu_seqlens_cpu`` on the host),
``max_seqlen``, ``position`` [S] (each slot's time step inside its segment), ``memory`` [S] and ``segment_memory``
[G]. ``initial_state`` / the final states are [G, *state_shape] in the host's own state layout.

PyTorch references of the recurrences (the ``torch`` backend; per segment, initial and final states; each takes
``cu_seqlens``, most ``position`` too): ``gla_reference`` (gated linear attention: per-channel decay), ``linear_attn_reference`` (no decay; fla's feature-map norm),
``gsa_reference`` (gated slot attention: keys to slots, a softmax over the slots, slots to values),
``delta_rule_reference``
(DeltaNet), ``gated_delta_rule_reference`` (GatedDeltaNet), ``rwkv6_reference``, ``rwkv7_reference``, the
scalar-decay recurrence of Mamba2's SSD (``scalar_decay_reference``) and Mamba3's trapezoid with rotary keys
(``mamba3_reference``).

Norms as fla's modules compute them, in PyTorch: ``rms_norm``, ``rms_norm_gated`` (fla's FusedRMSNormGated),
``l2norm``, ``group_norm`` (fla's GroupNorm of RWKV).

``padded_segments`` lays the slots out as [G, T_max, ...] for a reference that loops over time.
"""
from mom_wrap.adapters.deltanet import delta_rule_reference
from mom_wrap.adapters.fla_common import l2norm, padded_segments, rms_norm, rms_norm_gated
from mom_wrap.adapters.gated_deltanet import gated_delta_rule_reference
from mom_wrap.adapters.gla import gla_reference
from mom_wrap.adapters.gsa import gsa_reference
from mom_wrap.adapters.linear_attention import linear_attn_reference
from mom_wrap.adapters.mamba3 import mamba3_reference
from mom_wrap.adapters.rwkv6 import rwkv6_reference
from mom_wrap.adapters.rwkv7 import rwkv7_reference
from mom_wrap.adapters.rwkv_common import group_norm
from mom_wrap.dispatch import combine, gather
from mom_wrap.kernels.scalar_decay import scalar_decay_reference

__all__ = ['combine', 'delta_rule_reference', 'gated_delta_rule_reference', 'gather', 'gla_reference',
           'group_norm', 'gsa_reference', 'l2norm', 'linear_attn_reference', 'mamba3_reference',
           'padded_segments', 'rms_norm', 'rms_norm_gated', 'rwkv6_reference', 'rwkv7_reference',
           'scalar_decay_reference']
