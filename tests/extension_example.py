"""Adapters of a user's own, as a package outside mom_wrap defines them (tests/test_extension_api.py): a variant of
the GLA adapter, and an adapter whose host's package is not installed."""
from mom_wrap.adapters.gla import GatedLinearAttentionAdapter


class MyGLAAdapter(GatedLinearAttentionAdapter):
    """GLA as the built-in adapter splits it, under another name (what a user's variant would change is beside the
    point here: that it is found, used where named, saved and loaded)."""


class NotInstalledAdapter(GatedLinearAttentionAdapter):
    host_class = 'not_an_installed_package.layers.Attention'
