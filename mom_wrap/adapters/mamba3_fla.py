"""Adapter for fla's ``Mamba3`` (``fla.layers.mamba3.Mamba3``, the layer of fla's ``Mamba3ForCausalLM``): fla's port of
mamba-ssm's Mamba3 (SISO), with fla's calling convention (``attention_mask``, fla's ``Cache``, ``cu_seqlens``). The
algorithm, its split and its kernels: ``adapters/mamba3.py`` (``Mamba3Common``), shared with mamba-ssm's layer. fla's
layer runs mamba-ssm's kernels (``mamba3_siso_combined``), so the triton backend needs mamba-ssm as the host does;
the torch backend does not.

fla's options (0.6.0) beyond mamba-ssm's: ``use_bias`` (in_proj's and out_proj's biases: each row's bias goes with it
to the write or the read side) and ``norm_eps`` (the B, C and output norms'). Refused as for mamba-ssm's: ``is_mimo``.

fla's layer itself, where the wrapper differs (README, "Known host limits"): its ``forward`` refuses any device but
CUDA (``NotImplementedError``; its ``cuda_kernels_forward`` runs on the CPU under the interpreter, and is the CPU
oracle in tests/test_host_mamba3.py), and through its cache takes a prompt and then one token per call, decoded with
mamba-ssm's CuTe step; the wrapper does both with the chunked kernel.
"""
from __future__ import annotations

import torch

from mom_wrap.adapters.fla_common import fla_models
from mom_wrap.adapters.mamba3 import Mamba3Common
from mom_wrap.adapters.registry import register_adapter


@register_adapter
class FlaMamba3Adapter(Mamba3Common):
    host_class = 'fla.layers.mamba3.Mamba3'
    dims = dict(H='num_heads', P='head_dim', N='ssm_state_size', G='n_groups', d_inner='intermediate_size',
                hidden='hidden_size')

    @classmethod
    def host_forward_runs_on(cls, device: torch.device) -> bool:
        return device.type == 'cuda'  # fla's forward raises NotImplementedError elsewhere

    @classmethod
    def example_host(cls):
        """Mamba3(hidden_size=64, state_size=16, head_dim=16, chunk_size=16), layer 0: 8 heads, 4 rotary angles; its
        constant parameters redrawn (``redrawn``)."""
        return cls.redrawn(cls.load_host_class()(hidden_size=64, state_size=16, head_dim=16, chunk_size=16,
                                                 layer_idx=0))

    @classmethod
    def example_models(cls):
        """fla's Mamba3ForCausalLM (2 layers, hidden 64, 8 heads of 16, state 16) as its config sets the layers: the
        defaults; biases and the config's norm_eps; 2 groups with the output norm and full rotary angles."""
        return fla_models('Mamba3', {
            'default': {},
            'use_bias,norm_eps': dict(use_bias=True, norm_eps=1e-2),
            'n_groups=2,outproj_norm,rope=1': dict(n_groups=2, is_outproj_norm=True, rope_fraction=1.0),
        }, head_dim=16, state_size=16, chunk_size=16)
