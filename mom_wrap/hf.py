"""Converted fla models through transformers: ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.

``mom_wrap.convert`` records its settings on the model's config (``config.mom``, see ``mom_wrap.convert``) and
switches the config (and a plain fla ``...ForCausalLM`` / ``...Model``) to this module's subclasses, whose
``model_type`` is ``"mom_" + the fla model type``. ``save_pretrained`` then writes a config.json transformers
maps back to them, and their ``__init__`` builds the fla model and converts it with the saved settings before
transformers loads the weights (every MoM parameter is in the checkpoint: none is missing or unexpected).

Registration is lazy, so that ``import mom_wrap`` does not import fla's models (about 8 s on a CPU machine):
``import mom_wrap`` registers with ``AutoConfig`` one light placeholder config class per family, whose
``from_dict`` (what ``AutoConfig.from_pretrained`` calls) and constructor first ``register()`` the real
classes (config, ``AutoModel`` and ``AutoModelForCausalLM``), which then replace the placeholders.
"""
from __future__ import annotations

import torch.nn as nn

# family (the prefix of its fla.models class names: GLAConfig, GLAModel, GLAForCausalLM) -> fla's model_type
FAMILIES = {
    'GatedDeltaNet': 'gated_deltanet',
    'GLA': 'gla',
    'DeltaNet': 'delta_net',
    'RWKV6': 'rwkv6',
    'RWKV7': 'rwkv7',
}
PREFIX = 'mom_'

_CLASSES: dict[str, dict[str, type]] = {}  # family -> {'config', 'model', 'causal_lm', 'base_config', ...}


def _build_family(family: str) -> dict[str, type]:
    import fla.models as models

    base_config = getattr(models, f'{family}Config')
    base_model = getattr(models, f'{family}Model')
    base_lm = getattr(models, f'{family}ForCausalLM')
    if base_config.model_type != FAMILIES[family]:  # a renamed type would break existing checkpoints
        raise RuntimeError(f"fla's {base_config.__name__}.model_type is {base_config.model_type!r}, mom_wrap "
                           f"expects {FAMILIES[family]!r}")

    def __init__(self, *args, **kwargs):  # an own __init__: transformers would give a subclass without one a
        base_config.__init__(self, *args, **kwargs)  # dataclass __init__ instead of fla's

    config = type(f'Mom{family}Config', (base_config,), {
        'model_type': PREFIX + base_config.model_type, '__module__': __name__, '__init__': __init__,
        '__doc__': f"fla's {base_config.__name__} of a model whose host layers are MixtureOfMemories layers; "
                   "their settings are ``config.mom`` (``mom_wrap.convert``)."})
    model = type(f'Mom{family}Model', (_MomModelMixin, base_model), {
        'config_class': config, '__module__': __name__,
        '__doc__': f"fla's {base_model.__name__} with its host layers converted (``config.mom``)."})
    lm = type(f'Mom{family}ForCausalLM', (_MomModelMixin, base_lm), {
        'config_class': config, '__module__': __name__,
        '__doc__': f"fla's {base_lm.__name__} with its host layers converted (``config.mom``)."})
    return {'config': config, 'model': model, 'causal_lm': lm, 'base_config': base_config,
            'base_model': base_model, 'base_causal_lm': base_lm}


def register() -> dict[str, dict[str, type]]:
    """Define and register with transformers the Mom classes of every fla family (imports fla's models).
    Idempotent; returns family -> classes."""
    if len(_CLASSES) < len(FAMILIES):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        for family in FAMILIES:
            if family in _CLASSES:
                continue
            classes = _build_family(family)
            AutoConfig.register(classes['config'].model_type, classes['config'], exist_ok=True)
            AutoModel.register(classes['config'], classes['model'], exist_ok=True)
            AutoModelForCausalLM.register(classes['config'], classes['causal_lm'], exist_ok=True)
            _CLASSES[family] = classes
            for key in ('config', 'model', 'causal_lm'):  # module attributes, for pickle
                globals()[classes[key].__name__] = classes[key]
    return _CLASSES


def __getattr__(name: str):
    """``mom_wrap.hf.MomGLAForCausalLM`` and the like (what pickle looks up): defined on first use."""
    if name.startswith('Mom') and any(name[3:].startswith(f) for f in FAMILIES):
        register()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _placeholder(family: str) -> type:
    """A light config class registered under the family's Mom model type until ``register()`` runs: building or
    reading it (``from_dict``) registers the real classes and returns the real config."""
    from transformers import PreTrainedConfig

    def real():
        return register()[family]['config']

    def __new__(cls, *args, **kwargs):
        return real()(*args, **kwargs)  # not an instance of cls: Python skips cls.__init__

    def from_dict(cls, config_dict, **kwargs):
        return real().from_dict(config_dict, **kwargs)

    def from_pretrained(cls, *args, **kwargs):
        return real().from_pretrained(*args, **kwargs)

    return type(f'Mom{family}Config', (PreTrainedConfig,), {
        'model_type': PREFIX + FAMILIES[family], '__module__': __name__, '__new__': __new__,
        'from_dict': classmethod(from_dict), 'from_pretrained': classmethod(from_pretrained)})


def register_lazy() -> None:
    """What ``import mom_wrap`` runs: the placeholders, without importing fla (no-op without transformers)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return
    for family, model_type in FAMILIES.items():
        if family not in _CLASSES:
            AutoConfig.register(PREFIX + model_type, _placeholder(family), exist_ok=True)


def family_of(config) -> dict[str, type] | None:
    """The Mom classes of the fla family whose config ``config`` is (a plain or a Mom one), or None."""
    module = type(config).__module__
    if not (module.startswith('fla.') or module == __name__):
        return None
    for classes in register().values():
        if type(config) in (classes['base_config'], classes['config']):
            return classes
    return None


def mark_converted(model: nn.Module, settings: dict) -> None:
    """After ``convert``: record ``settings`` on the config and switch a plain fla model and its config to the
    family's Mom classes (in place: they only add class attributes and methods). Other models keep their
    classes (only ``config.mom`` is recorded)."""
    config = model.config
    config.mom = settings
    classes = family_of(config)
    if classes is None:
        return
    config.__class__ = classes['config']
    if type(model) is classes['base_causal_lm']:
        model.__class__ = classes['causal_lm']
    elif type(model) is classes['base_model']:
        model.__class__ = classes['model']


class _MomModelMixin:
    """``__init__``: the fla model of ``config``, converted with ``config.mom``. Under ``from_pretrained`` the
    parameters are on the meta device and the memories take init ``"copy"`` (the checkpoint overwrites them);
    otherwise (``from_config``) the init recorded by ``convert``. ``save_pretrained`` first refreshes
    ``config.mom`` from the layers (a ``set_balance_loss_weight`` since ``convert`` is saved too).
    ``initialize_weights`` (run by transformers after loading) refills mom_wrap's non-persistent buffers."""

    def __init__(self, config, *args, **kwargs):
        from mom_wrap.convert import convert_from_settings
        super().__init__(config, *args, **kwargs)
        settings = getattr(config, 'mom', None)
        if not isinstance(settings, dict):
            raise ValueError(f"config: {type(config).__name__} has no 'mom' settings (config.mom); make the model "
                             "with mom_wrap.convert")
        convert_from_settings(self, settings)

    def save_pretrained(self, *args, **kwargs):
        from mom_wrap.convert import mom_settings
        self.config.mom = mom_settings(self)
        return super().save_pretrained(*args, **kwargs)

    def initialize_weights(self):
        """transformers fills the non-persistent buffers with ``torch.empty`` after loading, then calls this to
        initialise what it did not load; the token-shift weight the RWKV adapters give their host is such a
        buffer (fla's own ``_init_weights`` of a sub-model does not know it)."""
        super().initialize_weights()
        for module in self.modules():
            reset_mom_buffers(module)


def reset_mom_buffers(module: nn.Module) -> None:
    """Refill the non-persistent buffers mom_wrap's adapters add to host layers (RWKV's token-shift weight)."""
    from mom_wrap.adapters.rwkv_common import SHIFT_BUFFER, install_token_shift
    if SHIFT_BUFFER in module._buffers:
        del module._buffers[SHIFT_BUFFER]
        module._non_persistent_buffers_set.discard(SHIFT_BUFFER)
        install_token_shift(module)


register_lazy()
