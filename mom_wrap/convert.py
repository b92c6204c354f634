"""Retrofit a pretrained model: wrap every supported host layer of it as a MixtureOfMemories layer, in place,
and save / load the result.

```python
model = AutoModelForCausalLM.from_pretrained("fla-hub/gla-1.3B-100B")        # any fla model of a supported host
mom_wrap.convert(model, num_memories=4, topk=2)                               # init="preserve": same logits
model.save_pretrained(path)                                                   # config.json: model_type "mom_gla"
model = AutoModelForCausalLM.from_pretrained(path)                            # after `import mom_wrap`

model = mom_wrap.convert(MambaLMHeadModel.from_pretrained("state-spaces/mamba2-130m"))
mom_wrap.save_mamba(model, path); model = mom_wrap.load_mamba(path)           # mamba-ssm models
```

The settings travel in config.json as ``"mom"``: ``num_memories``, ``topk``, ``shared_memory``, ``layers`` (the
``layer_idx`` of every wrapped layer), ``balance_loss_weight``, ``backend``, ``recurrence_parts``, and ``init``
(how ``convert`` made the memories; loading takes the weights from the checkpoint whatever it was) and, for layers
made with a variant adapter (``mom_wrap.fla_mom``'s imports of fla's MoM models), ``adapter``. Saving and loading
live where this module is imported from, not here: fla's models (and any transformers model) go through
transformers (``mom_wrap.hf``), mamba-ssm's ``MambaLMHeadModel`` through ``save_mamba`` / ``load_mamba``
(``mom_wrap.saving``, safetensors weights). Layers wrapped by hand are recorded by ``convert(model)``,
which wraps what is left with their settings (nothing, where every host layer is wrapped).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from mom_wrap.adapters.registry import adapter_by_path, adapter_for, path_of, registered_adapters, supported_hosts
from mom_wrap.wrapper import MixtureOfMemories

# read off the layers
SETTINGS = ('num_memories', 'topk', 'shared_memory', 'balance_loss_weight', 'backend', 'recurrence_parts')


def host_layers(model: nn.Module, adapter: type | None = None) -> list[tuple[list[str], nn.Module]]:
    """Every submodule of ``model`` that a registered adapter (or ``adapter``, where given) matches, outside
    MixtureOfMemories layers (whose ``host`` is one) and not inside another host, in module order, with all the
    paths it is reachable by (a module shared between parents has several)."""
    adapters = [adapter] if adapter is not None else registered_adapters(installed=True)
    found: dict[int, tuple[list[str], nn.Module]] = {}
    skip: list[str] = []  # paths of the hosts found and of MoM layers: what is inside them is theirs
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + '.') for p in skip):
            continue
        if isinstance(module, MixtureOfMemories):
            skip.append(name)
        elif id(module) in found:
            found[id(module)][0].append(name)
            skip.append(name)
        elif any(cls.matches(module) for cls in adapters):
            found[id(module)] = ([name], module)
            skip.append(name)
    return list(found.values())


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, 'config', None)
    for attr in ('num_hidden_layers', 'n_layer'):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    return None


def _select(model: nn.Module, hosts: list, layers, converted: set) -> list:
    """The host layers ``layers`` names (their ``layer_idx``; None: all of them); a named layer that is converted
    already (``converted``: their ``layer_idx``) is left as it is."""
    if layers is None:
        return hosts
    if isinstance(layers, (str, bytes)) or not hasattr(layers, '__iter__'):
        raise TypeError(f"layers: expected a list of layer indices or None, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers: empty; pass None to convert every host layer")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers: expected int layer indices, got {i!r}")
    by_idx = {getattr(m, 'layer_idx', None) for _, m in hosts}
    n = _num_layers(model)
    for i in layers:
        if n is not None and not 0 <= i < n:
            raise ValueError(f"layers: layer {i} is out of range (the model has {n} layers)")
        if i not in by_idx and i not in converted:
            raise ValueError(f"layers: layer {i} is not a host layer (host layers: "
                             f"{sorted(j for j in by_idx | converted if j is not None)})")
    return [(paths, m) for paths, m in hosts if getattr(m, 'layer_idx', None) in set(layers)]


DEFAULTS = dict(num_memories=4, topk=2, shared_memory=True)


def _adapter_path(cls: type | None) -> str | None:
    """As ``MixtureOfMemories.adapter_path``: None for a registered adapter (or none given)."""
    return None if cls is None or cls in registered_adapters() else path_of(cls)


def _settings_to_use(model: nn.Module, given: dict, init: str | None) -> tuple[dict, str, dict | None]:
    """convert's settings: those given, and for the others those of the model's MixtureOfMemories layers where it
    has some (a setting given must then equal theirs: a saved model carries one value for all layers), else the
    defaults. Returns (the options for new layers, the init for new layers, the current settings or None)."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(SETTINGS) - {'adapter'})
    if unknown:
        raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r}")
    layers = [m for m in model.modules() if isinstance(m, MixtureOfMemories)]
    if not layers:
        return {**DEFAULTS, **given}, init or 'preserve', None
    current = {**_layer_settings(layers), 'init': _recorded_init(model)}
    for key, value in given.items():
        have, mine = (current.get('adapter'), _adapter_path(value)) if key == 'adapter' else (current[key], value)
        if mine != have:
            raise ValueError(f"{key}: the model's MixtureOfMemories layers have {key}={have!r}, got {mine!r}; "
                             "layers converted later take the same settings (leave it out to take theirs)")
    options = {key: current[key] for key in SETTINGS}
    if current.get('adapter') is not None:
        options['adapter'] = given.get('adapter') or adapter_by_path(current['adapter'])
    return options, init or current['init'] or 'preserve', current


def model_initializer(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """How ``model`` initialises a module of its own, where it says: a transformers model's ``_init_weights`` (fla's
    models draw every Linear and conv weight from N(0, ``initializer_range``), not PyTorch's defaults); None for
    other models (mamba-ssm's ``MambaLMHeadModel`` keeps PyTorch's defaults for its layers' weights, as
    ``MixtureOfMemories`` does without an initializer)."""
    from transformers import PreTrainedModel
    return model._init_weights if isinstance(model, PreTrainedModel) else None


def convert(model: nn.Module, num_memories: int | None = None, topk: int | None = None,
            shared_memory: bool | None = None, init: str | None = None, layers=None, **kwargs) -> nn.Module:
    """Wrap every supported host layer of ``model`` (``mom_wrap.supported_hosts()``) in place as
    ``MixtureOfMemories(layer, num_memories, topk, shared_memory, init, **kwargs)``, and record the settings on
    the model; returns ``model``.

    Args:
        model: an fla model (``...ForCausalLM`` / ``...Model`` of GatedDeltaNet, GLA, DeltaNet, RWKV6, RWKV7),
            mamba-ssm's ``MambaLMHeadModel``, a transformers model whose host layers a registered adapter wraps, or
            any module holding host layers. Host layers are found by their class (an adapter matches them),
            wherever they sit.
        num_memories, topk, shared_memory: as ``MixtureOfMemories``; default 4, 2, True, or for a model with
            MixtureOfMemories layers already (converted before, or wrapped by hand), theirs.
        layers: the ``layer_idx`` of the host layers to wrap; None (default): all of them. A listed layer that is
            converted already stays as it is.
        init: as ``MixtureOfMemories``, for the layers wrapped now; ``"preserve"`` (default) keeps the model's
            function at the start.
        kwargs: ``MixtureOfMemories``'s other options (``backend``, ``balance_loss_weight``, ``recurrence_parts``,
            ``adapter``, ``initializer``), defaults as above; ``initializer`` defaults to the model's own
            (``model_initializer``), so that fresh memories and routers start as the model's layers did.

    A model converted already (or with layers wrapped by hand) takes more layers with the same settings: a setting
    given must equal its layers' (``ValueError`` naming it otherwise). With nothing left to wrap, ``convert`` only
    records the layers' settings: after wrapping layers by hand, ``convert(model)`` makes ``save_pretrained``
    (``save_mamba``) save a model that loads converted.

    The settings are recorded on ``model.config`` as ``config.mom`` (a dict, see ``mom_settings``); a transformers
    model and its config switch to the ``mom_wrap.hf`` subclasses (``model_type`` ``"mom_<its type>"``), so that
    ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` bring the converted model back. Raises
    ``ValueError`` for a model without host layers, and for ``layers`` out of range or naming a layer that is not a
    host layer. The arguments and every selected host's options (its adapter) are checked before any layer
    changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    initializer = kwargs.pop('initializer', None) or model_initializer(model)  # (not a setting: not recorded)
    given = dict(num_memories=num_memories, topk=topk, shared_memory=shared_memory, **kwargs)
    options, init_now, current = _settings_to_use(model, given, init)
    hosts = host_layers(model, options.get('adapter'))
    if not hosts and current is None:
        what = f"layer that adapter {options['adapter'].__name__} takes" if 'adapter' in options else \
            'supported host layer'
        raise ValueError(f"model: no {what} in {type(model).__name__}; supported hosts: {', '.join(supported_hosts())}")
    if any('' in paths for paths, _ in hosts):
        raise ValueError("model: is itself a host layer; wrap it with MixtureOfMemories(model, ...)")
    converted = {m.layer_idx for m in model.modules() if isinstance(m, MixtureOfMemories)}
    hosts = _select(model, hosts, layers, converted)
    for _, layer in hosts:  # the host's options are refused here, before any layer changes
        adapter_for(layer, options.get('adapter'))
    for paths, layer in hosts:
        mom = MixtureOfMemories(layer, init=init_now, initializer=initializer, **options)
        for path in paths:
            parent, _, attr = path.rpartition('.')
            setattr(model.get_submodule(parent), attr, mom)
    settings = mom_settings(model)
    # the init of every layer where one made them all (unknown for layers wrapped by hand: None)
    settings['init'] = init_now if current is None else \
        current['init'] if not hosts or current['init'] == init_now else None
    mark(model, settings)
    return model


# what more records a converted model, each called as marker(model, settings) after config.mom is set:
# mom_wrap.hf's switches a transformers model and its config to their Mom classes (registered when it is imported,
# with the package: this module does not import the saving and loading modules, they import it)
MARKERS: list = []


def mark(model: nn.Module, settings: dict) -> None:
    """Record ``settings`` on ``model.config`` as ``config.mom`` (a model without a config has nowhere to keep them)
    and run the ``MARKERS``."""
    config = getattr(model, 'config', None)
    if config is None:
        return
    config.mom = settings
    for marker in MARKERS:
        marker(model, settings)


def mom_settings(model: nn.Module) -> dict:
    """The settings of ``model``'s MixtureOfMemories layers, as config.json carries them: ``SETTINGS`` (one value
    for all layers), ``layers`` (their ``layer_idx``, sorted; None: all host layers, where some have no
    ``layer_idx``), ``init`` (as recorded by ``convert``) and, only where the layers use a variant adapter,
    ``adapter`` (its dotted path)."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfMemories)]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MixtureOfMemories layer (convert it first)")
    settings = _layer_settings(layers)
    idx = [m.layer_idx for m in layers]
    if all(i is not None for i in idx):
        settings['layers'] = sorted(set(idx))
    elif not host_layers(model):  # None: every host layer (the only way to name layers without a layer_idx)
        settings['layers'] = None
    else:
        raise ValueError("model: a MixtureOfMemories layer has no layer_idx while other host layers are not "
                         "converted; the settings name the converted layers by their layer_idx")
    settings['init'] = _recorded_init(model)
    return settings


def _recorded_init(model: nn.Module) -> str | None:
    """The init ``convert`` recorded on the model's config (None where it recorded none)."""
    recorded = getattr(getattr(model, 'config', None), 'mom', None)
    return recorded.get('init') if isinstance(recorded, dict) else None


def _layer_settings(layers: list[MixtureOfMemories]) -> dict:
    """``SETTINGS`` read off the layers (one value for all of them) and, where they use a variant adapter,
    ``adapter``."""
    settings = {}
    for key in SETTINGS:
        values = {getattr(m, key) for m in layers}
        if len(values) > 1:
            raise ValueError(f"model: its MixtureOfMemories layers differ in {key} ({sorted(values, key=str)}); "
                             "a saved model carries one value for all layers")
        settings[key] = values.pop()
    paths = {m.adapter_path for m in layers}  # a variant adapter (MixtureOfMemories' adapter=): saved only if one
    if len(paths) > 1:
        raise ValueError(f"model: its MixtureOfMemories layers differ in adapter ({sorted(paths, key=str)}); "
                         "a saved model carries one for all layers")
    if paths != {None}:
        settings['adapter'] = paths.pop()
    return settings


def convert_from_settings(model: nn.Module, settings: dict) -> nn.Module:
    """``convert`` with saved settings (``mom_settings``), for loading: when the parameters are on the meta device
    (transformers' ``from_pretrained``) or the recorded init is unknown, the memories take init ``"copy"`` (the
    checkpoint's weights replace them); otherwise the recorded init (a fresh model from a config)."""
    missing = [k for k in (*SETTINGS[:3], 'layers') if k not in settings]
    if missing:
        raise ValueError(f"config: the 'mom' settings lack {missing}")
    param = next(model.parameters(), None)
    init = settings.get('init')
    if init is None or (param is not None and param.device.type == 'meta'):
        init = 'copy'
    kwargs = {k: settings[k] for k in SETTINGS[3:] if k in settings}
    if settings.get('adapter') is not None:
        kwargs['adapter'] = adapter_by_path(settings['adapter'])
    if not host_layers(model, kwargs.get('adapter')):
        raise ValueError(f"config: the 'mom' settings convert layers {settings['layers']} of this "
                         f"{type(model).__name__}, but no registered adapter takes a layer of it: import the module "
                         "that registers its adapter (mom_wrap.adapters.register_adapter) before loading")
    convert(model, settings['num_memories'], settings['topk'], settings['shared_memory'], init=init,
            layers=settings['layers'], **kwargs)
    model.config.mom = dict(settings)
    return model
