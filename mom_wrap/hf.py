"""Converted transformers models (fla's, or any ``PreTrainedModel``): ``save_pretrained`` /
``AutoModelForCausalLM.from_pretrained``.

``mom_wrap.convert`` records its settings on the model's config (``config.mom``, see ``mom_wrap.convert``) and
switches the config and the model to subclasses made here, whose ``model_type`` is ``"mom_" + the model's own``
(``MomGLAConfig`` / ``MomGLAForCausalLM`` for fla's GLA, and so for every family, a family whose host layer a user's
adapter wraps included). ``save_pretrained`` then writes a config.json that the Auto classes map back to them, and
their ``__init__`` builds the model and converts it with the saved settings before transformers loads the weights
(every MoM parameter is in the checkpoint: none is missing or unexpected). A checkpoint that names a ``mom_`` type
nobody registered is refused by transformers ("does not recognize this architecture"); it never loads as the plain
model with its MoM weights dropped.

Registration is lazy, so that ``import mom_wrap`` does not import fla's models (about 8 s on a CPU machine):
``import mom_wrap`` registers with ``AutoConfig`` one light placeholder config class per model type that fla
defines (read from fla's configuration files, without importing them); reading such a config
(``AutoConfig.from_pretrained``, ``from_dict``) imports fla's models and registers the real classes (the config,
and the model classes of ``AutoModel`` and ``AutoModelForCausalLM``), which then replace the placeholder. Another
package's family gets its placeholder the same way when the package names its config class in the
``mom_wrap.models`` entry point group (``my_model_type = "my_package.model:MyConfig"``: read from its metadata,
imported only when such a checkpoint is read); otherwise its Mom classes are registered when a model is converted,
or by ``register(MyConfig)``, in that process.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

import torch.nn as nn

from mom_wrap.convert import MARKERS, convert_from_settings, mom_settings

PREFIX = 'mom_'

_CONFIGS: dict[type, type] = {}  # base config class -> its Mom config class
_MODELS: dict[type, type] = {}  # base model class -> its Mom model class


def _auto_classes() -> list:
    """The Auto classes whose mapping a converted model joins: those fla registers its models with."""
    from transformers import AutoModel, AutoModelForCausalLM
    return [AutoModel, AutoModelForCausalLM]


def mom_config_class(base: type) -> type:
    """The Mom config class of the config class ``base`` (made once): ``base`` with ``model_type`` ``"mom_" +
    base.model_type``, registered with ``AutoConfig``."""
    if base in _CONFIGS.values():
        return base
    if base not in _CONFIGS:
        from transformers import AutoConfig

        def __init__(self, *args, **kwargs):  # an own __init__: transformers would give a subclass without one a
            base.__init__(self, *args, **kwargs)  # dataclass __init__ instead of the base's

        name = f'Mom{base.__name__}'
        _CONFIGS[base] = cls = type(name, (base,), {
            'model_type': PREFIX + base.model_type, '__module__': __name__, '__qualname__': name, '__init__': __init__,
            '__doc__': f"{base.__name__} of a model whose host layers are MixtureOfMemories layers; their settings "
                       "are ``config.mom`` (``mom_wrap.convert``)."})
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
        globals()[name] = cls  # a module attribute, for pickle
    return _CONFIGS[base]


def mom_model_class(base: type) -> type:
    """The Mom model class of the ``PreTrainedModel`` class ``base`` (made once): ``base`` whose ``__init__``
    converts the model with ``config.mom``, with the Mom config class of ``base.config_class``."""
    if base in _MODELS.values():
        return base
    if base not in _MODELS:
        name = f'Mom{base.__name__}'
        _MODELS[base] = cls = type(name, (_MomModelMixin, base), {
            'config_class': mom_config_class(base.config_class), '__module__': __name__, '__qualname__': name,
            '__doc__': f"{base.__name__} with its host layers converted (``config.mom``)."})
        globals()[name] = cls
    return _MODELS[base]


def register(base_config: type) -> type:
    """Register with transformers the Mom classes of the config class ``base_config``: its Mom config with
    ``AutoConfig``, and for each Auto class (``AutoModel``, ``AutoModelForCausalLM``) under which a model class is
    registered for ``base_config``, that class's Mom class for the Mom config. Idempotent; returns the Mom config
    class. ``mom_wrap.convert`` calls it; call it yourself before loading a converted model of a family outside fla
    in a fresh process."""
    config = mom_config_class(base_config)
    for auto in _auto_classes():
        mapping = auto._model_mapping
        if base_config in mapping:
            auto.register(config, mom_model_class(mapping[base_config]), exist_ok=True)
    return config


# fla's model types, registered lazily ---------------------------------------------------------------------------

def fla_model_types() -> list[str]:
    """The ``model_type`` of every fla model family, read from fla's ``models/*/configuration_*.py`` without
    importing them (importing fla's models takes seconds; this, a few milliseconds)."""
    spec = importlib.util.find_spec('fla')
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / 'models'
    types = []
    for path in sorted(root.glob('*/configuration_*.py')):
        match = re.search(r"^\s+model_type\s*=\s*['\"]([\w\-.]+)['\"]", path.read_text(encoding='utf-8'), re.M)
        if match:
            types.append(match.group(1))
    return types


MODEL_ENTRY_POINTS = 'mom_wrap.models'  # name: a base model_type; value: its config class (another package's family)


def model_entry_points() -> dict:
    """Installed packages' model families: ``{model_type: entry point of its config class}`` from the
    ``mom_wrap.models`` group, read from their metadata (nothing imported)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS)}


def _resolve(model_type: str, entry_point=None) -> type:
    """The real Mom config class of the base model type ``model_type``, registering it: from ``entry_point`` (another
    package's family: loading it imports the package, which registers its adapters too), or fla's (importing fla's
    models registers their families with ``AutoConfig``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if entry_point is not None:
        return register(entry_point.load())
    if model_type not in CONFIG_MAPPING:
        import fla.models  # noqa: F401
    return register(CONFIG_MAPPING[model_type])


def _placeholder(model_type: str, entry_point=None) -> type:
    """A light config class registered under ``"mom_" + model_type`` until the real one is: building or reading it
    (``from_dict``) registers the real classes and returns the real config."""
    from transformers import PreTrainedConfig

    def __new__(cls, *args, **kwargs):
        return _resolve(model_type, entry_point)(*args, **kwargs)  # not an instance of cls: cls.__init__ skipped

    def from_dict(cls, config_dict, **kwargs):
        return _resolve(model_type, entry_point).from_dict(config_dict, **kwargs)

    def from_pretrained(cls, *args, **kwargs):
        return _resolve(model_type, entry_point).from_pretrained(*args, **kwargs)

    return type('MomPlaceholderConfig', (PreTrainedConfig,), {
        'model_type': PREFIX + model_type, '__module__': __name__, '__new__': __new__,
        'from_dict': classmethod(from_dict), 'from_pretrained': classmethod(from_pretrained)})


def register_lazy() -> None:
    """What ``import mom_wrap`` runs: the placeholders of fla's model types and of the families other packages name
    in the ``mom_wrap.models`` entry point group, importing neither (no-op without transformers)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return
    real = {c.model_type for c in _CONFIGS.values()}
    entry_points = model_entry_points()
    for model_type in [*fla_model_types(), *entry_points]:
        if PREFIX + model_type not in real:
            AutoConfig.register(PREFIX + model_type, _placeholder(model_type, entry_points.get(model_type)),
                                exist_ok=True)


def __getattr__(name: str):
    """``mom_wrap.hf.MomGLAForCausalLM`` and the like for fla's classes (what pickle looks up): made on first use."""
    if name.startswith('Mom'):
        import fla.models
        base = getattr(fla.models, name[3:], None)
        if isinstance(base, type):
            from transformers import PreTrainedConfig
            return mom_config_class(base) if issubclass(base, PreTrainedConfig) else mom_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# converting ------------------------------------------------------------------------------------------------------

def mark_converted(model: nn.Module, settings: dict) -> None:
    """After ``convert``: record ``settings`` on the config (``config.mom``) and, for a transformers model, switch it
    and its config to their Mom classes (in place: they only add class attributes and methods) and register them
    with the Auto classes. Other models keep their classes (only ``config.mom`` is recorded)."""
    config = model.config
    config.mom = settings
    try:
        from transformers import PreTrainedConfig, PreTrainedModel
    except ImportError:
        return
    if not (isinstance(model, PreTrainedModel) and isinstance(config, PreTrainedConfig)):
        return
    base_config = type(config) if type(config) not in _CONFIGS.values() else type(config).__mro__[1]
    config.__class__ = register(base_config)
    model.__class__ = mom_model_class(type(model))


class _MomModelMixin:
    """``__init__``: the model of ``config``, converted with ``config.mom``. Under ``from_pretrained`` the
    parameters are on the meta device and the memories take init ``"copy"`` (the checkpoint overwrites them);
    otherwise (``from_config``) the init recorded by ``convert``. ``save_pretrained`` first refreshes
    ``config.mom`` from the layers (a ``set_balance_loss_weight`` since ``convert`` is saved too).
    ``initialize_weights`` (run by transformers after loading) refills mom_wrap's non-persistent buffers."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        settings = getattr(config, 'mom', None)
        if not isinstance(settings, dict):
            raise ValueError(f"config: {type(config).__name__} has no 'mom' settings (config.mom); make the model "
                             "with mom_wrap.convert")
        convert_from_settings(self, settings)

    def save_pretrained(self, *args, **kwargs):
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
MARKERS.append(mark_converted)
