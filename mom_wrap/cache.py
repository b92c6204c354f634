"""Where a MoM layer's states live between calls: one small interface (:class:`StateStore`), one
implementation per host family's cache, so that the wrapper knows neither.

A layer's states are one dict, batch-first so that a cache's own batch operations (beam search's reorder /
repeat / select) apply unchanged:

* ``recurrent`` ``[N, E, *state]``: every sequence x memory (shared memory last), the host's state layout;
* ``read_conv`` ``{name: [N, D, W]}`` and ``write_conv`` ``{name: [N, E, D, W]}``: the short convs' states.

:class:`FlaCache` keeps it in fla's ``Cache`` (``recurrent_state`` and ``conv_state`` of the entry at the
host's ``layer_idx``), with fla's layers' rules (``get_layer_cache`` / ``update_layer_cache``):

* a cache passed in is read whatever ``use_cache`` says: stored states are where the forward starts;
* with ``use_cache=True`` the new states are stored; with ``use_cache=False`` the stored states stay as they
  were, and the cache still counts the forward's tokens (fla's layer also drops its stored conv states
  there, leaving a recurrent state without its conv context; we keep ours, so a later call continues
  from a consistent state);
* with ``use_cache=True`` and no cache, the forward runs as without one and returns ``None``.

:class:`InferenceParamsCache` keeps it in mamba-ssm's ``InferenceParams.key_value_memory_dict[layer_idx]``,
with mamba-ssm's rules: ``seqlen_offset == 0`` starts a new prompt from zero states, a later call continues
from the stored ones (a one-token decode step, or, beyond mamba-ssm, a chunk of several tokens); every call
stores; the caller advances ``seqlen_offset``.
"""
from __future__ import annotations

import torch


class StateStore:
    """The states one forward starts from and, when ``writes``, leaves behind."""

    writes: bool = False  # whether this forward's final states are kept
    argument: str = 'cache'  # the forward argument it came from, for error messages

    def stored(self, layer_idx: int | None) -> dict | None:
        """The layer's stored states to start from, or None (none stored, or a fresh start)."""
        raise NotImplementedError

    def store(self, layer_idx: int | None, state: dict | None, num_tokens: int) -> None:
        """After the forward: keep ``state`` (None when not ``writes``), ``num_tokens`` tokens later."""
        raise NotImplementedError


def _require_layer_idx(layer_idx: int | None) -> int:
    if layer_idx is None:
        raise ValueError("host: caching needs the host layer's layer_idx")
    return layer_idx


class FlaCache(StateStore):
    """fla's ``Cache`` (``past_key_values``), written when ``use_cache``."""

    argument = 'past_key_values'

    def __init__(self, cache, use_cache: bool):
        self.cache = cache
        self.writes = bool(use_cache)

    def stored(self, layer_idx):
        layer_idx = _require_layer_idx(layer_idx)
        entry = self.cache[layer_idx] if len(self.cache) > layer_idx else None
        if entry is None or entry.get('recurrent_state') is None:
            return None
        conv = entry['conv_state']
        return {'recurrent': entry['recurrent_state'], 'read_conv': conv['read'], 'write_conv': conv['write']}

    def store(self, layer_idx, state, num_tokens):
        if state is None:
            self.cache.update(layer_idx=layer_idx, offset=num_tokens)
            return
        self.cache.update(recurrent_state=state['recurrent'],
                          conv_state={'read': state['read_conv'], 'write': state['write_conv']},
                          layer_idx=layer_idx, offset=num_tokens)


class InferenceParamsCache(StateStore):
    """mamba-ssm's ``InferenceParams``: the state dict itself in ``key_value_memory_dict[layer_idx]``."""

    writes = True
    argument = 'inference_params'

    def __init__(self, inference_params):
        self.params = inference_params

    def stored(self, layer_idx):
        state = self.params.key_value_memory_dict.get(_require_layer_idx(layer_idx))
        if state is None or not isinstance(state, dict):
            return None
        if self.params.seqlen_offset == 0:  # a new prompt: zero states, in place (a CUDA graph may read them)
            for t in (state['recurrent'], *state['read_conv'].values(), *state['write_conv'].values()):
                t.zero_()
        return state

    def store(self, layer_idx, state, num_tokens):
        self.params.key_value_memory_dict[layer_idx] = state


def check_state(state: dict, num_sequences: int, num_memories: int, argument: str = 'cache') -> None:
    pool = state['recurrent']
    if pool.shape[0] != num_sequences or pool.shape[1] != num_memories:
        raise ValueError(f"{argument}: the stored state holds {pool.shape[0]} sequences x {pool.shape[1]} "
                         f"memories, this input has {num_sequences} x {num_memories}")


def clone_state(state: dict) -> dict:
    """A copy to run a forward from without touching the stored states (``use_cache=False``)."""
    return {'recurrent': state['recurrent'].clone(),
            'read_conv': {n: t.clone() for n, t in state['read_conv'].items()},
            'write_conv': {n: t.clone() for n, t in state['write_conv'].items()}}


def empty_state(num_sequences: int, num_memories: int, state_shape: tuple[int, ...],
                read_conv_shapes: dict[str, tuple[int, int]], write_conv_shapes: dict[str, tuple[int, int]],
                device: torch.device, dtype: torch.dtype) -> dict:
    """Zero states; recurrent states in at least fp32, conv states in ``dtype``."""
    N, E = num_sequences, num_memories
    return {
        'recurrent': torch.zeros(N, E, *state_shape, device=device, dtype=torch.promote_types(dtype, torch.float32)),
        'read_conv': {n: torch.zeros(N, d, w, device=device, dtype=dtype) for n, (d, w) in read_conv_shapes.items()},
        'write_conv': {n: torch.zeros(N, E, d, w, device=device, dtype=dtype)
                       for n, (d, w) in write_conv_shapes.items()},
    }
