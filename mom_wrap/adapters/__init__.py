"""Host adapters: one module per host, registered on import. See ``base`` for the protocol."""
from mom_wrap.adapters.base import HostAdapter, WriteProjection, adapter_for, register_adapter, supported_hosts
from mom_wrap.adapters import gated_deltanet  # noqa: F401  (registers the adapter)

__all__ = ['HostAdapter', 'WriteProjection', 'adapter_for', 'register_adapter', 'supported_hosts']
