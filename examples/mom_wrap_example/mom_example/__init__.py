"""An example of bringing a layer of one's own to mom_wrap, from outside mom_wrap and through its public API only.

* ``mom_example.layer``: ``ToyGatedAttention``, the layer (a gated linear attention with a per-channel decay),
  its recurrence written out in plain PyTorch;
* ``mom_example.model``: a tiny transformers family of it (``model_type`` ``'toy_gated'``), registered with the
  Auto classes and with ``mom_wrap.hf.register`` (so that converted models reload);
* ``mom_example.adapters``: ``ToyGatedAttentionAdapter``, registered with ``mom_wrap``; this package's
  ``mom_wrap.adapters`` entry point names this module.

Importing the package imports all three: ``import mom_example`` is the one import a process needs before it loads a
converted toy model (``AutoModelForCausalLM.from_pretrained``); see README.md.
"""
from mom_example.adapters import ToyGatedAttentionAdapter
from mom_example.layer import ToyGatedAttention
from mom_example.model import ToyConfig, ToyForCausalLM

__all__ = ['ToyConfig', 'ToyForCausalLM', 'ToyGatedAttention', 'ToyGatedAttentionAdapter']
