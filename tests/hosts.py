"""The host layers the tests run on, as pytest parameters: every registered adapter, installed or not, marked with
the optional package its host needs (``mamba_ssm`` for mamba-ssm's Mamba2 and Mamba3, and for fla's Mamba3, whose
kernels are mamba-ssm's), which tests/conftest.py skips where that package is missing. A test over hosts takes its parameters from here, so that no test needs a rule of its own
for an optional host (README's quick start runs without mamba-ssm; `python -m pytest -m mamba_ssm` runs them).
"""
from __future__ import annotations

import pytest
import torch

from mom_wrap.adapters import HostAdapter, host_names

# the top-level package of a host's class -> the marker of the tests that need it (only optional packages)
OPTIONAL = {'mamba_ssm': pytest.mark.mamba_ssm}
# hosts of another package whose kernels are mamba-ssm's (fla's Mamba3 layer calls them): marked as mamba-ssm's are
KERNELS_FROM = {'fla.layers.mamba3.Mamba3': 'mamba_ssm'}

# the host's short name (its class name; fla.Mamba2 beside mamba-ssm's Mamba2) -> its adapter, for every registered
# adapter (also those whose package is missing)
ADAPTERS: dict[str, type[HostAdapter]] = host_names()


def marks(host: str | type[HostAdapter], host_forward: bool = False) -> list:
    """The markers of a test on ``host`` (a class name of ``ADAPTERS`` or an adapter class); ``host_forward``: the
    test runs the real host layer (``gpu`` too where its forward refuses the CPU: ``host_forward_runs_on``)."""
    adapter = ADAPTERS[host] if isinstance(host, str) else host
    package = KERNELS_FROM.get(adapter.host_class, adapter.host_class.partition('.')[0])
    gpu = [pytest.mark.gpu] if host_forward and not adapter.host_forward_runs_on(torch.device('cpu')) else []
    return ([OPTIONAL[package]] if package in OPTIONAL else []) + gpu


def param(host: str | type[HostAdapter], *values, id: str | None = None, host_forward: bool = False):
    """``pytest.param(*values)`` (default: the host itself) with ``host``'s markers."""
    return pytest.param(*(values or (host,)), marks=marks(host, host_forward), id=id)


def params(names=None, host_forward: bool = False) -> list:
    """One parameter per host (class names, sorted; default: every registered one), each with its markers
    (``host_forward``: for a test that runs the real host layer)."""
    return [param(name, host_forward=host_forward) for name in sorted(ADAPTERS if names is None else names)]


def adapter_params() -> list:
    """One parameter per registered adapter class (id: its host's class name), each with its host's markers."""
    return [param(name, adapter, id=name) for name, adapter in sorted(ADAPTERS.items())]


# Host options beyond each example host's that the shared checks (tests/test_every_host.py) run on as well: host ->
# variant -> the host's constructor arguments (a small layer of hidden size 64, as the examples are). GLA's and GSA's
# examples have no short convs: every variant of theirs does (their states are cached with the recurrent ones); so
# do the SHORT_CONV variants of HGRN2 and RetNet.
_GLA = dict(hidden_size=64, expand_k=0.5, expand_v=1.0, num_heads=2, layer_idx=0, use_short_conv=True, conv_bias=True)
_GSA = dict(hidden_size=64, expand_k=0.5, num_heads=2, num_slots=8, layer_idx=0, use_short_conv=True, conv_bias=True)
_HG2 = dict(hidden_size=64, expand_ratio=32, layer_idx=1, use_short_conv=True, conv_bias=True)
_LA = dict(hidden_size=64, num_heads=2, layer_idx=0)
_DN = dict(hidden_size=64, expand_k=1.0, expand_v=0.5, num_heads=2, layer_idx=0)  # K = 32, V = 16
_RN = dict(hidden_size=64, num_heads=2, layer_idx=0)  # K = 32, V = 64 (the layer's expand_v=2)
_GDN = dict(hidden_size=64, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)
_KDA = dict(hidden_size=64, head_dim=16, num_heads=2, expand_v=2, layer_idx=0)  # K = 16, V = 32, short convs
_FM2 = dict(hidden_size=64, head_dim=16, state_size=16, chunk_size=16, layer_idx=0)  # fla's Mamba2: 8 heads of 16
_M3 = dict(d_model=64, d_state=16, headdim=16, chunk_size=16, layer_idx=0)  # mamba-ssm's Mamba3: 8 heads of 16
_FM3 = dict(hidden_size=64, state_size=16, head_dim=16, chunk_size=16, layer_idx=0)  # fla's Mamba3
VARIANTS: dict[str, dict[str, dict]] = {
    'Mamba3': {  # B and C in 2 groups with the per-head output norm; every pair of the state rotated, a wider state
        'ngroups2_outproj_norm': dict(_M3, ngroups=2, is_outproj_norm=True),
        'full_rope_state32': dict(_M3, rope_fraction=1.0, d_state=32),
    },
    'fla.Mamba3': {'bias_norm_eps': dict(_FM3, use_bias=True, norm_eps=1e-2)},
    'DeltaNet': {
        'no_beta_sum_relu_gate': dict(_DN, use_beta=False, qk_norm='sum', qk_activation='relu', use_gate=True),
        'neg_eigval_elu_conv_bias': dict(_DN, allow_neg_eigval=True, qk_activation='elu', conv_bias=True),
        'no_conv_identity': dict(_DN, use_short_conv=False, qk_activation='identity', use_gate=True),
        'no_conv_silu_sum_neg': dict(_DN, use_short_conv=False, qk_norm='sum', allow_neg_eigval=True, use_beta=False),
    },
    'GatedDeltaNet': {
        'num_v_heads': dict(_GDN, num_v_heads=4), 'no_gate': dict(_GDN, use_gate=False),
        'neg_eigval': dict(_GDN, allow_neg_eigval=True), 'conv_bias': dict(_GDN, conv_bias=True),
        'no_short_conv': dict(_GDN, use_short_conv=False),
    },
    'KimiDeltaAttention': {  # the gate's two forms (lower_bound), grouped value heads, each kernel rule
        'gva': dict(_KDA, num_v_heads=4, expand_v=1),
        'no_short_conv_neg_eigval': dict(_KDA, use_short_conv=False, allow_neg_eigval=True),
        'lower_bound_conv_bias': dict(_KDA, lower_bound=-2.0, conv_bias=True, norm_eps=1e-2),
        'safe_gate_fused_recurrent': dict(_KDA, safe_gate=True, lower_bound=-5.0, mode='fused_recurrent', conv_size=2),
    },
    'GatedLinearAttention': {
        'short_conv': _GLA,
        'kv_heads': dict(_GLA, num_heads=4, num_kv_heads=2, expand_v=2.0),
        'feature_map_clamp': dict(_GLA, feature_map='relu', clamp_min=-0.09, gate_logit_normalizer=8,
                                  gate_low_rank_dim=8),
        'unfused_gate_fn': dict(_GLA, fuse_norm=False, gate_fn='sigmoid', feature_map='swish'),
        'no_output_gate': dict(_GLA, use_output_gate=False, elementwise_affine=False, norm_eps=1e-3),
    },
    'GatedSlotAttention': {
        'short_conv': _GSA,
        'kv_heads': dict(_GSA, num_heads=4, num_kv_heads=2),
        'relu_scale': dict(_GSA, feature_map='relu', scale=None, gate_logit_normalizer=4, num_slots=5),
        't2r': dict(_GSA, feature_map='t2r'),
        'kv_heads_conv_t2r': dict(_GSA, expand_k=1.0, num_heads=4, num_kv_heads=2, num_slots=16, feature_map='t2r'),
        'norm_options': dict(_GSA, expand_v=2.0, elementwise_affine=False, norm_eps=1e-1, use_output_gate=True,
                             use_norm=False),
    },
    'MultiScaleRetention': {  # the read-side pools: q conv (short_conv) beside each sequence's rotary position count
        'short_conv': dict(_RN, use_short_conv=True, conv_bias=True, expand_v=1.0),
        'kv_heads_relu': dict(_RN, num_heads=4, num_kv_heads=2, feature_map='relu', expand_v=1.0),
        'unfused_sigmoid': dict(_RN, fuse_norm=False, gate_fn='sigmoid', feature_map='swish', expand_k=0.5),
        'no_output_gate': dict(_RN, use_output_gate=False, elementwise_affine=False, norm_eps=1e-3),
    },
    'fla.Mamba2': {  # its example's options but one each (B, C in 2 groups: 4 heads each; D per channel)
        'n_groups_D_has_hdim': dict(_FM2, n_groups=2, D_has_hdim=True),
        'no_rmsnorm_use_bias': dict(_FM2, rmsnorm=False, use_bias=True, use_conv_bias=False),
        'norm_before_gate_dt_limit_conv2': dict(_FM2, norm_before_gate=True, dt_limit=(0.01, 0.05), conv_kernel=2,
                                                norm_eps=1e-2),
    },
    'HGRN2Attention': {  # forget_dim = hidden: the example's per-token lower_bound (example_inputs) fits them all
        'short_conv': _HG2,
        'heads4_layer0': dict(_HG2, expand_ratio=16, layer_idx=0),  # layer 0 ignores the lower bound
        'num_heads_no_affine': dict(_HG2, use_short_conv=False, expand_ratio=None, num_heads=4,
                                    elementwise_affine=False, norm_eps=1e-1),
        'one_head_fused_recurrent': dict(_HG2, expand_ratio=64, mode='fused_recurrent', conv_size=2),
    },
    'LinearAttention': {  # normalised: positive feature maps (a signed map's denominators can come near zero)
        'hedgehog_norm': dict(_LA, feature_map='hedgehog', do_feature_map_norm=True),
        'kv_heads_t2r_tied': dict(_LA, num_heads=4, num_kv_heads=2, expand_v=2.0, feature_map='t2r',
                                  tie_feature_map_qk=True, norm_q=True, norm_k=True),
        'dpfp_identity': dict(_LA, feature_map='dpfp', expand_k=0.5, output_norm='identity'),
        'elu_norm': dict(_LA, feature_map='elu', do_feature_map_norm=True, norm_k=True, elementwise_affine=False,
                         norm_eps=1e-3),
    },
}

# The variants that give short convs to a host whose example has none: the checks of cached states run on them too.
SHORT_CONV = ('GatedLinearAttention/short_conv', 'GatedSlotAttention/short_conv', 'HGRN2Attention/short_conv',
              'MultiScaleRetention/short_conv')
# More variants of the GPU check beyond 64 tokens (tests/test_every_host.py): chunk_gsa with grouped key-value heads
# (K = 16: fla's chunk kernels' dots need every dimension >= 16 on a GPU; at K = 8 Triton refused to compile)
GPU_MORE = ('GatedSlotAttention/kv_heads_conv_t2r',)


def make(host: str, variant: str | None = None):
    """A fresh host layer: ``host``'s example (its adapter's ``example_host``), or its ``VARIANTS`` entry with the
    parameters the host initialises to one constant (norm weights of ones, zero biases) redrawn around it (fixed
    seed), as the examples have theirs: at a constant, checks could not see them."""
    adapter = ADAPTERS[host]
    if variant is None:
        return adapter.example_host()
    layer = adapter.load_host_class()(**VARIANTS[host][variant])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.numel() > 1 and torch.all(p == p.flatten()[0]):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return layer


def case_params(*variants: str, examples: bool = True, padding_mask: bool = False, values=(), tag: str = '') -> list:
    """The shared checks' cases, each one parameter ``(host, variant, *values)`` with the host's markers: every
    registered host's example (variant None, id: the host; ``examples=False``: none), then the named variants
    ('Host/variant', or every one of ``VARIANTS`` for '*'); ``tag``: appended to each id. ``padding_mask``: only hosts
    whose forward takes one (``adapter.convention``)."""
    if variants == ('*',):
        variants = tuple(f'{h}/{v}' for h, vs in sorted(VARIANTS.items()) for v in vs)
    cases = [(name, None) for name in sorted(ADAPTERS) if examples] + [tuple(v.split('/')) for v in variants]
    return [param(h, h, v, *values, id=(h if v is None else f'{h}/{v}') + tag) for h, v in cases
            if not padding_mask or ADAPTERS[h].convention.padding_mask]
