"""How each host family is called: its forward's arguments in, its return value out, and its cache.

A wrapped layer takes and returns what its host does:

* fla's layers: ``forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
  output_attentions=False, cu_seqlens=None, **host's own)`` -> ``(o, None, past_key_values, *host's own)``;
* mamba-ssm's: ``forward(u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None)`` -> ``o``;
  its Mamba3: ``forward(u, seq_idx=None, cu_seqlens=None, inference_params=None)`` -> ``o`` (no ``seqlen``).

Each convention parses a call into a :class:`Call`, the wrapper's terms; an adapter names its host's
convention (``HostAdapter.convention``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mom_wrap.cache import FlaCache, InferenceParamsCache, StateStore


def check_hidden_states(hidden_states: torch.Tensor, argument: str, hidden_size: int, dtype: torch.dtype) -> None:
    """The input's shape [batch, seq_len, hidden_size] and dtype (floating; the layer weights' ``dtype`` unless
    autocast runs: a mismatch would otherwise fail inside a matmul or a Triton kernel, without the argument's
    name). ``argument``: the name the host's forward gives it."""
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"{argument}: expected shape [batch, seq_len, {hidden_size}] (the host's "
                         f"hidden size), got {tuple(hidden_states.shape)}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got {hidden_states.dtype}")
    if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
        raise TypeError(f"{argument}: dtype {hidden_states.dtype} differs from the layer's weights "
                        f"({dtype}); convert one to the other, or run under torch.autocast")


@dataclass
class Call:
    """One forward's arguments, in the wrapper's terms."""

    hidden_states: torch.Tensor            # [B, T, hidden]
    attention_mask: torch.Tensor | None    # [B, >=T] 0/1 left padding
    cu_seqlens: torch.Tensor | None        # [N+1] packed sequences (B = 1)
    store: StateStore | None               # where states come from and go to
    returns: Callable[[torch.Tensor, tuple], Any]  # (o [B, T, hidden], host's extra outputs) -> the return value
    host_kwargs: dict = field(default_factory=dict)  # the host's own arguments (``HostAdapter.host_inputs``)
    argument: str = 'hidden_states'        # the input's name in the host's forward, for error messages


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


class FlaConvention:
    """fla's layers: ``(o, None, past_key_values, *extras)``; the cache is fla's ``Cache``.

    Besides ``parse``, each convention tells the checks (``mom_wrap.testing``) how to call its hosts:
    ``outputs`` (a return value -> [output, *extras]), ``new_cache``, ``call_cached`` (one cached forward,
    the cache advanced), ``packed_kwargs`` (the arguments of packed sequences) and ``padding_mask``."""

    padding_mask = True

    @staticmethod
    def outputs(result) -> list[torch.Tensor]:
        return [result[0], *result[3:]]

    @staticmethod
    def new_cache(batch_size: int, max_seqlen: int):
        from fla.models.utils import Cache
        return Cache()

    @staticmethod
    def call_cached(layer, x, cache, attention_mask=None, **kwargs) -> torch.Tensor:
        return layer(x, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **kwargs)[0]

    @staticmethod
    def packed_kwargs(cu_seqlens: torch.Tensor) -> dict:
        return {'cu_seqlens': cu_seqlens}

    @staticmethod
    def parse(hidden_states, attention_mask=None, past_key_values=None, use_cache=False, output_attentions=False,
              cu_seqlens=None, **kwargs) -> Call:
        store = None if past_key_values is None else FlaCache(past_key_values, bool(use_cache))
        return Call(_tensor('hidden_states', hidden_states), attention_mask, cu_seqlens, store,
                    lambda o, extras: (o, None, past_key_values, *extras), kwargs)


class MambaConvention:
    """mamba-ssm's layers: the output tensor, shaped as the input; the cache is mamba-ssm's ``InferenceParams``.

    ``seqlen``: the input is ``[B * seqlen, hidden]``. ``seq_idx`` ``[B, T]`` (sequence of each token, packed
    sequences per row) becomes ``cu_seqlens`` over the flattened rows, which costs one host sync to find the
    boundaries: pass ``cu_seqlens`` (batch 1) as well to avoid it.
    """

    padding_mask = False

    @staticmethod
    def outputs(result) -> list[torch.Tensor]:
        return [result]

    @staticmethod
    def new_cache(batch_size: int, max_seqlen: int):
        from mamba_ssm.utils.generation import InferenceParams
        return InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)

    @staticmethod
    def call_cached(layer, x, cache, **kwargs) -> torch.Tensor:
        o = layer(x, inference_params=cache, **kwargs)
        cache.seqlen_offset += x.shape[1]
        return o

    @staticmethod
    def packed_kwargs(cu_seqlens: torch.Tensor) -> dict:
        """mamba-ssm packs sequences with seq_idx [1, T] (cu_seqlens serves its cache only)."""
        lengths = cu_seqlens.diff()
        return {'seq_idx': torch.arange(lengths.numel(), device=cu_seqlens.device,
                                        dtype=torch.int32).repeat_interleave(lengths)[None]}

    @staticmethod
    def parse(u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None) -> Call:
        u = _tensor('u', u)
        shape = u.shape
        if seqlen is not None:
            if isinstance(seqlen, bool) or not isinstance(seqlen, int):
                raise TypeError(f"seqlen: expected an int, got {type(seqlen).__name__}")
            if seqlen < 1:
                raise ValueError(f"seqlen: must be >= 1, got {seqlen}")
            if u.dim() != 2 or u.shape[0] % seqlen:
                raise ValueError(f"u: with seqlen={seqlen} expected shape [batch * seqlen, hidden], got "
                                 f"{tuple(u.shape)}")
            u = u.view(-1, seqlen, u.shape[-1])
        if seq_idx is not None and cu_seqlens is None and u.dim() == 3:  # (any other u: the wrapper names it)
            seq_idx = _tensor('seq_idx', seq_idx)
            if seq_idx.shape != u.shape[:2]:
                raise ValueError(f"seq_idx: expected shape {list(u.shape[:2])}, got {list(seq_idx.shape)}")
            if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
                raise TypeError(f"seq_idx: expected an integer tensor, got {seq_idx.dtype}")
            if seq_idx.numel():  # (empty input: nothing to pack)
                B, T = seq_idx.shape
                starts = torch.ones(B, T, dtype=torch.bool, device=seq_idx.device)
                starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
                cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(),
                                        torch.full((1,), B * T, device=seq_idx.device)])
                u = u.reshape(1, B * T, u.shape[-1])
        store = None if inference_params is None else InferenceParamsCache(inference_params)
        return Call(u, None, cu_seqlens, store, lambda o, extras: o.reshape(shape), argument='u')


class Mamba3Convention(MambaConvention):
    """mamba-ssm's Mamba3: as its other layers, but ``forward(u, seq_idx=None, cu_seqlens=None,
    inference_params=None)``: no ``seqlen``, so ``seq_idx`` is the second positional argument. The layer packs
    sequences with ``cu_seqlens`` (batch 1), which its kernel takes; it takes ``seq_idx`` and ignores it (mamba-ssm
    2.3.2), where the wrapper packs by it as for Mamba2."""

    @staticmethod
    def packed_kwargs(cu_seqlens: torch.Tensor) -> dict:
        return {'cu_seqlens': cu_seqlens}

    @staticmethod
    def parse(u, seq_idx=None, cu_seqlens=None, inference_params=None) -> Call:
        return MambaConvention.parse(u, None, seq_idx, cu_seqlens, inference_params)
