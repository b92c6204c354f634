"""Where each flat token sits: which sequence, which position, and whether it is padding.

Three input forms, as fla layers accept them: a dense batch ``[B, T]``; a batch with a 0/1
``attention_mask`` ``[B, >=T]`` (padding tokens are excluded from every memory and read as zeros); packed
variable-length input ``[1, T]`` with ``cu_seqlens`` ``[N+1]``. Everything is computed on the device
without a host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mom_wrap.dispatch import inverse_permutation
from mom_wrap.ops import cached_conv, segment_conv, segment_conv_with_state
from mom_wrap.pool import PoolRows


@dataclass
class TokenLayout:
    batch_size: int
    seq_len: int
    num_sequences: int
    sequence: torch.Tensor          # [N] sequence of each flat token
    position: torch.Tensor          # [N] position among the valid tokens of its sequence
    valid: torch.Tensor | None      # [N] bool, None when nothing is padding
    order: torch.Tensor | None      # [N] valid tokens first, grouped by sequence in time order (mask only)
    rank: torch.Tensor | None       # [N] inverse of ``order``
    cu_seqlens: torch.Tensor        # [num_sequences+1] sequence bounds in ``order`` (padding after the last)

    @classmethod
    def build(cls, batch_size: int, seq_len: int, device: torch.device,
              attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> TokenLayout:
        N = batch_size * seq_len
        if cu_seqlens is not None:
            if batch_size != 1:
                raise ValueError(f"cu_seqlens: packed input needs batch size 1, got hidden_states batch {batch_size}")
            if attention_mask is not None:
                raise ValueError("attention_mask and cu_seqlens cannot both be given")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
            if cu_seqlens.is_floating_point():
                raise TypeError(f"cu_seqlens: expected an integer tensor, got {cu_seqlens.dtype}")
            # values are checked only where that costs no sync: on the host
            if cu_seqlens.device.type == 'cpu' and (cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_len
                                                    or bool((cu_seqlens.diff() < 0).any())):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to seq_len={seq_len}, "
                                 f"got {cu_seqlens.tolist()}")
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            idx = torch.arange(N, device=device)
            sequence = torch.searchsorted(cu[1:], idx, right=True)
            return cls(batch_size, seq_len, cu.numel() - 1, sequence, idx - cu[sequence], None, None, None, cu)
        sequence = torch.arange(batch_size, device=device).repeat_interleave(seq_len)
        if attention_mask is None:
            position = torch.arange(seq_len, device=device).repeat(batch_size)
            cu = torch.arange(batch_size + 1, device=device) * seq_len
            return cls(batch_size, seq_len, batch_size, sequence, position, None, None, None, cu)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(f"attention_mask: expected a 0/1 padding mask of shape [{batch_size}, >={seq_len}], "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask[:, -seq_len:].to(device=device).bool()
        position = (mask.long().cumsum(1) - 1).reshape(N)
        valid = mask.reshape(N)
        # stable: valid tokens first, each sequence's in time order, so that segment_conv sees them contiguous
        order = torch.argsort((~valid).long() * batch_size + sequence, stable=True)
        cu = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().sum(1).cumsum(0)])
        return cls(batch_size, seq_len, batch_size, sequence, position, valid, order, inverse_permutation(order), cu)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
             backend: str = 'torch', rows: PoolRows | None = None) -> torch.Tensor:
        """The host's short conv over each sequence's valid tokens. x [N, D], weight [D, 1, W], bias [D].

        With ``rows`` (the host's conv cache [num_sequences, D, W], every row) each sequence starts from its
        cached state and the new states are written back through ``rows``.
        """
        w = weight.transpose(0, 1)  # [1, D, W]: one 'memory'
        b = bias[None] if bias is not None else None
        if rows is not None and self.seq_len == 1 and self.batch_size == self.num_sequences:
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
