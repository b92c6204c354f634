"""``PoolRows``: the rows of a cached state pool that one forward reads and writes.

The cache keeps one state per (sequence, memory) in pools such as ``[N, E, *state]``. A forward touches the
rows of its segments only: it reads them (``read``), runs, and writes the new states back (``write``).
Rows are addressed through the pool flattened over its leading dims, so a read is one ``index_select`` and
a write one ``index_copy_`` of whole contiguous rows (multi-dim advanced indexing is several times slower).

Without autograd the pool is updated in place, so that its storage survives from step to step (a CUDA
graph captured on a decode step replays on the live cache); with autograd the write is out of place and
``pool`` is the new tensor. Rows whose ``valid`` entry is False (a padding token's segments) keep their old
state. Kernels that update a pool themselves (``mom_wrap.kernels.conv_step``) take ``flat``, ``index`` and
``valid`` directly.
"""
from __future__ import annotations

import torch


class PoolRows:
    """pool [*lead, *state]; index [G] distinct rows of the pool flattened over its ``lead`` dims, or None
    (every row, in order); valid [G] bool or None (None: every row is written); backend ``"triton"``: an
    in-place write is our row-scatter kernel (``mom_wrap.kernels.rows``) rather than ``index_copy_``."""

    def __init__(self, pool: torch.Tensor, index: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 lead: int = 1, backend: str = 'torch'):
        self.shape = pool.shape
        self.backend = backend
        self.flat = pool.flatten(0, lead - 1) if lead > 1 else pool
        self.index = index
        self.valid = valid
        self._old: torch.Tensor | None = None

    @property
    def pool(self) -> torch.Tensor:
        return self.flat.view(self.shape)

    def read(self) -> torch.Tensor:
        """The rows' states [G, *state] before this forward (read once, then kept)."""
        if self._old is None:
            self._old = self.flat if self.index is None else self.flat.index_select(0, self.index)
        return self._old

    def write(self, new: torch.Tensor) -> None:
        """Store the rows' new states [G, *state] (invalid rows keep theirs)."""
        if (self.backend == 'triton' and self.index is not None and not torch.is_grad_enabled()
                and self.flat.is_contiguous()):
            from mom_wrap.kernels.rows import scatter_rows_
            scatter_rows_(self.flat, self.index, new, self.valid)  # skips invalid rows, no where() needed
            return
        new = new.to(self.flat.dtype)
        if self.valid is not None:
            new = torch.where(self.valid.view(-1, *[1] * (new.dim() - 1)), new, self.read())
        if torch.is_grad_enabled():
            self.flat = new if self.index is None else self.flat.index_copy(0, self.index, new)
        elif self.index is None:
            self.flat.copy_(new)
        else:
            self.flat.index_copy_(0, self.index, new)
