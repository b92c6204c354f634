"""The adapter protocol: the single seam between the MoM core and a host layer.

An adapter splits its host into

* a **write side**, copied per memory: the projections (and the short convs after them) that produce
  what the recurrence writes into its state. The adapter names them with :class:`WriteProjection`; the
  core stacks their weights into ``[E, out, in]`` parameters, runs them as grouped GEMMs on the sorted
  slots and the convs per segment, and hands the results back keyed by name.
* a **read side**, computed once per token in token order: the query, output gate, output norm, output
  projection and host constants. ``read`` runs before the memories, ``finish`` after the combine.
* the **recurrence**: the host's varlen kernel (backend ``triton``) and a PyTorch reference of it
  (backend ``torch``) over all (memory, sequence) segments at once, with per-segment initial and final
  states.
* the host's **forward contract**: ``convention`` (``mom_wrap.calls``) parses its call (fla's
  ``(hidden_states, attention_mask, past_key_values, ...)`` or mamba-ssm's ``(u, seqlen, seq_idx, cu_seqlens,
  inference_params)``) and formats its return value, with the cache of its family; ``host_inputs`` and
  ``host_outputs`` carry its own arguments and outputs beyond those of its family. Grown for every host at
  once, because RWKV7 layers take ``v_first`` from layer 0 and return it, and Mamba2 is called and caches
  unlike fla's layers: a wrapped layer must keep its host's contract to stay a drop-in replacement inside the
  host's model.

Per token and per slot: ``read`` gets the layer's tokens flattened, [N, hidden] in token order, and returns per-token
tensors [N, ...]; the write side reaches ``recurrence`` per sorted slot, [S, ...] (one row per selected (token,
memory), sorted by memory, sequence, time); a per-token tensor the recurrence needs per slot goes through
``mom_wrap.adapters.toolkit.gather``. The toolkit also holds the PyTorch references of the recurrences and fla's
norms. Registration and lookup: ``mom_wrap.adapters.registry``; a new adapter step by step: docs/adapters.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn as nn

from mom_wrap.calls import FlaConvention

if TYPE_CHECKING:
    from mom_wrap.dispatch import Dispatch
    from mom_wrap.layout import TokenLayout
    from mom_wrap.pool import PoolRows


@dataclass
class WriteProjection:
    """One per-memory projection of the host: ``conv(second(activation(linear(input))))``, where the second
    stage and the conv (the host's short conv, its activation included) may be absent.

    Grown for every host at once (GatedDeltaNet needs neither field), because fla's other hosts have:
    * ``input``: what the projection reads. ``'x'``, the layer input, or the name of a tensor [N, in] that
      the adapter's ``read`` returns: RWKV's projections read token-shifted mixes of x made once per token
      in token order (read side), each projection its own.
    * ``second`` and ``activation``: a low-rank projection in two stages, both per memory (GLA's ``gk_proj``,
      RWKV's decay and in-context-rate LoRAs): ``linear`` (in -> rank), ``activation`` (None, 'tanh',
      'sigmoid', 'relu', 'silu'), then ``second`` (rank -> out, with its bias).
    """

    name: str
    linear: nn.Linear
    conv: nn.Conv1d | None = None
    input: str = 'x'
    second: nn.Linear | None = None
    activation: str | None = None


class HostAdapter:
    """Base class of the per-host adapters. Subclasses set ``host_class`` and implement the methods."""

    host_class: ClassVar[str]  # dotted path, imported lazily so that optional hosts stay optional
    write_modules: ClassVar[tuple[str, ...]] = ()  # the host's attributes the write side takes over
    convention: ClassVar[type] = FlaConvention  # how the host is called and where its cache is (mom_wrap.calls)
    # init="preserve": the write projection whose last stage, zeroed, makes a memory write (and so read)
    # exactly nothing: the value path for most hosts
    silent_projection: ClassVar[str] = 'v'

    def __init__(self, host: nn.Module):
        self.host = host

    @classmethod
    def load_host_class(cls) -> type | None:
        module, _, name = cls.host_class.rpartition('.')
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except ImportError:
            return None

    @classmethod
    def matches(cls, host: nn.Module) -> bool:
        host_cls = cls.load_host_class()
        return host_cls is not None and isinstance(host, host_cls)

    @property
    def hidden_size(self) -> int:
        return self.host.hidden_size

    @classmethod
    def host_forward_runs_on(cls, device: torch.device) -> bool:
        """Whether the host layer's own forward runs on ``device`` (the parity suite's checks against the host run
        only where it does). Grown for every host at once, for fla's Mamba3, whose forward refuses any device but
        CUDA. Default: everywhere (on the CPU under Triton's interpreter)."""
        return True

    @classmethod
    def host_kernel_rounding(cls, device: torch.device, dtype: torch.dtype) -> float:
        """The relative error the host's own kernels add on ``device`` for ``dtype`` inputs where they compute below
        that precision inside (default 0: in the inputs' precision, as fla's kernels do with IEEE fp32 dots). The
        parity suite adds it to the tolerance of its comparisons with the host and of triton vs torch. Grown for
        every host at once, for mamba-ssm's Mamba3 kernels, which cast q, k, v to bf16 whatever the input dtype."""
        return 0.0

    @classmethod
    def example_host(cls) -> nn.Module:
        """A small host layer (hidden 64, ``layer_idx=0`` or, where later layers have more to check, a later
        one; the host's default options otherwise): what ``mom_wrap.check`` runs the parity checks
        (``mom_wrap.testing``) on."""
        raise NotImplementedError

    @classmethod
    def example_models(cls) -> dict[str, Callable[[], nn.Module]]:
        """Small models of the host's family, name -> factory, for the parity suite's model-level check: each,
        converted with one-memory copies, must keep its logits (``model(input_ids).logits``, token ids below
        ``model.config.vocab_size``). A host layer inside its model may run with settings ``example_host`` does not
        have (a norm's eps that the model's config sets, options the config passes on): give a configuration for
        each such setting. Grown for every host at once; default: none (no model family)."""
        return {}

    @classmethod
    def example_inputs(cls, x: torch.Tensor) -> dict:
        """The example host's own forward arguments for the input x [B, T, hidden] (see ``host_inputs``), made
        position by position from x so that they slice, pad and pack along with it. Default: none."""
        return {}

    def write_projections(self) -> list[WriteProjection]:
        """The host's per-memory projections, in the order the core stacks them."""
        raise NotImplementedError

    def detach_write_side(self) -> None:
        """Remove the write-side modules from the host once the core has copied them: they would
        otherwise sit unused in the wrapper's parameters (and break DDP without find_unused_parameters).
        Deletes the host attributes named in ``write_modules`` (those the host has: some are optional)."""
        for name in self.write_modules:
            if hasattr(self.host, name):
                delattr(self.host, name)

    def state_shape(self) -> tuple[int, ...]:
        """Shape of one memory's recurrent state for one sequence, in the host's own layout."""
        raise NotImplementedError

    def read_conv_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (channels, width) of each read-side short conv whose state the cache carries."""
        raise NotImplementedError

    def read(self, x: torch.Tensor, layout: TokenLayout, backend: str,
             conv_rows: dict[str, PoolRows] | None = None) -> dict[str, torch.Tensor]:
        """x [N, hidden] -> per-token read-side tensors (query, output gate, ..., and the inputs that
        write projections name in ``WriteProjection.input``, [N, in] each).

        With ``conv_rows`` (name -> the cached read-side conv states [num_sequences, D, W], see
        ``read_conv_shapes``) the read-side convs start from them and write their new states back.
        """
        raise NotImplementedError

    def host_inputs(self, kwargs: dict, layout: TokenLayout) -> dict[str, torch.Tensor]:
        """The host forward's own keyword arguments (``kwargs``: all the wrapper got beyond the shared ones)
        -> per-token tensors [N, ...] that join ``read``'s outputs under their names; checked here, with a
        clear error naming the argument. Default: none."""
        return {}

    def host_outputs(self, kwargs: dict, write: dict[str, torch.Tensor] | None, dispatch: Dispatch,
                     layout: TokenLayout) -> tuple:
        """What the host's forward returns after ``(o, attentions, past_key_values)`` (RWKV7: ``v_first``),
        from the forward's keyword arguments and its write side (name -> [S, out] per sorted slot; None when
        every token is padding and nothing was written). Default: nothing more."""
        return ()

    def recurrence(self, read: dict[str, torch.Tensor], write: dict[str, torch.Tensor], dispatch: Dispatch,
                   backend: str, initial_state: torch.Tensor | None = None,
                   output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the host recurrence over every segment of ``dispatch``.

        write: name -> [S, out] per sorted slot. Returns the per-slot output [S, ...] and, when asked,
        the final state of every segment [G, ...] in the host's own state layout.
        """
        raise NotImplementedError

    def recurrence_in_groups(self, read: dict[str, torch.Tensor], write: dict[str, torch.Tensor],
                             dispatch: Dispatch, backend: str, parts: int) -> torch.Tensor | None:
        """The recurrence of a training forward (zero initial states, no final ones) in one call whose backward
        runs in up to ``parts`` calls over groups of whole segments (``Dispatch.segment_groups``): the
        per-slot output [S, ...], or None where the adapter has no such path (here, the default) or the plan's
        segments do not split evenly; the wrapper then runs the parts over time (``mom_wrap.recurrence``).
        Grown for every host at once, for GatedDeltaNet: the same peak memory as the parts over time (the
        host kernels' backward transients are those of one group's rows) for about half their host time,
        where the host's kernel functions can be called apart (``adapters.gated_delta_in_groups``)."""
        return None

    def decode_in_place(self, read: dict[str, torch.Tensor], write: dict[str, torch.Tensor], dispatch: Dispatch,
                        rows: PoolRows) -> torch.Tensor | None:
        """A decode step (``dispatch.token_major``: one token per segment; triton backend, no autograd) whose
        kernel reads and updates the state pool's rows itself (``rows.flat`` [P, *state], ``rows.index`` [G],
        ``rows.valid`` [G] or None): the per-slot output, or None where the host has no such kernel (the
        wrapper then reads the rows, runs ``recurrence`` and writes them back: a gather and a scatter of
        every selected state). Grown for every host at once, for Mamba2 (``scalar_decay_step``)."""
        return None

    def finish(self, o: torch.Tensor, read: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
        """Combined per-token memory output -> [N, hidden] (output norm, gate, output projection)."""
        raise NotImplementedError
