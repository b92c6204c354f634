"""Host adapters: one module per host, registered on import. See ``base`` for the protocol.

Every module of this package that defines an adapter registers it with ``register_adapter``; all of them
are imported here, so a new host needs its module and nothing else.
"""
import importlib
import pkgutil

from mom_wrap.adapters.base import HostAdapter, WriteProjection
from mom_wrap.adapters.registry import (adapter_for, host_names, register_adapter, registered_adapters,
                                        supported_hosts)

# the protocol and helpers, no adapter
_SHARED = {'base', 'registry', 'toolkit', 'fla_common', 'rwkv_common', 'mamba2_common'}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHARED):
    importlib.import_module(f'{__name__}.{_module}')

__all__ = ['HostAdapter', 'WriteProjection', 'adapter_for', 'host_names', 'register_adapter', 'registered_adapters',
           'supported_hosts']
