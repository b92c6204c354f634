"""``MixtureOfMemories``: any supported linear-attention / state-space layer, with M routed memories.

Data flow of one forward (x: [B, T, hidden]):
    router (fp32 softmax, top-k, renormalised)  ->  dispatch (sort slots by memory, sequence, time)
    -> read side once per token (adapter.read: query, output gate)
    -> write side per memory on its segments (MemoryBank: grouped GEMM + per-segment short convs)
    -> the host's varlen recurrence over all segments in one call (adapter.recurrence)
    -> weighted combine back to tokens (+ shared memory, weight 1)  ->  adapter.finish (norm, gate, o_proj)
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters import adapter_for
from mom_wrap.dispatch import Dispatch, combine, plan_decode, plan_dispatch
from mom_wrap.layout import TokenLayout
from mom_wrap.memories import MemoryBank
from mom_wrap.pool import PoolRows
from mom_wrap.router import Router

BACKENDS = ('auto', 'triton', 'torch')
INITS = ('copy', 'random')


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


class MixtureOfMemories(nn.Module):
    """Wrap ``host`` (a layer of a supported host, see ``mom_wrap.supported_hosts()``) as a MoM layer.

    Args:
        host: the layer. The wrapper takes it over: its write-side modules (for GatedDeltaNet: k/v/a/b
            projections and k/v convs) move into ``self.memories`` as stacked per-memory parameters and are
            removed from the host; its read side stays and is used once per token.
        num_memories: routed memories M.
        topk: memories each token is written to and read from.
        shared_memory: add one more memory that sees every token, read with weight 1.
        init: ``"copy"``: every memory starts as a copy of the host's write side; ``"random"``: fresh
            initialisation the way the host's modules initialise themselves.
        backend: ``"triton"`` (the host's kernels), ``"torch"`` (pure PyTorch reference) or ``"auto"``
            (triton on CUDA tensors, torch otherwise).

    ``forward`` takes and returns what the host does: ``(o, None, past_key_values)``.
    After a forward, ``router_logits`` holds the fp32 router logits [B, T, M].
    """

    def __init__(self, host: nn.Module, num_memories: int, topk: int, shared_memory: bool = True,
                 init: str = 'copy', backend: str = 'auto'):
        super().__init__()
        _check_count('num_memories', num_memories, 1)
        _check_count('topk', topk, 1)
        if topk > num_memories:
            raise ValueError(f"topk: must be <= num_memories ({num_memories}), got {topk}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        adapter = adapter_for(host)
        self.num_memories = num_memories
        self.topk = topk
        self.shared_memory = bool(shared_memory)
        self.backend = backend
        self.layer_idx = getattr(host, 'layer_idx', None)
        self.hidden_size = adapter.hidden_size
        ref = next(host.parameters())
        self.router = Router(self.hidden_size, num_memories, topk, device=ref.device, dtype=ref.dtype)
        self.memories = MemoryBank(adapter.write_projections(), self.num_slots_memories, init)
        adapter.detach_write_side()
        self.host = host
        self._adapter = adapter
        self.router_logits: torch.Tensor | None = None
        self._balance_inputs: tuple | None = None

    @property
    def num_slots_memories(self) -> int:
        """E: routed memories plus the shared one."""
        return self.num_memories + int(self.shared_memory)

    def extra_repr(self) -> str:
        return (f"num_memories={self.num_memories}, topk={self.topk}, shared_memory={self.shared_memory}, "
                f"backend={self.backend!r}")

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == 'auto':
            return 'triton' if x.is_cuda else 'torch'
        if self.backend == 'triton' and not x.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError("backend: 'triton' runs the host's Triton kernels and needs CUDA tensors "
                             "(or TRITON_INTERPRET=1); use backend='torch' on the CPU")
        return self.backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = False, output_attentions: bool | None = False,
                **kwargs):
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: expected shape [batch, seq_len, {self.hidden_size}] (the host's "
                             f"hidden size), got {tuple(hidden_states.shape)}")
        backend = self._resolve_backend(hidden_states)
        B, T, D = hidden_states.shape
        layout = TokenLayout.build(B, T, hidden_states.device, attention_mask, kwargs.get('cu_seqlens'))
        x = hidden_states.reshape(B * T, D)
        cached = use_cache or past_key_values is not None
        state = self._load_state(past_key_values, layout.num_sequences, x) if cached else None

        dispatch = self._route(x, layout, decode=cached and layout.one_token_per_sequence)
        if dispatch.num_segments == 0:  # every token is padding: nothing is read or written
            if cached:
                self._save_state(past_key_values, state, T)
            return torch.zeros_like(hidden_states), None, past_key_values

        if cached:
            read, o = self._memories_cached(x, layout, dispatch, backend, state)
            self._save_state(past_key_values, state, T)
        else:
            read = self._adapter.read(x, layout, backend)
            write = self.memories(x, dispatch, backend)
            o, _ = self._adapter.recurrence(read, write, dispatch, backend)
        o = self._adapter.finish(combine(o, dispatch), read, backend)
        if layout.valid is not None:
            o = torch.where(layout.valid[:, None], o, 0)
        return o.view(B, T, D), None, past_key_values

    def _route(self, x: torch.Tensor, layout: TokenLayout, decode: bool) -> Dispatch:
        """Router, then the plan: sorted segments, or for a decode step the sync-free one-slot segments."""
        logits, probs, weights, indices = self.router.route(x)
        self.router_logits = logits.view(layout.batch_size, layout.seq_len, self.num_memories)
        if self.shared_memory:  # the shared memory is memory E-1, in every token's slots with weight 1
            indices = F.pad(indices, (0, 1), value=self.num_memories)
            weights = F.pad(weights, (0, 1), value=1.0)
        if decode:
            dispatch = plan_decode(indices, weights, layout.valid)
        else:
            dispatch = plan_dispatch(indices, weights, layout.sequence, layout.valid, layout.num_sequences,
                                     self.num_slots_memories)
        # kept, not computed: the loss costs kernels that inference (a decode step) has no use for
        self._balance_inputs = (probs, dispatch, layout.valid)
        return dispatch

    def _memories_cached(self, x, layout, dispatch, backend, state):
        """Read side and memories starting from the cached states, whose new values go back into ``state``
        (see ``mom_wrap.pool``: in place without autograd). Returns (read-side tensors, per-slot outputs)."""
        decode = dispatch.token_major
        read_rows = {n: PoolRows(c, valid=layout.valid if decode else None) for n, c in state['read_conv'].items()}
        read = self._adapter.read(x, layout, backend, read_rows)
        # each segment's row in the pools flattened over (sequence, memory); a padding token's segments stay
        index = dispatch.segment_sequence * self.num_slots_memories + dispatch.segment_memory
        write_rows = {n: PoolRows(c, index, dispatch.segment_valid, lead=2, backend=backend)
                      for n, c in state['write_conv'].items()}
        write = self.memories(x, dispatch, backend, write_rows)
        h = PoolRows(state['recurrent'], index, dispatch.segment_valid, lead=2, backend=backend)
        o, h_new = self._adapter.recurrence(read, write, dispatch, backend, initial_state=h.read(),
                                            output_final_state=True)
        h.write(h_new)
        state.update(recurrent=h.pool, read_conv={n: r.pool for n, r in read_rows.items()},
                     write_conv={n: r.pool for n, r in write_rows.items()})
        return read, o

    # ------------------------------------------------------------------------------------------------ cache
    # Kept in fla's Cache entry of the host's layer_idx, batch-first so that the cache's own reorder /
    # repeat / select operations (beam search) apply unchanged:
    #   recurrent_state: [N, E, *state_shape] (host layout) for every sequence and memory (shared last)
    #   conv_state: {'read': name -> [N, D, W] (host conv-cache layout), 'write': name -> [N, E, D, W]}

    def _load_state(self, past_key_values, num_sequences: int, x: torch.Tensor) -> dict:
        if past_key_values is None:
            raise ValueError("past_key_values: use_cache=True needs a cache object (fla.models.utils.Cache)")
        if self.layer_idx is None:
            raise ValueError("host: caching needs the host layer's layer_idx")
        entry = past_key_values[self.layer_idx] if len(past_key_values) > self.layer_idx else None
        if entry is not None and entry.get('recurrent_state') is not None:
            pool, conv = entry['recurrent_state'], entry['conv_state']
            if pool.shape[0] != num_sequences or pool.shape[1] != self.num_slots_memories:
                raise ValueError(f"past_key_values: cached state holds {pool.shape[0]} sequences x {pool.shape[1]} "
                                 f"memories, this input has {num_sequences} x {self.num_slots_memories}")
            return {'recurrent': pool, 'read_conv': conv['read'], 'write_conv': conv['write']}
        E, dev = self.num_slots_memories, x.device
        return {
            'recurrent': torch.zeros(num_sequences, E, *self._adapter.state_shape(), device=dev,
                                     dtype=torch.promote_types(x.dtype, torch.float32)),
            'read_conv': {n: torch.zeros(num_sequences, d, w, device=dev, dtype=x.dtype)
                          for n, (d, w) in self._adapter.read_conv_shapes().items()},
            'write_conv': {n: torch.zeros(num_sequences, E, d, w, device=dev, dtype=x.dtype)
                           for n, (d, w) in self.memories.conv_shapes().items()},
        }

    def _save_state(self, past_key_values, state: dict, num_tokens: int) -> None:
        past_key_values.update(recurrent_state=state['recurrent'],
                               conv_state={'read': state['read_conv'], 'write': state['write_conv']},
                               layer_idx=self.layer_idx, offset=num_tokens)

    @property
    def balance_loss(self) -> torch.Tensor | None:
        """Switch/Mixtral load-balancing term of the last forward (None before the first), computed when
        asked; ``mom_wrap.load_balancing_loss`` averages it over a model's MoM layers."""
        return None if self._balance_inputs is None else self._balance(*self._balance_inputs)

    def _balance(self, probs: torch.Tensor, dispatch: Dispatch, valid: torch.Tensor | None) -> torch.Tensor:
        """M * sum_e f_e P_e over the forward's non-padding tokens."""
        if valid is None:
            n = float(probs.shape[0])  # a Python number: no host-to-device copy (graph capture forbids one)
            mean_prob = probs.mean(0)
        else:
            vf = valid.float()
            n = vf.sum().clamp(min=1)
            mean_prob = (probs * vf[:, None]).sum(0) / n
        share = dispatch.counts(self.num_slots_memories)[:self.num_memories].float() / (n * self.topk)
        return self.num_memories * (share * mean_prob).sum()
