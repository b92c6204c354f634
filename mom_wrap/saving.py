"""Saving and loading converted mamba-ssm models: ``save_mamba`` / ``load_mamba`` (config.json with the ``"mom"``
settings of ``mom_wrap.convert``, and model.safetensors). Converted transformers models (fla's) save and load through
transformers itself: ``mom_wrap.hf``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch.nn as nn

from mom_wrap.convert import convert_from_settings, mom_settings

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'


def _mamba_lm_class():
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as e:
        raise ImportError("mamba-ssm is not installed: pip install 'mom_wrap[mamba]'") from e
    return MambaLMHeadModel


def save_mamba(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save a converted mamba-ssm ``MambaLMHeadModel``: ``config.json`` (mamba-ssm's ``MambaConfig`` fields and
    ``"mom"``, the settings: ``mom_settings``) and ``model.safetensors`` (every parameter; a tied lm_head once).
    ``load_mamba`` reads it back."""
    from safetensors.torch import save_model
    if not isinstance(model, _mamba_lm_class()):
        raise TypeError(f"model: expected mamba-ssm's MambaLMHeadModel, got {type(model).__name__}")
    settings = mom_settings(model)
    os.makedirs(directory, exist_ok=True)
    config = {**dataclasses.asdict(model.config), 'mom': settings}
    with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
        json.dump(config, f, indent=2)
    save_model(model, os.path.join(directory, WEIGHTS_NAME), metadata={'format': 'pt'}, force_contiguous=True)
    model.config.mom = settings


def load_mamba(directory: str | os.PathLike, device=None, dtype=None) -> nn.Module:
    """The converted ``MambaLMHeadModel`` saved in ``directory`` by ``save_mamba`` (or by mamba-ssm's own
    ``save_pretrained`` of a converted model: its config.json carries ``"mom"`` too, its weights are
    ``pytorch_model.bin``), built on ``device`` in ``dtype`` (mamba-ssm's defaults: the CPU, torch's default
    dtype) and the saved weights copied in (cast to it). Every parameter must be in the file (strict). The model
    is built with mamba-ssm's random initialisation first, as its own ``from_pretrained`` does."""
    from mamba_ssm.models.config_mamba import MambaConfig
    cls = _mamba_lm_class()
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    settings = config.pop('mom', None)
    if not isinstance(settings, dict):
        raise ValueError(f"directory: {os.path.join(directory, CONFIG_NAME)} has no 'mom' settings (not a "
                         "converted model; load it with MambaLMHeadModel.from_pretrained)")
    config = MambaConfig(**config)
    config.mom = settings
    model = cls(config, device=device, dtype=dtype)
    convert_from_settings(model, {**settings, 'init': 'copy'})
    model.config.mom = settings
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(path):
        from safetensors.torch import load_model
        load_model(model, path, strict=True, device=str(device) if device is not None else 'cpu')
    else:
        import torch
        state = torch.load(os.path.join(directory, 'pytorch_model.bin'), map_location=device or 'cpu',
                           weights_only=True)
        model.load_state_dict(state, strict=True)
    return model
