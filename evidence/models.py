"""The models the recall experiments compare, built the way a user builds them: a small causal LM of the host's family
(fla's ``...ForCausalLM``, mamba-ssm's ``MambaLMHeadModel``), and the same model converted with ``mom_wrap.convert``.

Four variants of one (host, d_model):

* ``host``: the host's model.
* ``mom``: the host's model after ``convert(model, num_memories=4, topk=2, shared_memory=True, init="random")``.
* ``host_params``: the host widened (its value width: fla's ``expand_v``, Mamba2's ``expand``) until its parameter
  count is MoM's (closest on a grid of widths; the rows record both counts).
* ``host_state``: the host with MoM's recurrent state, (M + 1) times its own: the value width of fla's hosts
  (``expand_v``) or Mamba2's ``d_state`` times M + 1.

A positive control, ``Attention``: a softmax-attention model of the same size (transformers' ``LlamaForCausalLM``,
heads of 64, the gated MLP's width as fla computes it), which solves MQAR wherever the data and the training loop are
right (Zoology's baseline); it has the ``host`` variant only, and no fixed state (its KV cache grows with the length:
``state_size`` None).

The state size is the number of recurrent-state elements of all layers for one sequence (``HostAdapter.state_shape``
times the memories: M + 1 for MoM), short convs' states left out. Heads are 64 wide (fla's GatedDeltaNet crashes in
training at head sizes 16 and 32 on an H100, README's known host limits).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

HOSTS = ('GatedDeltaNet', 'GLA', 'Mamba2')
FLA_HOSTS = ('GatedDeltaNet', 'GLA')  # (the hosts of fla's models: the retrofit's)
CONTROLS = ('Attention',)  # models without memories to wrap: the host variant only
VARIANTS = ('host', 'mom', 'host_params', 'host_state')
HEAD = 64  # head size of every host (keys and values)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison. ``balance``: MoM's balance_loss_weight (0: no balancing loss)."""
    host: str
    d_model: int
    variant: str = 'host'
    num_layers: int = 2
    vocab_size: int = 8192
    num_memories: int = 4
    topk: int = 2
    balance: float = 0.01

    def __post_init__(self):
        if self.host not in HOSTS + CONTROLS:
            raise ValueError(f"host: expected one of {HOSTS + CONTROLS}, got {self.host!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.host in CONTROLS and self.variant != 'host':
            raise ValueError(f"variant: {self.host} is a control without memories: 'host' only, got {self.variant!r}")
        if self.d_model % HEAD:
            raise ValueError(f"d_model: must be a multiple of {HEAD}, got {self.d_model}")

    @property
    def name(self) -> str:
        extra = f'-bal{self.balance:g}' if self.variant == 'mom' else ''
        return f"{self.host}-d{self.d_model}-{self.variant}{extra}"


def _fla_model(host: str, d_model: int, layers: int, vocab: int, width: float):
    """fla's model of ``host`` with value width ``width`` (``expand_v``): heads of HEAD, MLP as fla makes it."""
    import fla.models as models
    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_heads=d_model // HEAD,
                  fuse_cross_entropy=False, tie_word_embeddings=False)
    if host == 'GatedDeltaNet':
        return models.GatedDeltaNetForCausalLM(models.GatedDeltaNetConfig(head_dim=HEAD, expand_v=width, **common))
    if host == 'GLA':
        return models.GLAForCausalLM(models.GLAConfig(expand_k=1.0, expand_v=width, **common))
    raise ValueError(f"host: fla's models here are {FLA_HOSTS}, got {host!r}")


def _mamba_model(d_model: int, layers: int, vocab: int, expand: float, d_state: int, rms_norm: bool = True):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    config = MambaConfig(d_model=d_model, n_layer=layers, vocab_size=vocab, pad_vocab_size_multiple=8,
                         rms_norm=rms_norm, fused_add_norm=False, residual_in_fp32=True, tie_embeddings=False,
                         ssm_cfg=dict(layer='Mamba2', d_state=d_state, headdim=HEAD, expand=int(expand),
                                      use_mem_eff_path=False))  # (mamba-ssm takes whole expand factors only)
    return MambaLMHeadModel(config)


def _attention_model(d_model: int, layers: int, vocab: int):
    """The softmax-attention control: Llama blocks (RoPE, pre-norm, gated MLP) with heads of HEAD."""
    from transformers import LlamaConfig, LlamaForCausalLM
    mlp = 256 * -(-int(d_model * 4 * 2 / 3) // 256)  # fla's GatedMLP width for hidden_ratio 4
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=d_model // HEAD, num_key_value_heads=d_model // HEAD, head_dim=HEAD,
                         max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation='sdpa')
    return LlamaForCausalLM(config)


BASE_WIDTH = {'GatedDeltaNet': 1.0, 'GLA': 1.0, 'Mamba2': 2.0}  # expand_v (fla) or expand (Mamba2)
BASE_STATE = 64  # Mamba2's d_state


def _plain(spec: ModelSpec, width: float | None = None, state_factor: int = 1, cpu: bool = False) -> nn.Module:
    """The host's model; ``cpu``: Mamba2's block norms as torch's LayerNorm (mamba-ssm's Triton RMSNorm asks for
    CUDA in its backward)."""
    if spec.host == 'Attention':
        return _attention_model(spec.d_model, spec.num_layers, spec.vocab_size)
    width = BASE_WIDTH[spec.host] if width is None else width
    if spec.host == 'Mamba2':
        return _mamba_model(spec.d_model, spec.num_layers, spec.vocab_size, width, BASE_STATE * state_factor,
                            rms_norm=not cpu)
    return _fla_model(spec.host, spec.d_model, spec.num_layers, spec.vocab_size, width * state_factor)


def _convert(model: nn.Module, spec: ModelSpec, backend: str = 'auto') -> nn.Module:
    from mom_wrap import convert
    return convert(model, num_memories=spec.num_memories, topk=spec.topk, shared_memory=True, init='random',
                   balance_loss_weight=spec.balance, backend=backend)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_size(model: nn.Module) -> int:
    """Recurrent-state elements of one sequence over all layers: each host layer's ``state_shape`` times its
    memories (M + 1 for a MixtureOfMemories layer, 1 for a plain host layer)."""
    from mom_wrap import MixtureOfMemories
    from mom_wrap.adapters import adapter_for
    from mom_wrap.convert import host_layers
    total = 0
    for m in model.modules():
        if isinstance(m, MixtureOfMemories):
            total += math.prod(m._adapter.state_shape()) * m.num_slots_memories
    for _, layer in host_layers(model):
        total += math.prod(adapter_for(layer).state_shape())
    return total


def _on_meta(make):
    with torch.device('meta'):
        return make()


def _widths(host: str) -> list[float]:
    """The value widths the ``host_params`` search tries: fla's expand_v in steps of 1/8 (whole 8-wide value
    columns per head), Mamba2's expand in whole steps (all mamba-ssm takes)."""
    base = BASE_WIDTH[host]
    if host == 'Mamba2':
        return [float(e) for e in range(int(base), 8 * int(base) + 1)]
    return [base * (1 + i / 8) for i in range(0, 8 * 12 + 1)]


def widened_width(spec: ModelSpec) -> float:
    """The value width whose host model has the parameter count closest to the MoM model's (built on the meta
    device: no memory, no initialisation)."""
    target = count_parameters(_on_meta(lambda: _convert(_plain(spec), spec, backend='torch')))
    counts = {w: count_parameters(_on_meta(lambda w=w: _plain(spec, width=w))) for w in _widths(spec.host)}
    return min(counts, key=lambda w: abs(counts[w] - target))


def build(spec: ModelSpec, device: str | torch.device = 'cpu', host_as_one_memory: bool = False) -> nn.Module:
    """The model of ``spec`` on ``device``, initialised as its library initialises it (seed it before).

    ``host_as_one_memory``: the plain variants as ``convert(model, num_memories=1, topk=1, shared_memory=False,
    init="copy")``, which computes the host's function with mom_wrap's PyTorch backend: on the CPU fla's plain
    models cannot train (their chunk kernels fail under Triton's interpreter), so the CPU smoke runs take this.
    On the CPU Mamba2's block norms are LayerNorms (``_plain``)."""
    cpu = torch.device(device).type == 'cpu'
    if spec.variant == 'mom':
        model = _convert(_plain(spec, cpu=cpu), spec)
    else:
        width = widened_width(spec) if spec.variant == 'host_params' else None
        model = _plain(spec, width=width, state_factor=spec.num_memories + 1 if spec.variant == 'host_state' else 1,
                       cpu=cpu)
        if host_as_one_memory and spec.host not in CONTROLS:
            from mom_wrap import convert
            convert(model, num_memories=1, topk=1, shared_memory=False, init='copy', balance_loss_weight=0.0)
    return model.to(device)


def describe(spec: ModelSpec, model: nn.Module) -> dict:
    """The row fields of a model: its spec, parameter count (all, and without the embeddings and LM head) and state
    size."""
    embeddings = sum(p.numel() for n, p in model.named_parameters() if 'embed' in n or 'lm_head' in n)
    params = count_parameters(model)
    return {**dataclasses.asdict(spec), 'name': spec.name, 'params': params, 'params_no_embed': params - embeddings,
            'state_size': None if spec.host in CONTROLS else state_size(model)}
