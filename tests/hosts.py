"""The host layers the tests run on, as pytest parameters: every registered adapter, installed or not, marked with
the optional package its host needs (``mamba_ssm`` for mamba-ssm's Mamba2), which tests/conftest.py skips where
that package is missing. A test over hosts takes its parameters from here, so that no test needs a rule of its own
for an optional host (README's quick start runs without mamba-ssm; `python -m pytest -m mamba_ssm` runs them).
"""
from __future__ import annotations

import pytest

from mom_wrap.adapters import HostAdapter, registered_adapters

# the top-level package of a host's class -> the marker of the tests that need it (only optional packages)
OPTIONAL = {'mamba_ssm': pytest.mark.mamba_ssm}

# class name of the host -> its adapter, for every registered adapter (also those whose package is missing)
ADAPTERS: dict[str, type[HostAdapter]] = {a.host_class.rpartition('.')[2]: a for a in registered_adapters()}


def marks(host: str | type[HostAdapter]) -> list:
    """The markers of a test on ``host`` (a class name of ``ADAPTERS`` or an adapter class)."""
    adapter = ADAPTERS[host] if isinstance(host, str) else host
    package = adapter.host_class.partition('.')[0]
    return [OPTIONAL[package]] if package in OPTIONAL else []


def param(host: str | type[HostAdapter], *values, id: str | None = None):
    """``pytest.param(*values)`` (default: the host itself) with ``host``'s markers."""
    return pytest.param(*(values or (host,)), marks=marks(host), id=id)


def params(names=None) -> list:
    """One parameter per host (class names, sorted; default: every registered one), each with its markers."""
    return [param(name) for name in sorted(ADAPTERS if names is None else names)]


def adapter_params() -> list:
    """One parameter per registered adapter class (id: its host's class name), each with its host's markers."""
    return [param(name, adapter, id=name) for name, adapter in sorted(ADAPTERS.items())]
