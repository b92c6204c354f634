"""Which adapter takes which host layer: registration (``register_adapter``, and the ``mom_wrap.adapters`` entry
point group through which an installed package registers its adapters) and lookup.

Two kinds of adapter:

* registered (``register_adapter(cls)``): it takes every layer of its ``host_class`` (``adapter_for``), so that
  ``MixtureOfMemories(layer)``, ``convert(model)``, ``python -m mom_wrap.check`` and ``from_pretrained`` of a
  converted model find it;
* variants (``register_adapter(cls, variant=True)``): a second adapter of a host that already has one
  (``mom_wrap.fla_mom.FlaMomAdapter``: fla's MomAttention with q per memory), used only where it is named
  (``MixtureOfMemories(layer, adapter=cls)``, ``convert(model, adapter=cls)``); a converted model records its
  dotted path and loads with it once it is registered.

A package of adapters registers them when it is imported; to be found without an import, it names the module (or the
adapter class) in its ``pyproject.toml``::

    [project.entry-points."mom_wrap.adapters"]
    my_host = "my_package.adapters"          # a module that calls register_adapter, or an adapter class

Entry points are loaded on the first lookup (not at ``import mom_wrap``: a package's import may be slow); one that
fails to load is reported with a warning and skipped.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings

import torch.nn as nn

from mom_wrap.adapters.base import HostAdapter

ENTRY_POINTS = 'mom_wrap.adapters'

_REGISTRY: list[type[HostAdapter]] = []  # registered: each takes every layer of its host_class, first match wins
_VARIANTS: list[type[HostAdapter]] = []  # taken only where named
_entry_points_loaded = False


def register_adapter(cls: type[HostAdapter] | None = None, *, variant: bool = False):
    """Register the ``HostAdapter`` subclass ``cls`` (usable as a decorator, with or without arguments).

    ``variant=False``: it takes every layer of its ``host_class`` (where two registered adapters match a layer, the
    first registered wins: mom_wrap's own come first). ``variant=True``: only where it is named. Either way a model
    converted with it loads once it is registered. Registering a class twice is a no-op."""
    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, HostAdapter)):
            raise TypeError(f"cls: expected a HostAdapter subclass, got {cls!r}")
        if not isinstance(getattr(cls, 'host_class', None), str):
            raise TypeError(f"cls: {cls.__name__}.host_class must be the dotted path of the host's class")
        if cls not in _REGISTRY and cls not in _VARIANTS:
            (_VARIANTS if variant else _REGISTRY).append(cls)
        return cls
    return register if cls is None else register(cls)


def path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_entry_points() -> None:
    """Import every installed package's ``mom_wrap.adapters`` entry point once (each registers its adapters; an
    entry point that is an adapter class is registered here)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 (a broken third-party package must not break mom_wrap)
            warnings.warn(f"mom_wrap: the adapter entry point {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
            continue
        if isinstance(obj, type) and issubclass(obj, HostAdapter):
            register_adapter(obj)


def registered_adapters(installed: bool = False) -> list[type[HostAdapter]]:
    """The registered adapters (entry points loaded), in order; ``installed``: only those whose host's package
    imports here (mamba-ssm is optional)."""
    _load_entry_points()
    return [cls for cls in _REGISTRY if not installed or cls.load_host_class() is not None]


def host_names() -> dict[str, type[HostAdapter]]:
    """Short name -> registered adapter, for people to name hosts by (``python -m mom_wrap.check``, the tests): the
    host's class name, or for a host named like one registered before it, its package's name before it (fla's Mamba2
    after mamba-ssm's: 'fla.Mamba2'). Over every registered adapter, installed or not, so a name does not change
    with what is installed."""
    names: dict[str, type[HostAdapter]] = {}
    for cls in registered_adapters():
        name = cls.host_class.rpartition('.')[2]
        names[f"{cls.host_class.partition('.')[0]}.{name}" if name in names else name] = cls
    return names


def adapter_by_path(path: str) -> type[HostAdapter]:
    """The registered adapter or variant whose dotted path is ``path`` (as a converted model records it). mom_wrap's
    own modules are imported if need be; another package's adapter must be registered (imported, or found through
    its entry point): a saved config never makes mom_wrap import a module it names."""
    _load_entry_points()
    path = str(path)
    module = path.rpartition('.')[0]
    if module.startswith('mom_wrap.') and not any(path_of(c) == path for c in _REGISTRY + _VARIANTS):
        importlib.import_module(module)
    for cls in _REGISTRY + _VARIANTS:
        if path_of(cls) == path:
            return cls
    raise ValueError(f"adapter: {path!r} is not a registered adapter; import the package that registers it (or "
                     f"install it: its '{ENTRY_POINTS}' entry point registers it) before loading")


def supported_hosts() -> list[str]:
    """Dotted paths of the host classes that can be wrapped here: those with a registered adapter whose package is
    installed (mamba-ssm is optional: without it Mamba2 is not listed)."""
    return [cls.host_class for cls in registered_adapters(installed=True)]


def adapter_for(host: nn.Module, adapter: type[HostAdapter] | None = None) -> HostAdapter:
    """The adapter of the layer ``host``: the first registered one that matches it, or ``adapter`` (a registered
    adapter or a variant; it must match)."""
    if not isinstance(host, nn.Module):
        raise TypeError(f"host: expected an nn.Module layer, got {type(host).__name__}")
    if adapter is not None:
        if not (isinstance(adapter, type) and issubclass(adapter, HostAdapter)):
            raise TypeError(f"adapter: expected a HostAdapter subclass, got {adapter!r}")
        if not adapter.matches(host):
            raise ValueError(f"adapter: {adapter.__name__} does not take a {type(host).__name__} host "
                             f"(it takes {adapter.host_class})")
        return adapter(host)
    for cls in registered_adapters():
        if cls.matches(host):
            return cls(host)
    name = f"{type(host).__module__}.{type(host).__qualname__}"
    missing = [cls.host_class for cls in registered_adapters() if cls.load_host_class() is None]
    # a class of another package with the name of a supported host (a user's own GatedDeltaNet, say): say that the
    # adapter takes the other one, so that nobody installs a package in the hope that it helps
    namesakes = [path for path in supported_hosts() + missing
                 if path.rpartition('.')[2] == type(host).__name__ and path != name]
    raise ValueError(f"host: no adapter for {name}"
                     + ''.join(f" (mom_wrap's {type(host).__name__} adapter takes {path}, a different class: "
                               "installing its package does not make this one supported)" for path in namesakes)
                     + f"; supported here: {', '.join(supported_hosts())}"
                     + (f"; supported once its package is installed: {', '.join(missing)}" if missing else '')
                     + "; any other layer needs an adapter of its own (docs/adapters.md)")
