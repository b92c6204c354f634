"""A MoM layer's entry in fla's ``Cache``, and the host's rules for when it is read and written.

The entry sits at the host's ``layer_idx``, batch-first so that the cache's own reorder / repeat / select
operations (beam search) apply unchanged:

* ``recurrent_state`` ``[N, E, *state]``: every sequence x memory (shared memory last), host layout;
* ``conv_state`` ``{'read': name -> [N, D, W] (host conv-cache layout), 'write': name -> [N, E, D, W]}``.

The rules follow fla's layers (``get_layer_cache`` / ``update_layer_cache``):

* a cache passed in is read whatever ``use_cache`` says: stored states are where the forward starts;
* with ``use_cache=True`` the new states are stored; with ``use_cache=False`` the stored states stay as they
  were, and the cache still counts the forward's tokens (fla's layer also drops its stored conv states
  there, leaving a recurrent state without its conv context; we keep ours, so a later call continues
  from a consistent state);
* with ``use_cache=True`` and no cache, the forward runs as without one and returns ``None``.
"""
from __future__ import annotations

import torch


def stored_state(past_key_values, layer_idx: int | None) -> dict | None:
    """The layer's stored states as {'recurrent', 'read_conv', 'write_conv'}, or None if none are stored."""
    if past_key_values is None:
        return None
    if layer_idx is None:
        raise ValueError("host: caching needs the host layer's layer_idx")
    entry = past_key_values[layer_idx] if len(past_key_values) > layer_idx else None
    if entry is None or entry.get('recurrent_state') is None:
        return None
    conv = entry['conv_state']
    return {'recurrent': entry['recurrent_state'], 'read_conv': conv['read'], 'write_conv': conv['write']}


def check_state(state: dict, num_sequences: int, num_memories: int) -> None:
    pool = state['recurrent']
    if pool.shape[0] != num_sequences or pool.shape[1] != num_memories:
        raise ValueError(f"past_key_values: cached state holds {pool.shape[0]} sequences x {pool.shape[1]} "
                         f"memories, this input has {num_sequences} x {num_memories}")


def clone_state(state: dict) -> dict:
    """A copy to run a forward from without touching the stored states (``use_cache=False``)."""
    return {'recurrent': state['recurrent'].clone(),
            'read_conv': {n: t.clone() for n, t in state['read_conv'].items()},
            'write_conv': {n: t.clone() for n, t in state['write_conv'].items()}}


def empty_state(num_sequences: int, num_memories: int, state_shape: tuple[int, ...],
                read_conv_shapes: dict[str, tuple[int, int]], write_conv_shapes: dict[str, tuple[int, int]],
                x: torch.Tensor) -> dict:
    """Zero states for a cache that holds none yet; recurrent states in at least fp32."""
    N, E, dev = num_sequences, num_memories, x.device
    return {
        'recurrent': torch.zeros(N, E, *state_shape, device=dev, dtype=torch.promote_types(x.dtype, torch.float32)),
        'read_conv': {n: torch.zeros(N, d, w, device=dev, dtype=x.dtype) for n, (d, w) in read_conv_shapes.items()},
        'write_conv': {n: torch.zeros(N, E, d, w, device=dev, dtype=x.dtype)
                       for n, (d, w) in write_conv_shapes.items()},
    }


def store(past_key_values, layer_idx: int, state: dict | None, num_tokens: int) -> None:
    """Store ``state`` (None: keep what is stored) and count ``num_tokens`` more seen tokens."""
    if state is None:
        past_key_values.update(layer_idx=layer_idx, offset=num_tokens)
        return
    past_key_values.update(recurrent_state=state['recurrent'],
                           conv_state={'read': state['read_conv'], 'write': state['write_conv']},
                           layer_idx=layer_idx, offset=num_tokens)
