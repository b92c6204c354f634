"""Import fla's own MoM models: ``import_fla_mom(module)`` maps the weights of fla's ``MomAttention`` (a layer) or
``MomForCausalLM`` / ``MomModel`` (a model) onto ``MixtureOfMemories`` over fla's ``GatedDeltaNet``, with the
same eval-mode outputs.

```python
model = AutoModelForCausalLM.from_pretrained(fla_mom_checkpoint)   # fla's MomForCausalLM
model = mom_wrap.import_fla_mom(model)                              # a converted GatedDeltaNetForCausalLM
model.save_pretrained(out_dir)                                      # loads back after `import mom_wrap`
```

Read against fla 0.6.0: ``mom.py:N`` is line N of ``fla/layers/mom.py``, ``modeling_mom.py:N`` of
``fla/models/mom/modeling_mom.py``.

The mapping of one layer onto ``MixtureOfMemories(GatedDeltaNet(...), adapter=FlaMomAdapter)`` (M =
``num_memories``; E = M + 1 with ``shared_mem``, memory E-1 the shared one):

* ``gate`` [M, hidden] -> ``router.weight``;
* ``k_proj[e]``, ``v_proj[e]``, ``a_proj[e]``, ``b_proj[e]`` -> ``memories.proj['k' / 'v' / 'a' / 'b'][e]``, e < M;
* ``shared_k``, ``shared_v``, ``shared_a``, ``shared_b`` -> ``memories.proj[...][M]`` (the shared memory); with
  ``single_kv_proj`` they are every memory's projections;
* ``q_proj``, ``q_conv1d`` -> ``memories.proj['q'][e]``, ``memories.conv['q'][e]`` for every e;
* ``k_conv1d``, ``v_conv1d`` (weight and bias) -> ``memories.conv['k' / 'v'][e]`` (``conv_bias``) for every e;
* ``A_log``, ``dt_bias``, ``g_proj``, ``o_norm``, ``o_proj`` -> the host's (the read side, once per token).

The host is ``GatedDeltaNet(hidden_size, expand_v, head_dim, num_heads, mode, use_gate=use_output_gate,
conv_size, conv_bias, norm_eps, output_gate_activation=o_norm's)``: its gate ``-exp(A_log) softplus(a + dt_bias)``,
beta ``sigmoid(b)``, L2-normalised q and k and fla's gated delta rule kernels are what fla's MoM layer computes
(it computes the gate and beta outside the kernel, mom.py:503-505; we inside, the host's way). In eval mode fla
picks the chunk or the recurrent kernel by the input's length (mom.py:458-463), we by the longest segment: the
same recurrence.

What fla's layer does and how it maps (eval mode):

* Routing (mom.py:471-475): softmax of the gate's logits, top-k, the k weights renormalised to sum to 1, the
  shared memory added with weight 1 (mom.py:649-652): ours exactly. fla has no other routing: ``capacity`` is
  stored (mom.py:318) and never read (no token is dropped), and there is one normalisation.
* The q path is per memory: fla projects q from the tokens sorted into each memory (mom.py:494) and runs its
  short conv over each (memory, sequence) segment (mom.py:525-537), so a token's q differs from memory to
  memory; the shared memory's q conv runs over the whole sequence (mom.py:708-713). Our GatedDeltaNet adapter
  reads q once per token, so the import uses ``FlaMomAdapter``, a variant that moves ``q_proj`` and ``q_conv1d``
  to the write side (with the k/v convs): a per-memory projection and a per-segment conv, as fla computes them.
* Per-segment short convs in eval mode (mom.py:517-523): each (memory, sequence) segment is convolved on its
  own, segments shorter than the kernel left-padded with zeros (``pad_for_conv``, mom.py:782-804), i.e.
  starting from a zero state: our segment conv.
* fla shares ``q_proj``, ``q_conv1d``, ``k_conv1d`` and ``v_conv1d`` (and with ``single_kv_proj`` the k/v/a/b
  projections) between memories; here every memory gets its own copy, equal at import: fine-tuning unties them
  (more parameters: E copies of q_proj and of the convs).

Where fla differs from us, and why an import does not reproduce it:

* **Training-mode short convs leak across segments.** With ``self.training`` fla passes no ``cu_seqlens`` to the
  routed memories' q, k and v convs (mom.py:519-520), which then run over the packed stream of all non-empty
  (memory, sequence) segments as one sequence (padding already removed by ``_upad_input``, mom.py:508; order
  memory-major, mom.py:507). So the first ``conv_size - 1`` tokens of each segment read the last tokens before
  them in that stream: the preceding segment's, which is the same memory's tokens of the previous sequence of
  the batch or, for a memory's first segment, the previous memory's tokens. Checked (``tests/test_fla_mom.py``):
  in training mode, changing only sequence 0's last token changes sequence 1's outputs; in eval mode it does
  not. Nothing else leaks: the recurrence gets ``cu_seqlens`` in both modes (mom.py:596-607), and the shared
  memory's convs run per sequence in training too (mom.py:705-725). Ours are per segment in training and eval
  alike, so an imported model equals fla's eval-mode outputs, not its training-mode ones (fla's own training
  and eval outputs differ).
* Precision: fla computes the router logits in the input dtype (mom.py:471) and casts the routing weights
  back to it (mom.py:475), combining the memories' outputs in it (mom.py:285-286) and taking beta's sigmoid in
  it (mom.py:503); we compute the logits from fp32 inputs and combine in fp32. In fp32 both compute the same
  numbers; in bf16 they differ at bf16's rounding, and a token whose k-th and (k+1)-th router logits are within
  bf16's rounding of each other may pick a different memory.
* The router's balancing loss (modeling_mom.py:39-118, 501-504): fla adds
  ``aux_loss_scale * M * sum_(rank, e) f_(rank, e) P_e`` to ``MomForCausalLM``'s loss when labels are given,
  with f and P pooled over all layers' tokens and f counted per top-k rank (k times our share of slots). Ours
  is per layer (``mom_wrap.losses``: ``balance_loss_weight`` times each layer's ``M * sum_e f_e P_e``, applied in
  the backward). Not the same function of the routing, so ``balance_loss_weight`` is an argument here;
  ``aux_loss_scale * topk / num_layers`` gives about fla's gradient when the layers route alike.
* fla sorts the slots with ``argsort()`` (mom.py:183), not ``stable=True``, and relies on the sort keeping a
  memory's tokens in time order, which PyTorch guarantees only for stable sorts (ours is). On the CPU, torch
  2.13's default sort does not keep equal keys in order from 17 elements on (measured), so there fla's layer
  scrambles time inside its memories once batch x length x topk > 16 (the tests run fla with a stable sort).
  CUDA's default sort: not checked here.
* A top-k routing weight that is 0 in the input dtype (mom.py:474-475: a logit gap above about 17 in fp16, about
  90 in bf16 or fp32) drops the slot from fla's routing mask (mom.py:483) but not from its sorted slots, so the
  tokens after it are assigned to the wrong memory slots (checked on the CPU, fp32: a token with a gap of 200
  changes other tokens' outputs by up to 1e-2 of the largest); ours writes the slot with weight 0.

Refused (``ValueError`` naming the option): a ``MomConfig`` with standard attention layers (``attn``) or
attention residuals (``attnres_block_size``), a ``mom_backend`` other than ``'gated_deltanet'``, layers without
short convs (``use_short_conv=False``: fla refuses it itself, mom.py:416) or with biases on their projections.
``TypeError`` for anything that is not one of fla's MoM modules.

A model import returns fla's ``GatedDeltaNetForCausalLM`` (from ``MomForCausalLM``) or ``GatedDeltaNetModel``
(from ``MomModel``) with the embeddings, norms, MLPs and lm_head of the source (``fuse_norm=True``: MomBlock's
norms are fla's fused RMSNorm whatever ``MomConfig.fuse_norm`` says) and every layer's attention imported. It is
marked as ``mom_wrap.convert`` marks its models (``config.mom``, with ``adapter`` naming ``FlaMomAdapter``):
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` (after ``import mom_wrap``) bring it back.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters.base import WriteProjection
from mom_wrap.adapters.gated_deltanet import GatedDeltaNetAdapter
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.wrapper import MixtureOfMemories


@contextlib.contextmanager
def stable_argsort():
    """Inside: ``Tensor.argsort`` sorts stably, as fla's MoM layer assumes (mom.py:183 calls ``argsort()`` and relies
    on a memory's tokens staying in time order; see the module docstring). Run fla's layer or model under it to get
    the outputs fla intends, which ``import_fla_mom`` reproduces; without it fla's CPU outputs scramble time inside a
    memory once batch x length x topk > 16. Process-wide while inside (not thread-safe)."""
    base = torch._C.TensorBase.argsort

    def argsort(self, dim=-1, descending=False, stable=False):
        return base(self, dim=dim, descending=descending, stable=True)

    torch.Tensor.argsort = argsort
    try:
        yield
    finally:
        del torch.Tensor.argsort  # back to TensorBase's


@register_adapter(variant=True)  # only where named: GatedDeltaNet layers keep GatedDeltaNetAdapter
class FlaMomAdapter(GatedDeltaNetAdapter):
    """GatedDeltaNet with fla MomAttention's q path: ``q_proj`` and ``q_conv1d`` are per memory (write side), so
    each memory's q is projected and convolved over that memory's own tokens, as fla computes it. Not
    registered: ``MixtureOfMemories(host, ..., adapter=FlaMomAdapter)`` picks it (``import_fla_mom`` does)."""

    write_modules = ('q_proj', 'q_conv1d') + GatedDeltaNetAdapter.write_modules

    def write_projections(self) -> list[WriteProjection]:
        h = self.host
        q = WriteProjection('q', h.q_proj, h.q_conv1d if h.use_short_conv else None)
        return [q] + super().write_projections()

    def read_conv_shapes(self):
        return {}  # q's conv state is per (sequence, memory), with the write side's

    def read(self, x, layout, backend, conv_rows=None):
        h = self.host
        return {'gate': h.g_proj(x).unflatten(-1, (-1, h.head_v_dim))} if h.use_gate else {}

    def query(self, read, write, dispatch):
        q = write['q'] if self.host.use_short_conv else F.silu(write['q'])
        return q.unflatten(-1, (-1, self.host.head_k_dim))


def import_fla_mom(module: nn.Module, backend: str = 'auto', balance_loss_weight: float = 0.01) -> nn.Module:
    """fla's MoM layer or model as MixtureOfMemories over fla's GatedDeltaNet, with the same eval-mode outputs
    (see the module docstring for the mapping and what differs).

    Args:
        module: fla's ``MomAttention`` -> a ``MixtureOfMemories`` (same ``num_memories``, ``topk``, shared memory,
            ``layer_idx``, weights, device, dtypes and train/eval mode); ``MomForCausalLM`` / ``MomModel`` -> fla's
            ``GatedDeltaNetForCausalLM`` / ``GatedDeltaNetModel`` whose attention layers are those, converted
            (``config.mom``; save_pretrained / from_pretrained round-trip).
        backend, balance_loss_weight: as ``MixtureOfMemories`` (fla's balancing loss is another function of
            the routing: see the module docstring).

    The source is not changed; the result holds copies of its weights (every parameter requires grad). Raises
    ``TypeError`` for another module and ``ValueError`` naming an fla option that cannot be reproduced.
    """
    from fla.layers.mom import MomAttention
    from fla.models import MomForCausalLM, MomModel
    if isinstance(module, MomAttention):
        return _import_layer(module, backend, balance_loss_weight)
    if isinstance(module, (MomForCausalLM, MomModel)):
        return _import_model(module, backend, balance_loss_weight)
    raise TypeError(f"module: expected fla's MomAttention, MomForCausalLM or MomModel, got {type(module).__name__}")


def _memory_sources(attn) -> list[dict[str, nn.Linear]]:
    """name -> fla's linear of each memory, E = M (+ 1 shared, last)."""
    shared = {'k': getattr(attn, 'shared_k', None), 'v': getattr(attn, 'shared_v', None),
              'a': getattr(attn, 'shared_a', None), 'b': getattr(attn, 'shared_b', None)}
    if attn.single_kv_proj:
        routed = [shared] * attn.num_memories
    else:
        routed = [{'k': attn.k_proj[e], 'v': attn.v_proj[e], 'a': attn.a_proj[e], 'b': attn.b_proj[e]}
                  for e in range(attn.num_memories)]
    sources = routed + ([shared] if attn.shared_mem else [])
    return [{'q': attn.q_proj, **s} for s in sources]


def _check_layer(attn) -> None:
    if not attn.use_short_conv:
        raise ValueError("use_short_conv: fla's MomAttention without short convs is not supported (fla refuses it "
                         "too; its forward would skip the SiLU)")
    if attn.mode not in ('chunk', 'fused_recurrent'):
        raise ValueError(f"mode: unsupported MomAttention mode {attn.mode!r}")
    if attn.gate.bias is not None:
        raise ValueError("gate: a router with a bias is not supported (ours has none)")
    names = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'a': 'a_proj', 'b': 'b_proj'}
    for e, source in enumerate(_memory_sources(attn)):
        for name, linear in source.items():
            if linear is None:
                raise ValueError(f"shared_mem: the layer has no shared_{name} projection for its shared memory")
            if linear.bias is not None:
                raise ValueError(f"{names[name]}: projections with a bias are not supported (memory {e})")


def _import_layer(attn, backend: str, balance_loss_weight: float) -> MixtureOfMemories:
    from fla.layers import GatedDeltaNet
    _check_layer(attn)
    gate = attn.use_output_gate
    with torch.device('meta'):  # every tensor is assigned below
        host = GatedDeltaNet(hidden_size=attn.hidden_size, expand_v=attn.expand_v, head_dim=attn.head_dim,
                             num_heads=attn.num_heads, mode=attn.mode, use_gate=gate, use_short_conv=True,
                             conv_size=attn.conv_size, conv_bias=attn.conv_bias, layer_idx=attn.layer_idx,
                             norm_eps=attn.o_norm.eps,
                             output_gate_activation=attn.o_norm.activation if gate else 'swish')
    if (host.key_dim, host.value_dim, host.head_v_dim) != (attn.key_dim, attn.value_dim, attn.head_v_dim):
        raise ValueError(f"expand_v: {attn.expand_v} gives fla's MoM value sizes ({attn.value_dim}, head "
                         f"{attn.head_v_dim}) that GatedDeltaNet does not make ({host.value_dim}, {host.head_v_dim})")
    first = _memory_sources(attn)[0]  # the host's write side only sets the memories' shapes and dtypes
    state = {f'{n}_proj.weight': first[n].weight for n in ('q', 'k', 'v', 'a', 'b')}
    state.update({k: v for k, v in attn.state_dict(keep_vars=True).items()
                  if k.split('.')[0] in ('A_log', 'dt_bias', 'q_conv1d', 'k_conv1d', 'v_conv1d', 'g_proj', 'o_norm',
                                         'o_proj')})
    host.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)

    mom = MixtureOfMemories(host, num_memories=attn.num_memories, topk=attn.topk, shared_memory=attn.shared_mem,
                            init='copy', backend=backend, balance_loss_weight=balance_loss_weight,
                            adapter=FlaMomAdapter)
    mom.router.weight = nn.Parameter(attn.gate.weight.detach().clone())  # its dtype, whatever the host's
    with torch.no_grad():
        proj = mom.memories.proj
        for e, source in enumerate(_memory_sources(attn)):
            for name, linear in source.items():
                proj[name][e].copy_(linear.weight)
        for name in ('q', 'k', 'v'):  # fla's one conv per path, every memory's here
            conv = getattr(attn, f'{name}_conv1d')
            mom.memories.conv[name].copy_(conv.weight.squeeze(1).expand_as(mom.memories.conv[name]))
            if conv.bias is not None:
                mom.memories.conv_bias[name].copy_(conv.bias.expand_as(mom.memories.conv_bias[name]))
    left = [n for n, t in list(mom.named_parameters()) + list(mom.named_buffers()) if t.device.type == 'meta']
    if left:
        raise RuntimeError(f"import_fla_mom: tensors left unset (internal error): {left}")
    return mom.train(attn.training)


def _gdn_config(cfg):
    from fla.models import GatedDeltaNetConfig
    if cfg.mom_backend != 'gated_deltanet':
        raise ValueError(f"mom_backend: only 'gated_deltanet' is supported, got {cfg.mom_backend!r}")
    if cfg.attn is not None:
        raise ValueError("attn: MoM models with standard attention layers (MomConfig.attn) are not supported")
    if getattr(cfg, 'attnres_block_size', None) is not None:
        raise ValueError("attnres_block_size: MoM models with attention residuals are not supported")
    same = ('attn_mode', 'hidden_size', 'conv_size', 'num_heads', 'head_dim', 'expand_v', 'use_short_conv',
            'max_position_embeddings', 'hidden_ratio', 'intermediate_size', 'hidden_act', 'num_hidden_layers',
            'norm_eps', 'use_cache', 'pad_token_id', 'bos_token_id', 'eos_token_id', 'tie_word_embeddings',
            'initializer_range', 'fuse_swiglu', 'fuse_cross_entropy', 'vocab_size')
    gcfg = GatedDeltaNetConfig(**{k: getattr(cfg, k) for k in same}, use_gate=cfg.use_output_gate,
                               fuse_norm=True)  # MomBlock's norms are fla's fused RMSNorm whatever fuse_norm says
    if getattr(cfg, 'dtype', None) is not None:
        gcfg.dtype = cfg.dtype
    return gcfg


def _import_model(model, backend: str, balance_loss_weight: float) -> nn.Module:
    from fla.layers.mom import MomAttention
    from fla.models import GatedDeltaNetForCausalLM, GatedDeltaNetModel, MomForCausalLM

    from mom_wrap.convert import mark, mom_settings
    gcfg = _gdn_config(model.config)
    causal = isinstance(model, MomForCausalLM)
    src_base = model.model if causal else model
    for i, block in enumerate(src_base.layers):
        if not isinstance(block.attn, MomAttention):
            raise ValueError(f"attn: layer {i} is {type(block.attn).__name__}, not MomAttention")
        _check_layer(block.attn)
    with torch.device('meta'):  # every tensor is assigned below
        out = (GatedDeltaNetForCausalLM if causal else GatedDeltaNetModel)(gcfg)
    base = out.model if causal else out
    for block, src in zip(base.layers, src_base.layers):
        block.attn = _import_layer(src.attn, backend, balance_loss_weight)
    prefix = 'model.' if causal else ''
    attn_keys = tuple(f'{prefix}layers.{i}.attn.' for i in range(len(base.layers)))
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(attn_keys)}
    result = out.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith(attn_keys)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"import_fla_mom: weights not mapped (internal error): missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    if causal and gcfg.tie_word_embeddings:
        out.lm_head.weight = out.model.embeddings.weight
    left = [n for n, t in list(out.named_parameters()) + list(out.named_buffers()) if t.device.type == 'meta']
    if left:
        raise RuntimeError(f"import_fla_mom: tensors left unset (internal error): {left}")
    if getattr(model, 'generation_config', None) is not None and causal:
        out.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    mark(out, mom_settings(out))
    return out.train(model.training)
