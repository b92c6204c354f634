"""Adapter for mamba-ssm's ``Mamba2`` (the SSD layer; mamba-ssm is optional: without it this adapter's host does not
load, and ``supported_hosts`` leaves it out). The algorithm, its split into write side, read side and recurrence,
and the kernels it shares with fla's port of the layer: ``adapters/mamba2_common.py``. Here: mamba-ssm's names of
the sizes, its calling convention (``MambaConvention``: ``InferenceParams``, ``seq_idx``), its refusals, its
examples and its own scan for plain forwards.

Kernels (triton backend): a forward without initial states (training, a plain or first forward) runs mamba-ssm's own
``mamba_chunk_scan_combined`` on all segments at once, packed with ``seq_idx`` (the host's kernel: its numerics);
anything that starts from states (cached prefill, chunked prefill) runs our ``chunk_scalar_decay``
(``mom_wrap/kernels/scalar_decay.py``), as mamba-ssm's scan takes one initial state per batch row, not per packed
segment; a decode step (no autograd) runs ``scalar_decay_step``, which updates the state pool's rows in place
(``decode_in_place``).
Measured for plain forwards (``benchmarks/bench_scalar_decay.py``, one H100, bf16, 32 heads x 64, d_state 128,
the 49,152 slots of 8 x 2048 tokens at top-2 + shared, 2026-11-26): forward+backward mamba-ssm's scan with
``seq_idx`` 4.90 ms, ours 5.08 ms; forward alone 1.06 ms and 0.93 ms. The scan also takes dt's softplus, its
limit, dt x and the D skip inside, which ours leaves to PyTorch around it: so mamba-ssm's for plain forwards.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mom_wrap.adapters.mamba2_common import Mamba2Common
from mom_wrap.adapters.registry import register_adapter
from mom_wrap.calls import MambaConvention


@register_adapter
class Mamba2Adapter(Mamba2Common):
    host_class = 'mamba_ssm.modules.mamba2.Mamba2'
    convention = MambaConvention
    dims = dict(d_ssm='d_ssm', H='nheads', P='headdim', G='ngroups', N='d_state', W='d_conv')
    activation_option = 'activation'

    def __init__(self, host: nn.Module):
        if getattr(host, 'process_group', None) is not None:
            raise ValueError("process_group: tensor-parallel Mamba2 is not supported; wrap the layer without one")
        super().__init__(host)

    @property
    def hidden_size(self) -> int:
        return self.host.d_model

    @classmethod
    def example_models(cls):
        """mamba-ssm's MambaLMHeadModel (2 Mamba2 layers, d_model 64), with its RMSNorms and with LayerNorms, and
        with 2 groups; D and the norms' weights redrawn (fixed seed)."""
        def make(rms_norm: bool, **ssm):
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
            config = MambaConfig(d_model=64, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8, rms_norm=rms_norm,
                                 fused_add_norm=False, residual_in_fp32=True,
                                 ssm_cfg=dict(layer='Mamba2', d_state=16, headdim=16, chunk_size=16,
                                              use_mem_eff_path=False, **ssm))
            model = MambaLMHeadModel(config)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for layer in model.backbone.layers:
                    for p in (layer.mixer.D, layer.mixer.norm.weight):
                        p.add_(0.3 * torch.randn(p.shape, generator=g))
            return model.eval()
        return {'default': lambda: make(True), 'layer_norm': lambda: make(False), 'ngroups=2': lambda: make(True, ngroups=2)}

    @classmethod
    def example_host(cls):
        """Mamba2(d_model=64, d_state=16, headdim=16, chunk_size=16), layer 0, without the memory-efficient
        path (it needs the causal-conv1d CUDA package); D and the norm's weight (ones) redrawn (fixed seed)."""
        host = cls.load_host_class()(d_model=64, d_state=16, headdim=16, chunk_size=16, layer_idx=0,
                                     use_mem_eff_path=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (host.D, host.norm.weight):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return host

    def recurrence(self, read, write, dispatch, backend, initial_state=None, output_final_state=False):
        """A plain forward on the triton backend (no initial, no final states): mamba-ssm's scan over every segment,
        packed with ``seq_idx`` (it takes dt's softplus and limit, and D, itself); otherwise ``Mamba2Common``'s.
        Returns [S, H, P]."""
        h = self.host
        if backend != 'triton' or initial_state is not None or output_final_state:
            return super().recurrence(read, write, dispatch, backend, initial_state, output_final_state)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        x, B, C, A, _ = self._slots(read, write, dispatch)
        seq_idx = ((dispatch.position == 0).cumsum(0) - 1).to(torch.int32)  # each slot's segment
        limit = {} if tuple(h.dt_limit) == (0.0, float('inf')) else {'dt_limit': tuple(h.dt_limit)}
        y = mamba_chunk_scan_combined(x[None], write['dt'][None], A, B[None], C[None], h.chunk_size,
                                      D=h.D.view(self.H, self.P) if h.D_has_hdim else h.D, dt_bias=h.dt_bias,
                                      dt_softplus=True, seq_idx=seq_idx[None], **limit)
        return y[0], None
