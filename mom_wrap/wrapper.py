"""``MixtureOfMemories``: any supported linear-attention / state-space layer, with M routed memories.

Data flow of one forward (x: [B, T, hidden]):
    router (fp32 softmax, top-k, renormalised)  ->  dispatch (sort slots by memory, sequence, time)
    -> read side once per token (adapter.read: query, output gate)
    -> write side per memory on its segments (MemoryBank: grouped GEMM + per-segment short convs)
    -> the host's varlen recurrence over all segments in one call (adapter.recurrence; recurrence_parts:
       in a few, mom_wrap.recurrence)
    -> weighted combine back to tokens (+ shared memory, weight 1)  ->  adapter.finish (norm, gate, o_proj)
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn

from mom_wrap import cached
from mom_wrap.adapters import adapter_for, registered_adapters
from mom_wrap.adapters.registry import path_of
from mom_wrap.calls import check_hidden_states
from mom_wrap.dispatch import Dispatch, combine, plan_decode, plan_dispatch
from mom_wrap.layout import TokenLayout
from mom_wrap.losses import AttachAuxLoss, balance_loss
from mom_wrap.memories import MemoryBank
from mom_wrap.ops import zeros_in_graph
from mom_wrap.recurrence import run_recurrence
from mom_wrap.router import Router

BACKENDS = ('auto', 'triton', 'torch')
INITS = ('copy', 'random', 'preserve')


_RUN_EAGERLY = None  # ``_run_eagerly`` under torch.compiler.disable, made when the first layer is built


def _run_eagerly(layer: MixtureOfMemories, *args, **kwargs):
    """The layer's forward outside torch.compile's tracing (called as ``_RUN_EAGERLY``). Inductor traced our
    Triton kernels' launches into wrong outputs (H100, torch 2.11: 92% of a compiled layer's outputs off, by
    up to 1.5, against eager), and fla's kernel functions are compile-disabled anyway; the host's kernels and
    ours run as they do eagerly. Disabled when the first layer is built, not at import: the decorator imports
    torch._dynamo, and that import before ``interpret_on_cpu`` sets TRITON_INTERPRET left fla's kernels
    uncallable under Triton's interpreter."""
    return layer._forward(*args, **kwargs)


WRAPPED = '_mom_wrap_wrapped'  # set on a host layer once a MixtureOfMemories has taken it over


def _refuse_wrapped_host(host: nn.Module, args) -> None:
    """Forward pre-hook of a wrapped host: its write-side modules have moved into the wrapper's memories, so its own
    forward would fail on a missing attribute deep inside."""
    raise RuntimeError(f"this {type(host).__name__} layer was wrapped by mom_wrap (its write side moved into a "
                       "MixtureOfMemories): call the MixtureOfMemories instead")


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
            initialisation, each memory's copy of a write-side module through ``initializer`` (default: the
            module's own ``reset_parameters``); ``"preserve"``: copies whose routed memories start silent (the
            last stage of the path the adapter names in ``silent_projection`` zeroed, conv biases included), so
            that the layer computes exactly what the host did (the shared memory carries it; needs
            ``shared_memory``), while gradients still reach the routed memories.
        backend: ``"triton"`` (the host's kernels), ``"torch"`` (pure PyTorch reference) or ``"auto"``
            (triton on CUDA tensors, torch otherwise).
        balance_loss_weight: weight of the router's load-balancing loss, whose gradient the layer adds in
            the backward of its output (``mom_wrap.losses``); 0 turns it off. Settable at any time.
        adapter: a ``HostAdapter`` subclass to split the host with instead of the one registered for its class:
            a variant of that host's MoM (``mom_wrap.fla_mom.FlaMomAdapter``: fla's MomAttention, whose q path
            is per memory). It must match the host. None (default): the registered adapter. A variant's dotted
            path is ``adapter_path`` (None for the registered one), which ``mom_wrap.convert`` saves with the
            settings.
        recurrence_parts: with gradients on, the host's recurrence runs in up to this many parts
            (``mom_wrap.recurrence``): less peak memory (the host kernels' backward transients grow with the
            rows of one call) for some more time. GatedDeltaNet runs its forward in one call and its backward
            in a call per group of whole segments; the other hosts make calls over consecutive time ranges of
            every segment, each starting from the states the one before ended with. 1 (default): all slots in
            one call. Inference always makes one call. Settable at any time.
        initializer: how a fresh module is initialised, called on it in place: the router, and with
            ``init="random"`` each memory's copies of the host's write-side modules. None (default): their own
            ``reset_parameters`` (a Linear: PyTorch's default). ``mom_wrap.convert`` passes the model's own
            (transformers' ``_init_weights``: fla's models draw every Linear and conv weight from
            N(0, ``initializer_range``)), so that the memories start as the model's own layers did.

    ``forward`` takes and returns what the host does (``mom_wrap.calls``): for fla's layers
    ``(o, None, past_key_values)`` and the host's own extra arguments and outputs (RWKV7: ``v_first``), for
    mamba-ssm's the output tensor; states live in the host's cache with its rules (``mom_wrap.cache``).
    After a forward, ``router_logits`` holds its fp32 router logits [B, T, M] and ``balance_loss`` its
    load-balancing term, both detached (for logging).
    """

    def __init__(self, host: nn.Module, num_memories: int, topk: int, shared_memory: bool = True,
                 init: str = 'copy', backend: str = 'auto', balance_loss_weight: float = 0.01, adapter=None,
                 recurrence_parts: int = 1, initializer: Callable[[nn.Module], None] | None = None):
        super().__init__()
        global _RUN_EAGERLY
        if _RUN_EAGERLY is None:
            _RUN_EAGERLY = torch.compiler.disable(_run_eagerly)
        _check_count('num_memories', num_memories, 1)
        _check_count('topk', topk, 1)
        _check_count('recurrence_parts', recurrence_parts, 1)
        if topk > num_memories:
            raise ValueError(f"topk: must be <= num_memories ({num_memories}), got {topk}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if init == 'preserve' and not shared_memory:
            raise ValueError("init: 'preserve' needs shared_memory=True (the shared memory carries the host's "
                             "function while the routed memories start silent)")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if isinstance(balance_loss_weight, bool) or not isinstance(balance_loss_weight, (int, float)):
            raise TypeError(f"balance_loss_weight: expected a float, got {type(balance_loss_weight).__name__}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer: expected a function of a module, got {type(initializer).__name__}")
        if getattr(host, WRAPPED, False):
            raise ValueError("host: this layer was already wrapped by mom_wrap (its write side moved into a "
                             "MixtureOfMemories); use that MixtureOfMemories, or wrap a fresh layer")
        adapter = adapter_for(host, adapter)
        # a variant's dotted path (convert saves it), None for a registered adapter (found by the host's class)
        self.adapter_path = None if type(adapter) in registered_adapters() else path_of(type(adapter))
        self.num_memories = num_memories
        self.topk = topk
        self.shared_memory = bool(shared_memory)
        self.backend = backend
        self.balance_loss_weight = float(balance_loss_weight)
        self.balance_loss_scale = 1.0  # the loop's loss factor, read in the backward (mom_wrap.losses)
        self.recurrence_parts = recurrence_parts
        self.layer_idx = getattr(host, 'layer_idx', None)
        self.hidden_size = adapter.hidden_size
        projections = adapter.write_projections()
        # the router takes the device and dtype of the host's projections, not of its first parameter: fla keeps
        # some in fp32 in a bf16 model on purpose (GatedDeltaNet's A_log), and the router's input is x
        ref = projections[0].linear.weight
        self.router = Router(self.hidden_size, num_memories, topk, device=ref.device, dtype=ref.dtype)
        if initializer is not None:
            initializer(self.router)
        self.memories = MemoryBank(projections, self.num_slots_memories, 'copy' if init == 'preserve' else init,
                                   initializer)
        if init == 'preserve':
            self.memories.silence(adapter.silent_projection, num_memories)
        adapter.detach_write_side()
        setattr(host, WRAPPED, True)  # its write side is gone: a second wrap and a direct call are refused
        host.register_forward_pre_hook(_refuse_wrapped_host)
        self.host = host
        self._adapter = adapter
        # detached results of the last forward, for logging: nothing here holds an autograd graph
        self.router_logits: torch.Tensor | None = None
        self._routing: tuple | None = None  # (probs, routed indices, valid) for balance_loss

    @property
    def num_slots_memories(self) -> int:
        """E: routed memories plus the shared one."""
        return self.num_memories + int(self.shared_memory)

    def extra_repr(self) -> str:
        return (f"num_memories={self.num_memories}, topk={self.topk}, shared_memory={self.shared_memory}, "
                f"backend={self.backend!r}, balance_loss_weight={self.balance_loss_weight}")

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == 'auto':
            return 'triton' if x.is_cuda else 'torch'
        if self.backend == 'triton' and not x.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError("backend: 'triton' runs the host's Triton kernels and needs CUDA tensors "
                             "(or TRITON_INTERPRET=1); use backend='torch' on the CPU")
        return self.backend

    def forward(self, *args, **kwargs):
        """The host's own forward contract (``mom_wrap.calls``).

        fla's layers: ``forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
        output_attentions=False, cu_seqlens=None, **host's own)`` -> ``(o, None, past_key_values, *host's own)``

        * hidden_states [B, T, hidden]; attention_mask [B, >=T] 0/1 left padding (padded positions output
          zeros and touch no memory); cu_seqlens [N+1] packed sequences with B = 1;
        * past_key_values: fla's ``Cache``, read whatever use_cache says, written with use_cache=True
          (``mom_wrap.cache``); output_attentions is ignored (there are none: the second output is None);
        * the host's own arguments and outputs: RWKV7's ``v_first`` (taken after layer 0, returned by all).

        mamba-ssm's layers: ``forward(u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None)``
        -> o shaped as u

        * u [B, T, hidden], or [B * seqlen, hidden] with seqlen; seq_idx [B, T] packed sequences per row
          (one host sync to find them; cu_seqlens [N+1] with B = 1 avoids it);
        * inference_params: mamba-ssm's ``InferenceParams``: seqlen_offset 0 starts from zero states, later
          calls continue from the stored ones (one token, or several).

        Under ``torch.compile`` the ``"torch"`` backend is traced (with graph breaks where the varlen plan
        needs host values); the ``"triton"`` and ``"auto"`` backends run eagerly (``_run_eagerly``: one graph
        break per layer; the model around them compiles as usual).
        """
        if self.backend != 'torch' and torch.compiler.is_compiling():
            return _RUN_EAGERLY(self, *args, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        call = self._adapter.convention.parse(*args, **kwargs)
        hidden_states = call.hidden_states
        check_hidden_states(hidden_states, call.argument, self.hidden_size, self.router.weight.dtype)
        backend = self._resolve_backend(hidden_states)
        B, T, D = hidden_states.shape
        layout = TokenLayout.build(B, T, hidden_states.device, call.attention_mask, call.cu_seqlens)
        x = hidden_states.reshape(B * T, D)
        state = cached.start_state(self, call.store, layout, x)

        host_inputs = self._adapter.host_inputs(call.host_kwargs, layout)
        if layout.valid is not None:
            # padding content must not matter, not even NaN: in the backward too, where the per-token read side
            # (norms, gates) would multiply a padding token's zero output gradient by its NaN local derivative
            x = torch.where(layout.valid[:, None], x, 0)
            host_inputs = {n: torch.where(layout.valid.view(-1, *[1] * (t.dim() - 1)), t, 0)
                           if t.shape[:1] == layout.valid.shape else t for n, t in host_inputs.items()}
        dispatch, probs = self._route(x, layout, decode=state is not None and layout.one_token_per_sequence,
                                      kernels=backend == 'triton')
        write = None
        if dispatch.num_slots == 0:  # every token is padding: nothing is read or written
            # zeros in the graph of every parameter: each gets a (zero) gradient, as DDP needs
            o = zeros_in_graph(hidden_states, [hidden_states, *self.parameters()])
        else:
            if state is not None:
                read, write, o = cached.memories_cached(self, x, layout, dispatch, backend, state, host_inputs)
            else:
                read = {**self._adapter.read(x, layout, backend), **host_inputs}
                write = self.memories({'x': x, **read}, dispatch, backend)
                _check_count('recurrence_parts', self.recurrence_parts, 1)  # (settable at any time)
                parts = self.recurrence_parts if torch.is_grad_enabled() else 1
                # (one part: the adapter called here, one frame less for torch.compile to break in)
                o = run_recurrence(self._adapter, read, write, dispatch, backend, parts) if parts > 1 else \
                    self._adapter.recurrence(read, write, dispatch, backend)[0]
            o = self._adapter.finish(combine(o, dispatch), read, backend)
            if layout.valid is not None:
                o = torch.where(layout.valid[:, None], o, 0)
            o = self._attach_balance_loss(o.view(B, T, D), probs, dispatch)
        if call.store is not None:
            call.store.store(self.layer_idx, state if call.store.writes else None, T)
        return call.returns(o, self._adapter.host_outputs(call.host_kwargs, write, dispatch, layout))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None, dtype=None, **kwargs) -> dict:
        """Zero states for ``batch_size`` sequences (``mom_wrap.cache``): what mamba-ssm's generation asks each
        mixer for before decoding (``max_seqlen`` does not matter: the states have a fixed size)."""
        ref = self.router.weight
        return cached.state_spec(self, batch_size).empty(ref.device, dtype or ref.dtype)

    def _route(self, x: torch.Tensor, layout: TokenLayout, decode: bool,
               kernels: bool = False) -> tuple[Dispatch, torch.Tensor]:
        """Router, then the plan: sorted segments, or for a decode step the sync-free one-slot segments.
        Returns the plan and the router probabilities [N, M] (with their graph, for the balancing loss).
        kernels: the router's selection on mom_wrap's Triton kernels, and the plan's gathers and combine (the
        triton backend; the gathers and combine on CUDA only)."""
        # (the shared memory is memory E-1, in every token's slots with weight 1)
        logits, probs, weights, indices = self.router.route(x, self.shared_memory, kernels)
        self.router_logits = logits.detach().view(layout.batch_size, layout.seq_len, self.num_memories)
        self._routing = (probs.detach(), indices[:, :self.topk], layout.valid)
        if decode:
            dispatch = plan_decode(indices, weights, layout.valid)
        else:
            dispatch = plan_dispatch(indices, weights, layout.sequence, layout.valid, layout.num_sequences,
                                     self.num_slots_memories, kernels, layout.token_bounds if kernels else None)
        return dispatch, probs

    def _attach_balance_loss(self, o: torch.Tensor, probs: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """o, whose backward also applies balance_loss_weight x balance_loss_scale (as the backward runs: the
        loop's loss factor) x the balancing loss (see mom_wrap.losses). Only where a backward can follow:
        inference (a decode step) launches nothing for it."""
        if not (self.balance_loss_weight and torch.is_grad_enabled() and probs.requires_grad):
            return o
        _, indices, valid = self._routing
        return AttachAuxLoss.apply(o, balance_loss(probs, indices, valid, dispatch.memory_counts),
                                   self.balance_loss_weight, self)

    @property
    def balance_loss(self) -> torch.Tensor | None:
        """The load-balancing term M * sum_e f_e P_e of the last forward, detached (None before the first),
        computed when asked; ``mom_wrap.load_balancing_loss`` averages it over a model's MoM layers."""
        return None if self._routing is None else balance_loss(*self._routing)
