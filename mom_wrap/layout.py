"""Where each flat token sits: which sequence, which position, and whether it is padding.

Three input forms, as fla layers accept them: a dense batch ``[B, T]``; a batch with a 0/1
``attention_mask`` ``[B, >=T]`` (padding tokens are excluded from every memory and read as zeros); packed
variable-length input ``[1, T]`` with ``cu_seqlens`` ``[N+1]``. Everything is computed on the device
without a host sync.
"""
from __future__ import annotations

import torch

from mom_wrap.dispatch import inverse_permutation
from mom_wrap.lazy import cached_property
from mom_wrap.ops import cached_conv, segment_conv, segment_conv_with_state
from mom_wrap.pool import PoolRows


class TokenLayout:
    """Built by ``TokenLayout.build``; the per-token index tensors are made on first use, so that a decode
    step, which needs none of them, launches nothing for them.

    sequence [N]: sequence of each flat token; position [N]: position among the valid tokens of its
    sequence; valid [N] bool, None when nothing is padding; order [N]: valid tokens first, grouped by
    sequence in time order (mask only, else None); rank [N]: inverse of ``order``; cu_seqlens
    [num_sequences+1]: sequence bounds in ``order`` (padding after the last).
    """

    def __init__(self, batch_size: int, seq_len: int, num_sequences: int, device: torch.device,
                 mask: torch.Tensor | None = None, packed: torch.Tensor | None = None, history_len: int = 0):
        self.batch_size, self.seq_len, self.num_sequences, self.device = batch_size, seq_len, num_sequences, device
        self._mask = mask        # [B, T] bool padding mask, or None
        self._packed = packed    # [N+1] cu_seqlens of packed input, or None
        self.valid = None if mask is None else mask.reshape(-1)
        # attention_mask columns before this input's: earlier tokens, whose states a cache must hold
        self.history_len = history_len

    @property
    def has_history(self) -> bool:
        """The attention_mask covers valid tokens before this input (generate() passes the mask of everything
        seen so far): a forward that has no stored states for them would silently drop them. Known for masks on
        the CPU only (elsewhere reading it back would be a host sync): False there."""
        return self.history_len > 0

    @classmethod
    def build(cls, batch_size: int, seq_len: int, device: torch.device,
              attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> TokenLayout:
        """Checks the arguments (TypeError / ValueError naming them). Values are checked only where that costs
        no host sync: for tensors on the CPU."""
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
            if batch_size != 1:
                raise ValueError(f"cu_seqlens: packed input needs batch size 1, got hidden_states batch {batch_size}")
            if attention_mask is not None:
                raise ValueError("attention_mask and cu_seqlens cannot both be given")
            if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
                raise TypeError(f"cu_seqlens: expected an integer tensor, got {cu_seqlens.dtype}")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
            if cu_seqlens.device.type == 'cpu' and (cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_len
                                                    or bool((cu_seqlens.diff() < 0).any())):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to seq_len={seq_len}, "
                                 f"got {cu_seqlens.tolist()}")
            cu = cu_seqlens.to(device=device, dtype=torch.long).contiguous()  # (searchsorted warns on strides)
            return cls(batch_size, seq_len, cu.numel() - 1, device, packed=cu)
        if attention_mask is None:
            return cls(batch_size, seq_len, batch_size, device)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(f"attention_mask: expected a 0/1 padding mask of shape [{batch_size}, >={seq_len}], "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask: expected 0/1 values (bool, integer or floating), got "
                            f"{attention_mask.dtype}")
        start = attention_mask.shape[1] - seq_len  # (not [:, -seq_len:], which is the whole mask at seq_len 0)
        history_len = 0
        if attention_mask.device.type == 'cpu' and not torch.compiler.is_compiling():  # (no graph break for it)
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask: expected a 0/1 padding mask (1: token, 0: padding), got values "
                                 f"{attention_mask.unique().tolist()[:8]}")
            if start:  # the most earlier tokens any row has
                history_len = int((attention_mask[:, :start] != 0).sum(1).max()) if batch_size else 0
        mask = attention_mask[:, start:].to(device=device).bool()
        return cls(batch_size, seq_len, batch_size, device, mask=mask, history_len=history_len)

    @property
    def one_token_per_sequence(self) -> bool:
        """A decode step: one token per sequence, each batch row its own sequence (not packed input)."""
        return self.seq_len == 1 and self._packed is None

    @cached_property
    def sequence(self) -> torch.Tensor:
        if self._packed is not None:
            return torch.searchsorted(self._packed[1:], self._flat_index, right=True)
        return torch.arange(self.batch_size, device=self.device).repeat_interleave(self.seq_len)

    @cached_property
    def position(self) -> torch.Tensor:
        if self._packed is not None:
            return self._flat_index - self._packed[self.sequence]
        if self._mask is not None:
            return (self._mask.long().cumsum(1) - 1).reshape(-1)
        return torch.arange(self.seq_len, device=self.device).repeat(self.batch_size)

    @cached_property
    def order(self) -> torch.Tensor | None:
        if self._mask is None:
            return None
        # stable: valid tokens first, each sequence's in time order, so that segment_conv sees them contiguous
        return torch.argsort((~self.valid).long() * self.batch_size + self.sequence, stable=True)

    @cached_property
    def rank(self) -> torch.Tensor | None:
        return None if self.order is None else inverse_permutation(self.order)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        if self._packed is not None:
            return self._packed
        if self._mask is not None:
            return torch.cat([self._mask.new_zeros(1, dtype=torch.long), self._mask.long().sum(1).cumsum(0)])
        return torch.arange(self.batch_size + 1, device=self.device) * self.seq_len

    @cached_property
    def token_bounds(self) -> torch.Tensor:
        """[num_sequences + 1]: each sequence's first flat token (padding included), and N."""
        if self._packed is not None:
            return self._packed
        if self._mask is None:
            return self.cu_seqlens
        return torch.arange(self.batch_size + 1, device=self.device) * self.seq_len

    @cached_property
    def _flat_index(self) -> torch.Tensor:
        return torch.arange(self.batch_size * self.seq_len, device=self.device)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
             backend: str = 'torch', rows: PoolRows | None = None) -> torch.Tensor:
        """The host's short conv over each sequence's valid tokens. x [N, D], weight [D, 1, W], bias [D].

        With ``rows`` (the host's conv cache [num_sequences, D, W], every row) each sequence starts from its
        cached state and the new states are written back through ``rows``.
        """
        # [1, D, W]: one 'memory'. A view, not a transpose: its gradient then has the weight's own strides
        # (a transposed one differs on the size-1 dim, which DDP reports as a bucket-view stride mismatch)
        w = weight.view(1, weight.shape[0], weight.shape[-1])
        b = bias[None] if bias is not None else None
        if rows is not None and self.one_token_per_sequence:
            return cached_conv(x, rows, w, b, activation, backend)  # a decode step: one row per sequence
        xs = x if self.order is None else x[self.order]
        if rows is None:
            y = segment_conv(xs, w, b, None, self.position if self.order is None else self.position[self.order],
                             activation, backend)
            return y if self.order is None else y[self.rank]
        cu, state = self.cu_seqlens, rows.read()
        if self.order is not None:  # the padding rows form one more segment, from and to nowhere
            cu = torch.cat([cu, cu.new_full((1,), x.shape[0])])
            state = torch.cat([state, state.new_zeros(1, *state.shape[1:])])
        y, new_state = segment_conv_with_state(xs, w, b, None, cu, state, activation, backend)
        rows.write(new_state[:self.num_sequences])
        return y if self.order is None else y[self.rank]
