"""Where a MoM layer's states live between calls: one small interface (:class:`StateStore`), one
implementation per host family's cache, so that the wrapper knows neither.

A layer's states are one dict, batch-first so that a cache's own batch operations (beam search's reorder /
repeat / select) apply unchanged:

* ``recurrent`` ``[N, E, *state]``: every sequence x memory (shared memory last), the host's state layout;
* ``read_conv`` ``{name: [N, D, W]}`` and ``write_conv`` ``{name: [N, E, D, W]}``: the short convs' states;
* ``mom``: which layer made them (``StateSpec.tag``: adapter, routed memories, shared memory).

Stored states are checked before a forward reads them (``StateSpec.check``): states of another layer
configuration, number of memories or batch size, or a host layer's own cache entry, are a ``ValueError``
naming the argument, never read as this layer's.

:class:`FlaCache` keeps it in fla's ``Cache`` (``recurrent_state`` and ``conv_state`` of the entry at the
host's ``layer_idx``), with fla's layers' rules (``get_layer_cache`` / ``update_layer_cache``):

* a cache passed in is read whatever ``use_cache`` says: stored states are where the forward starts;
* with ``use_cache=True`` the new states are stored; with ``use_cache=False`` the stored states stay as they
  were, and the cache still counts the forward's tokens (fla's layer also drops its stored conv states
  there, leaving a recurrent state without its conv context; we keep ours, so a later call continues
  from a consistent state);
* with ``use_cache=True`` and no cache, the forward runs as without one and returns ``None``;
* a cache that has counted tokens for the layer but holds no state for it (after ``use_cache=False``) is
  refused: the forward would start from zeros.

:class:`InferenceParamsCache` keeps it in mamba-ssm's ``InferenceParams.key_value_memory_dict[layer_idx]``,
with mamba-ssm's rules: ``seqlen_offset == 0`` starts a new prompt from zero states, a later call continues
from the stored ones (a one-token decode step, or, beyond mamba-ssm, a chunk of several tokens); every call
stores; the caller advances ``seqlen_offset``. ``seqlen_offset > 0`` without stored states is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class StateStore:
    """The states one forward starts from and, when ``writes``, leaves behind."""

    writes: bool = False  # whether this forward's final states are kept
    argument: str = 'cache'  # the forward argument it came from, for error messages

    def stored(self, layer_idx: int | None, spec: StateSpec) -> dict | None:
        """The layer's stored states to start from, checked against ``spec`` (a ``ValueError`` naming the
        argument when they belong to another layer configuration, number of memories or batch size), or None
        (none stored, or a fresh start). A store that says earlier tokens were seen but holds no state for the
        layer raises too: the forward would silently start from zeros."""
        raise NotImplementedError

    def store(self, layer_idx: int | None, state: dict | None, num_tokens: int) -> None:
        """After the forward: keep ``state`` (None when not ``writes``), ``num_tokens`` tokens later."""
        raise NotImplementedError


def _require_layer_idx(layer_idx: int | None) -> int:
    if layer_idx is None:
        raise ValueError("host: caching needs the host layer's layer_idx")
    return layer_idx


def _fla_cache_classes() -> tuple[type, ...]:
    """fla's cache classes (``Cache`` and, in the fla versions that have them, its bases)."""
    import fla.models.utils as utils
    return tuple(c for c in (getattr(utils, n, None) for n in ('Cache', 'FLACache', 'LegacyFLACache'))
                 if isinstance(c, type))


class FlaCache(StateStore):
    """fla's ``Cache`` (``past_key_values``), written when ``use_cache``."""

    argument = 'past_key_values'

    def __init__(self, cache, use_cache: bool):
        if not isinstance(cache, _fla_cache_classes()):
            raise TypeError(f"past_key_values: expected fla's Cache (fla.models.utils.Cache) or None, got "
                            f"{type(cache).__module__}.{type(cache).__name__}")
        self.cache = cache
        self.writes = bool(use_cache)

    def stored(self, layer_idx, spec):
        layer_idx = _require_layer_idx(layer_idx)
        entry = self.cache[layer_idx] if len(self.cache) > layer_idx else None
        if entry is None or entry.get('recurrent_state') is None:
            seen = self.cache.get_seq_length(layer_idx)
            if seen:
                raise ValueError(f"past_key_values: it has seen {seen} tokens at layer {layer_idx} but holds no "
                                 "state for that layer (a call with use_cache=False stores none): continuing "
                                 "would start from zeros; pass a fresh Cache, or the one written with use_cache=True")
            return None
        conv = entry.get('conv_state')
        state = {'recurrent': entry['recurrent_state']}
        if isinstance(conv, dict):
            state.update({k: conv[n] for k, n in (('read_conv', 'read'), ('write_conv', 'write'), ('mom', 'mom'))
                          if n in conv})
        spec.check(state, self.argument, layer_idx)
        return state

    def store(self, layer_idx, state, num_tokens):
        if state is None:
            self.cache.update(layer_idx=layer_idx, offset=num_tokens)
            return
        self.cache.update(recurrent_state=state['recurrent'],
                          conv_state={'read': state['read_conv'], 'write': state['write_conv'], 'mom': state['mom']},
                          layer_idx=layer_idx, offset=num_tokens)


class InferenceParamsCache(StateStore):
    """mamba-ssm's ``InferenceParams``: the state dict itself in ``key_value_memory_dict[layer_idx]``."""

    writes = True
    argument = 'inference_params'

    def __init__(self, inference_params):
        if not (hasattr(inference_params, 'key_value_memory_dict') and hasattr(inference_params, 'seqlen_offset')):
            raise TypeError("inference_params: expected mamba-ssm's InferenceParams (mamba_ssm.utils.generation) or "
                            f"None, got {type(inference_params).__module__}.{type(inference_params).__name__}")
        self.params = inference_params

    def stored(self, layer_idx, spec):
        layer_idx = _require_layer_idx(layer_idx)
        state = self.params.key_value_memory_dict.get(layer_idx)
        offset = self.params.seqlen_offset
        if state is None:
            if offset:
                raise ValueError(f"inference_params: seqlen_offset={offset} continues from stored states, but none "
                                 f"are stored for layer {layer_idx}: run the prompt at seqlen_offset=0 first (or "
                                 "allocate the states with allocate_inference_cache)")
            return None
        spec.check(state, self.argument, layer_idx)
        if offset == 0:  # a new prompt: zero states, in place (a CUDA graph may read them)
            for t in (state['recurrent'], *state['read_conv'].values(), *state['write_conv'].values()):
                t.zero_()
        return state

    def store(self, layer_idx, state, num_tokens):
        self.params.key_value_memory_dict[layer_idx] = state


@dataclass(frozen=True)
class StateSpec:
    """What one layer's states look like for ``num_sequences`` sequences: ``empty`` makes them, ``check`` holds a
    cache's stored states to them. ``tag`` (the adapter, routed memories, shared memory) is stored with the
    states (``state['mom']``), because a layer of M routed memories plus the shared one and a layer of M + 1
    routed memories without it have pools of the same shape."""

    num_sequences: int
    num_memories: int      # routed memories
    shared_memory: bool
    host: str              # the adapter's class name
    state_shape: tuple[int, ...]
    read_conv: dict = field(default_factory=dict)    # name -> (channels, width)
    write_conv: dict = field(default_factory=dict)   # name -> (channels, width)

    @property
    def tag(self) -> dict:
        return {'host': self.host, 'num_memories': self.num_memories, 'shared_memory': self.shared_memory}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every pool's shape, by its name in the state dict ('recurrent', 'read_conv.q', 'write_conv.k', ...)."""
        N, E = self.num_sequences, self.num_memories + int(self.shared_memory)
        return {'recurrent': (N, E, *self.state_shape),
                **{f'read_conv.{n}': (N, d, w) for n, (d, w) in self.read_conv.items()},
                **{f'write_conv.{n}': (N, E, d, w) for n, (d, w) in self.write_conv.items()}}

    def empty(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Zero states of ``shapes``; recurrent states in at least fp32, conv states in ``dtype``."""
        shapes = self.shapes
        return {
            'recurrent': torch.zeros(shapes['recurrent'], device=device,
                                     dtype=torch.promote_types(dtype, torch.float32)),
            **{part: {n: torch.zeros(shapes[f'{part}.{n}'], device=device, dtype=dtype) for n in convs}
               for part, convs in (('read_conv', self.read_conv), ('write_conv', self.write_conv))},
            'mom': self.tag,
        }

    def check(self, state, argument: str, layer_idx: int) -> None:
        """A ``ValueError`` naming ``argument`` unless ``state`` is this layer's (same adapter, memories, shapes;
        ``num_sequences`` sequences)."""
        where = f"{argument}: the states stored for layer {layer_idx}"
        parts = ('recurrent', 'read_conv', 'write_conv', 'mom')
        if not isinstance(state, dict) or not all(k in state for k in parts) \
                or not isinstance(state['read_conv'], dict) or not isinstance(state['write_conv'], dict):
            kind = type(state).__name__ if not isinstance(state, dict) else f"keys {sorted(state)}"
            raise ValueError(f"{where} were not made by a MixtureOfMemories layer ({kind}): the cache of an "
                             "unwrapped host layer, or of another layer with the same layer_idx?")
        if state['mom'] != self.tag:
            raise ValueError(f"{where} belong to a MixtureOfMemories layer with {_describe(state['mom'])}; this "
                             f"layer has {_describe(self.tag)}")
        got = {'recurrent': state['recurrent'], **{f'read_conv.{n}': t for n, t in state['read_conv'].items()},
               **{f'write_conv.{n}': t for n, t in state['write_conv'].items()}}
        want = self.shapes
        if sorted(got) != sorted(want):
            raise ValueError(f"{where} have the pools {sorted(got)}, this layer's are {sorted(want)} (a cache of "
                             "another layer configuration)")
        rows = got['recurrent'].shape[0] if isinstance(got['recurrent'], torch.Tensor) else None
        if rows != self.num_sequences:
            raise ValueError(f"{where} hold {rows} sequences, this input has {self.num_sequences} (a cache of "
                             "another batch size)")
        for name, t in got.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {name} has shape {shape}, this layer needs {want[name]} (a cache of "
                                 "another layer configuration)")


def _describe(tag) -> str:
    if not isinstance(tag, dict):
        return repr(tag)
    return (f"host adapter {tag.get('host')}, num_memories={tag.get('num_memories')}, "
            f"shared_memory={tag.get('shared_memory')}")


def clone_state(state: dict) -> dict:
    """A copy to run a forward from without touching the stored states (``use_cache=False``)."""
    return {'recurrent': state['recurrent'].clone(),
            'read_conv': {n: t.clone() for n, t in state['read_conv'].items()},
            'write_conv': {n: t.clone() for n, t in state['write_conv'].items()},
            'mom': state['mom']}
