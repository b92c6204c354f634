"""``ToyGatedAttentionAdapter``: how mom_wrap wraps ``mom_example.layer.ToyGatedAttention`` as a Mixture-of-Memories
layer, written with mom_wrap's public API only (``mom_wrap.adapters``, ``mom_wrap.adapters.toolkit``).

The split of the layer (docs/adapters.md, section 1):

* write side, one copy per memory: ``k_proj``, ``v_proj`` and the decay's ``g_proj`` (its bias included): what a
  memory writes into its state;
* read side, once per token: ``q_proj`` (``read``), the output norm and ``o_proj`` (``finish``, after the memories'
  outputs are combined);
* the recurrence: gated linear attention with a per-channel decay, state [H, V, K] per (memory, sequence) segment.
  Backend ``torch``: the toolkit's ``gla_reference``; backend ``triton``: fla's varlen GLA kernels
  (``fused_recurrent_gla`` for segments up to 64 tokens, ``chunk_gla`` beyond), with per-segment initial and final
  states, in the same [H, V, K] layout (``state_v_first=True``).

Importing this module registers the adapter and, through ``mom_example.model``, the model family: this package's
``mom_wrap.adapters`` entry point names it, so ``python -m mom_wrap.check ToyGatedAttention`` finds both.
"""
from __future__ import annotations

import torch.nn.functional as F

from mom_wrap.adapters import HostAdapter, WriteProjection, register_adapter
from mom_wrap.adapters.toolkit import gather, gla_reference, rms_norm

import mom_example.model  # noqa: F401  (registers the model family with transformers and mom_wrap)

FUSED_RECURRENT_MAX_LEN = 64  # fla's fused_recurrent kernel for segments up to this length, chunk_gla beyond


@register_adapter
class ToyGatedAttentionAdapter(HostAdapter):
    """Every option of ``ToyGatedAttention`` is supported (it has three: heads, the decay's normalizer, the norm's
    eps)."""

    host_class = 'mom_example.layer.ToyGatedAttention'  # a dotted path: mom_wrap imports it when it looks
    write_modules = ('k_proj', 'v_proj', 'g_proj')  # removed from the host once copied into the memories
    silent_projection = 'v'  # init="preserve": a memory whose v_proj is zero writes (and so reads) nothing

    @classmethod
    def example_host(cls):
        """What ``python -m mom_wrap.check`` runs the parity suite on."""
        return cls.load_host_class()(hidden_size=64, num_heads=2, layer_idx=0)

    @classmethod
    def example_models(cls):
        """Two configurations of the family: the default, and a norm eps that the model passes on to its layers
        (which ``example_host`` does not have). The suite converts each with one-memory copies: logits unchanged."""
        from mom_example.model import ToyConfig, ToyForCausalLM
        return {'default': lambda: ToyForCausalLM(ToyConfig()),
                'norm_eps=1e-2': lambda: ToyForCausalLM(ToyConfig(norm_eps=1e-2))}

    def write_projections(self):
        h = self.host
        return [WriteProjection('k', h.k_proj), WriteProjection('v', h.v_proj), WriteProjection('g', h.g_proj)]

    def state_shape(self):
        h = self.host
        return (h.num_heads, h.head_dim, h.head_dim)  # [H, V, K]: gla_reference's and fla's state_v_first layout

    def read_conv_shapes(self):
        return {}  # no short convs on the read side

    def read(self, x, layout, backend, conv_rows=None):
        """x [N, hidden] -> 'q' [N, H, K] (the recurrence scales it by 1 / sqrt(K), as the layer does)."""
        h = self.host
        return {'q': h.q_proj(x).unflatten(-1, (h.num_heads, h.head_dim))}

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """write: 'k', 'v', 'g' [S, hidden] per sorted slot -> o [S, H, V] and the final states [G, H, V, K] (or
        None)."""
        h = self.host
        q = gather(read['q'], dispatch)  # per token -> per slot
        k, v, g = (write[n].unflatten(-1, (h.num_heads, h.head_dim)) for n in ('k', 'v', 'g'))
        gk = F.logsigmoid(g) / h.gate_logit_normalizer  # the log decay, elementwise: per slot, as the write side
        if backend == 'torch':
            return gla_reference(q, k, v, gk, dispatch.cu_seqlens, dispatch.position, initial_state=initial_state,
                                 output_final_state=output_final_state)
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, state_v_first=True,
                      cu_seqlens=dispatch.cu_seqlens)
        if dispatch.max_seqlen <= FUSED_RECURRENT_MAX_LEN:
            o, state = fused_recurrent_gla(q[None], k[None], v[None], gk=gk[None], **kwargs)
        else:
            o, state = chunk_gla(q[None], k[None], v[None], g=gk[None], cu_seqlens_cpu=dispatch.cu_seqlens_cpu,
                                 **kwargs)
        return o[0], state

    def finish(self, o, read, backend):
        """o [N, H, V], combined over the memories -> [N, hidden]: the norm per head, then o_proj."""
        h = self.host
        if backend == 'torch':  # the oracle: the toolkit's RMS norm, in PyTorch
            o = rms_norm(o, h.norm.weight, None, h.norm.eps).to(o.dtype)
        else:
            o = h.norm(o)  # the layer's own module
        return h.o_proj(o.flatten(1))
