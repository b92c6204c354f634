"""The cached forward of ``MixtureOfMemories``: which states a forward starts from (checked against the
layer, refused when they belong to another one), and the read side and memories run from those states, whose
new values go back into the cache's pools in place. The layer's own forward calls these; mamba-ssm's
``allocate_inference_cache`` goes through ``state_spec``.
"""
from __future__ import annotations

import torch

from mom_wrap.cache import StateSpec, clone_state
from mom_wrap.layout import TokenLayout
from mom_wrap.pool import PoolRows


def state_spec(mom, num_sequences: int) -> StateSpec:
    """What ``mom``'s cached states for ``num_sequences`` sequences look like (``mom_wrap.cache``)."""
    return StateSpec(num_sequences, mom.num_memories, mom.shared_memory, type(mom._adapter).__name__,
                     tuple(mom._adapter.state_shape()), dict(mom._adapter.read_conv_shapes()),
                     dict(mom.memories.conv_shapes()))


def start_state(mom, store, layout: TokenLayout, x: torch.Tensor) -> dict | None:
    """The states this forward starts from and (when the store writes) updates: the stored ones, zeros for a
    store that holds none, a copy of the stored ones when it does not write (they must not change), None
    without a store or without anything to start from (the plain forward). Stored states of another layer
    configuration, number of memories or batch size are refused (``StateSpec.check``), and so is a store
    without states for an input whose attention_mask covers earlier tokens (they would be lost)."""
    if store is None:
        return None
    spec = state_spec(mom, layout.num_sequences)
    state = store.stored(mom.layer_idx, spec)
    if state is not None:
        if state['recurrent'].device != x.device:
            raise ValueError(f"{store.argument}: the states of layer {mom.layer_idx} are on "
                             f"{state['recurrent'].device}, the input on {x.device}")
        return state if store.writes else clone_state(state)
    if layout.has_history:
        raise ValueError(f"attention_mask: covers {layout.history_len} earlier tokens, but {store.argument} "
                         f"holds no state for layer {mom.layer_idx}: their states are missing (pass the "
                         "cache the earlier tokens were run with, or a mask of this input's width)")
    if not store.writes:
        return None
    return spec.empty(x.device, x.dtype)


def memories_cached(mom, x, layout, dispatch, backend, state, host_inputs):
    """Read side and memories starting from the cached states, whose new values go back into ``state``
    (see ``mom_wrap.pool``: in place without autograd). Returns (read-side tensors, write-side tensors,
    per-slot outputs)."""
    decode = dispatch.token_major
    read_rows = {n: PoolRows(c, valid=layout.valid if decode else None) for n, c in state['read_conv'].items()}
    read = {**mom._adapter.read(x, layout, backend, read_rows), **host_inputs}
    # each segment's row in the pools flattened over (sequence, memory); a padding token's segments stay
    index = dispatch.segment_sequence * mom.num_slots_memories + dispatch.segment_memory
    write_rows = {n: PoolRows(c, index, dispatch.segment_valid, lead=2, backend=backend)
                  for n, c in state['write_conv'].items()}
    write = mom.memories({'x': x, **read}, dispatch, backend, write_rows)
    h = PoolRows(state['recurrent'], index, dispatch.segment_valid, lead=2, backend=backend)
    o = None
    if decode and backend == 'triton' and not torch.is_grad_enabled():  # rows updated in the pool itself
        o = mom._adapter.decode_in_place(read, write, dispatch, h)
    if o is None:
        o, h_new = mom._adapter.recurrence(read, write, dispatch, backend, initial_state=h.read(),
                                           output_final_state=True)
        h.write(h_new)
    state.update(recurrent=h.pool, read_conv={n: r.pool for n, r in read_rows.items()},
                 write_conv={n: r.pool for n, r in write_rows.items()})
    return read, write, o
