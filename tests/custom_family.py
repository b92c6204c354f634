"""A transformers model family of a user's own (not fla's), whose layers are fla GLA layers: what a user with a model of
their own converts, saves and loads (mom_wrap registers no Mom classes for it in advance). Importing this module
registers the family with transformers' Auto classes, as a user's package would."""
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

MODEL_TYPE = 'mom_wrap_test_custom'


class CustomConfig(PreTrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=2, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_heads = num_hidden_layers, num_heads
        super().__init__(**kwargs)


class CustomForCausalLM(PreTrainedModel):
    """Embedding, residual GLA layers with a norm before each, an output norm and head."""
    config_class = CustomConfig
    base_model_prefix = 'custom'

    def __init__(self, config):
        super().__init__(config)
        from fla.layers import GatedLinearAttention
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norms = nn.ModuleList(nn.LayerNorm(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.layers = nn.ModuleList(GatedLinearAttention(hidden_size=config.hidden_size, num_heads=config.num_heads,
                                                         layer_idx=i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.3)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:
        h = self.embed(input_ids)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))[0]
        return CausalLMOutput(logits=self.head(self.norm(h)))


AutoConfig.register(MODEL_TYPE, CustomConfig, exist_ok=True)
AutoModelForCausalLM.register(CustomConfig, CustomForCausalLM, exist_ok=True)
