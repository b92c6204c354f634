"""Adapter for fla's ``Mamba2`` (``fla.layers.mamba2.Mamba2``, the layer of fla's ``Mamba2ForCausalLM``): fla's port
of mamba-ssm's SSD layer, for users of fla's models, who need not have mamba-ssm. The algorithm, its split into write
side, read side and recurrence, and the kernels: ``adapters/mamba2_common.py``, shared with mamba-ssm's layer
(``adapters/mamba2.py``). Here: fla's names of the sizes, fla's calling convention (``attention_mask``, fla's
``Cache``, ``cu_seqlens``), the options fla's layer has that mamba-ssm's has not, the refusals and the examples.
Nothing here imports mamba-ssm: on the triton backend every forward runs our ``chunk_scalar_decay`` (fla 0.6.0 has
no SSD kernel of its own; its layer calls mamba-ssm's where it is installed and on CUDA, else a PyTorch version).

fla's options (0.6.0): ``num_heads`` / ``head_dim`` / ``expand`` (H heads of P = head_dim, d_ssm = expand * hidden),
``state_size`` (N), ``n_groups`` (G), ``conv_kernel`` (W), ``use_conv_bias``, ``use_bias`` (in_proj's and out_proj's
biases), ``D_has_hdim``, ``rmsnorm``, ``norm_before_gate``, ``norm_eps``, ``dt_limit``: all taken as the layer
computes them. ``chunk_size`` and ``backend`` (the conv's CUDA or Triton kernel) choose how fla's layer computes, not
what: the wrapper runs its own kernels. ``conv_init``, ``A_init_range``, ``dt_min`` / ``dt_max`` /
``dt_init_floor``: initialisation only. Refused: ``hidden_act`` other than silu (fla's layer applies it to the conv
output, and without rmsnorm to the gate, in its PyTorch path only: its CUDA path gates with silu whatever it is), and
an in_proj with gated-MLP rows (mamba-ssm's d_mlp: fla's layer never makes one, and would drop its output).

fla's layer itself, where the wrapper differs (README, "Known host limits"): it ignores ``cu_seqlens`` (packed
sequences run as one), and through its cache takes a prompt and then one token per call (a second chunk of several
tokens raises); the wrapper does both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mom_wrap.adapters.fla_common import fla_models
from mom_wrap.adapters.mamba2_common import Mamba2Common
from mom_wrap.adapters.registry import register_adapter


@register_adapter
class FlaMamba2Adapter(Mamba2Common):
    host_class = 'fla.layers.mamba2.Mamba2'
    dims = dict(d_ssm='intermediate_size', H='num_heads', P='head_dim', G='n_groups', N='ssm_state_size',
                W='conv_kernel_size')
    activation_option = 'hidden_act'

    def __init__(self, host: nn.Module):
        super().__init__(host)
        if self.d_mlp != 0:
            raise ValueError(f"in_proj: fla's Mamba2 projects to [z | x | B | C | dt] "
                             f"({2 * self.d_ssm + 2 * self.G * self.N + self.H} rows), got "
                             f"{2 * self.d_mlp} rows more (gated-MLP rows: fla's layer drops them)")

    @classmethod
    def example_host(cls):
        """Mamba2(hidden_size=64, head_dim=16, state_size=16, chunk_size=16): 8 heads, 1 group, layer 0; D and the
        norm's weight (ones) redrawn (fixed seed)."""
        host = cls.load_host_class()(hidden_size=64, head_dim=16, state_size=16, chunk_size=16, layer_idx=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (host.D, host.norm.weight):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return host

    @classmethod
    def example_models(cls):
        """fla's Mamba2ForCausalLM (2 layers, hidden 64, 8 heads of 16, state 16) as its config sets the layers: the
        defaults; D per channel; no rmsnorm (the silu gate) with in_proj / out_proj biases and no conv bias; the norm
        before the gate with the config's norm_eps (the layers' too) and a dt limit. Not n_groups > 1: there fla's
        layer on the CPU computes otherwise than on CUDA and than its own decode steps (README, "Known host limits");
        tests/test_host_fla_mamba2.py checks it against the layer's decode steps."""
        return fla_models('Mamba2', {
            'default': {},
            'D_has_hdim': dict(D_has_hdim=True),
            'no_rmsnorm,bias': dict(rmsnorm=False, use_bias=True, use_conv_bias=False),
            'norm_before,dt': dict(norm_before_gate=True, norm_eps=1e-2, dt_limit=(0.01, 0.05)),
        }, head_dim=16, state_size=16, chunk_size=16)
