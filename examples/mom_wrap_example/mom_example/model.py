"""A tiny transformers family of ``ToyGatedAttention`` layers: ``ToyConfig`` (``model_type`` ``'toy_gated'``) and
``ToyForCausalLM``: embeddings, pre-norm residual blocks (the attention, then an MLP), a final norm and the LM head.

Importing this module registers the family with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, as a package
of one's own would, and with mom_wrap (``mom_wrap.hf.register``): its converted models save with ``model_type``
``'mom_toy_gated'``, which transformers then maps back to the converted classes in ``from_pretrained``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import mom_wrap.hf
from mom_example.layer import RMSNorm, ToyGatedAttention

MODEL_TYPE = 'toy_gated'


class ToyConfig(PreTrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 64, hidden_size: int = 64, num_hidden_layers: int = 2, num_heads: int = 2,
                 intermediate_size: int = 128, norm_eps: float = 1e-5, gate_logit_normalizer: float = 16.0,
                 initializer_range: float = 0.2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_heads, self.intermediate_size = num_heads, intermediate_size
        self.norm_eps, self.gate_logit_normalizer = norm_eps, gate_logit_normalizer
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class ToyBlock(nn.Module):
    def __init__(self, config: ToyConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        # the model passes its norm_eps on to the layer's output norm: a setting the adapter's example_host does not
        # have, which the adapter's example_models cover
        self.attn = ToyGatedAttention(config.hidden_size, config.num_heads, layer_idx,
                                      gate_logit_normalizer=config.gate_logit_normalizer, norm_eps=config.norm_eps)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))[0]
        return h + self.down(F.gelu(self.up(self.mlp_norm(h))))


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = 'toy'
    _no_split_modules = ['ToyBlock']

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: ToyForCausalLM takes no padding")
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:  # next-token prediction
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, ToyConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)
mom_wrap.hf.register(ToyConfig)  # after the Auto registration: it registers the Mom class of each registered model
