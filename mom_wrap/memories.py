"""The write side of every memory as stacked parameters, applied to the sorted slots without a Python
loop over memories.

Each host projection (``mom_wrap.adapters.base.WriteProjection``) reads one input: the layer input ``x``, or
a read-side tensor of the adapter (a token-shifted mix, for instance). Projections of ``x`` are stored side
by side in one parameter ``weight`` ``[E, sum(out), in]``, the operand of one grouped GEMM as it is (no
concatenation per forward, nothing cached that an in-place edit could leave stale); a projection of another
input has its own ``input_weight[name]`` ``[E, out, in]``. ``proj[name]`` is the ``[E, out, in]`` weight of
projection ``name`` either way (a view of ``weight`` for projections of ``x``). ``proj_bias[name]`` holds
its bias when the host's linear has one; a low-rank projection's second stage (after its activation) is
``second[name]`` ``[E, out, rank]`` with ``second_bias[name]``; a short conv after the projection is
``conv[name]`` ``[E, D, W]`` (and ``conv_bias``). Index ``E - 1`` is the shared memory when there is one.
Stacking keeps every memory's weights in parameters that receive a gradient on every step, even when a
memory gets no token.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mom_wrap.adapters.base import WriteProjection
from mom_wrap.dispatch import Dispatch, gather
from mom_wrap.ops import add_memory_bias, cached_conv, check_activation, grouped_linear, segment_conv
from mom_wrap.pool import PoolRows


def _stack(module: nn.Module, attr: str, num: int, init: str, initializer=None) -> torch.Tensor:
    """The host module's parameter ``attr`` repeated ``num`` times, or ``num`` fresh initialisations: each of a
    copy of the module, through ``initializer`` (default: the module's own ``reset_parameters``)."""
    if init == 'copy':
        return getattr(module, attr).detach().clone().unsqueeze(0).repeat(num, *([1] * getattr(module, attr).dim()))
    fresh = []
    for _ in range(num):
        m = copy.deepcopy(module)
        if initializer is None:
            m.reset_parameters()
        else:
            initializer(m)
        fresh.append(getattr(m, attr).detach())
    return torch.stack(fresh)


@contextlib.contextmanager
def regathered(xs: torch.Tensor, x: torch.Tensor, token: torch.Tensor):
    """Inside: where autograd saves ``xs`` (= x[token], [S, in] per slot) for the backward, it keeps x [N, in]
    (kept anyway: the read side's projections save it) and gathers again when the backward needs it. The
    grouped GEMM saves its input for the weight gradient; without this the per-slot copy, S = (top-k + 1) x N
    rows, stayed allocated from the forward to the end of the backward, through its peak. Off under
    torch.compile, which traces no saved-tensor hooks here."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        yield
        return
    ptr, shape = xs.data_ptr(), xs.shape

    def pack(t):
        return (x, token) if t.data_ptr() == ptr and t.shape == shape and t.dtype == xs.dtype else t

    def unpack(saved):
        return saved[0].index_select(0, saved[1]) if isinstance(saved, tuple) else saved
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


STAGE_ACTIVATIONS = {None: lambda t: t, 'tanh': torch.tanh, 'sigmoid': torch.sigmoid, 'relu': F.relu,
                     'silu': F.silu}


class MemoryBank(nn.Module):
    def __init__(self, projections: list[WriteProjection], num_memories: int, init: str, initializer=None):
        super().__init__()
        for p in projections:
            if p.activation not in STAGE_ACTIVATIONS:
                raise ValueError(f"activation: unsupported activation {p.activation!r} of projection {p.name!r}")

        def stack(module: nn.Module, attr: str) -> torch.Tensor:
            return _stack(module, attr, num_memories, init, initializer)
        # the fused projection of x computed again in the backward instead of kept (``_recomputes``): 295 MiB less
        # peak at 8 x 2048 for GatedDeltaNet's paper layer (H100, benchmarks/README.md); off until what it costs in
        # time is measured on a GPU alone (benchmarks/bench_layer.py --recompute-projections)
        self.recompute = False
        self.names = [p.name for p in projections]
        # projections of x, fused; each other input's projection on its own
        self.x_names = [p.name for p in projections if p.input == 'x']
        self.out_features = [p.linear.out_features for p in projections if p.input == 'x']
        self.inputs = {p.name: p.input for p in projections}
        self.weight = nn.Parameter(torch.cat([stack(p.linear, 'weight') for p in projections if p.input == 'x'],
                                             dim=1)) if self.x_names else None
        self.input_weight = nn.ParameterDict({p.name: nn.Parameter(stack(p.linear, 'weight'))
                                              for p in projections if p.input != 'x'})
        self.proj_bias = nn.ParameterDict()
        self.second = nn.ParameterDict()
        self.second_bias = nn.ParameterDict()
        self.activation: dict[str, str | None] = {}
        self.conv = nn.ParameterDict()
        self.conv_bias = nn.ParameterDict()
        self.conv_activation: dict[str, str | None] = {}
        for p in projections:
            if p.linear.bias is not None:
                self.proj_bias[p.name] = nn.Parameter(stack(p.linear, 'bias'))
            if p.second is not None:
                self.second[p.name] = nn.Parameter(stack(p.second, 'weight'))
                if p.second.bias is not None:
                    self.second_bias[p.name] = nn.Parameter(stack(p.second, 'bias'))
                self.activation[p.name] = p.activation
            if p.conv is not None:
                # ShortConvolution weight [D, 1, W] -> [E, D, W]
                self.conv[p.name] = nn.Parameter(stack(p.conv, 'weight').squeeze(2))
                if p.conv.bias is not None:
                    self.conv_bias[p.name] = nn.Parameter(stack(p.conv, 'bias'))
                self.conv_activation[p.name] = getattr(p.conv, 'activation', None)

    def last_stage(self, name: str, grads: bool = False) -> list[torch.Tensor]:
        """The last stage of projection ``name`` [E, ...]: its conv when it has one, else its second stage, else
        its linear; [weight, bias] where they exist (views of ``weight`` for a projection of x), or with
        ``grads`` their gradients (missing ones left out)."""
        if name not in self.names:
            raise ValueError(f"silent_projection: no write projection {name!r}; the adapter's are {self.names}")
        if name in self.conv:
            params = [self.conv[name], self.conv_bias.get(name)]
        elif name in self.second:
            params = [self.second[name], self.second_bias.get(name)]
        elif name in self.input_weight:
            params = [self.input_weight[name], self.proj_bias.get(name)]
        else:  # a projection of x: its rows of the fused weight
            rows = self.split(self.weight.grad if grads and self.weight.grad is not None else self.weight)[name]
            bias = self.proj_bias.get(name)
            out = [rows if not grads or self.weight.grad is not None else None,
                   bias.grad if grads and bias is not None else bias]
            return [t for t in out if t is not None]
        return [t.grad if grads else t for t in params if t is not None and (not grads or t.grad is not None)]

    @torch.no_grad()
    def silence(self, name: str, count: int) -> None:
        """Zero the last stage (``last_stage``) of projection ``name`` for memories 0 .. count-1, bias included:
        what they write through it is then exactly zero, and that stage still gets gradients (its input is
        not zero; the stages before it get theirs once it has moved)."""
        for t in self.last_stage(name):
            t[:count].zero_()

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """t [E, sum(out), ...] (``weight``, its gradient, an optimizer state) -> x-projection name -> [E, out, ...]
        views."""
        return dict(zip(self.x_names, t.split(self.out_features, dim=1)))

    @property
    def proj(self) -> dict[str, torch.Tensor]:
        """name -> the projection's (first-stage) weights [E, out, in]; in-place edits reach the parameters."""
        views = self.split(self.weight) if self.weight is not None else {}
        return {n: views[n] if n in views else self.input_weight[n] for n in self.names}

    def conv_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (channels, width) of every per-memory short conv."""
        return {name: tuple(w.shape[1:]) for name, w in self.conv.items()}

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dispatch: Dispatch,
                per_slot: bool, regather: bool = True) -> torch.Tensor:
        """Each slot's rows through its memory's weight [E, out, in] (+ bias [E, out]). x: per flat token
        [N, in] (gathered here, and gathered again in the backward: ``regathered``, unless ``regather`` is
        off) or, with ``per_slot``, already per sorted slot [S, in]."""
        if dispatch.token_major:  # a decode step: each token once, with all its memories
            y = grouped_linear(x, weight, dispatch.memory)
        else:
            xs = x if per_slot else gather(x, dispatch)
            with contextlib.nullcontext() if per_slot or not regather else regathered(xs, x, dispatch.token):
                y = grouped_linear(xs, weight, dispatch.memory, dispatch.memory_offsets,
                                   lambda: dispatch.memory_offsets_cpu)
        return y if bias is None else add_memory_bias(y, bias, dispatch.memory)

    def _split_convs(self, backend: str, dispatch: Dispatch, conv_rows) -> tuple[str, ...]:
        """The projections of x whose short conv runs inside the split of the fused projection (``_split``):
        those without a second stage, on the triton backend, for a sorted plan without cached conv states."""
        if backend != 'triton' or conv_rows is not None or dispatch.token_major:
            return ()
        return tuple(n for n in self.x_names if n in self.conv and n not in self.second)

    def _split(self, y: torch.Tensor, dispatch: Dispatch, backend: str, conv_rows) -> dict[str, torch.Tensor]:
        """The fused projection y [S, sum(out)] -> name -> its columns, those of ``_split_convs`` through their
        convs already (``kernels.segment_conv.SplitConvsTriton``: their gradients go straight into y's, no
        concatenation), the others as they are (views; contiguous copies where some of them have convs)."""
        fused = self._split_convs(backend, dispatch, conv_rows)
        if not fused:
            return dict(zip(self.x_names, y.split(self.out_features, dim=1)))
        from mom_wrap.kernels.segment_conv import split_convs_triton
        convs, params = [], []
        for name in self.x_names:
            if name not in fused:
                convs.append(None)
                continue
            act = self.conv_activation[name]
            check_activation(act)
            convs.append((act is not None, name in self.conv_bias))
            params += [self.conv[name]] + ([self.conv_bias[name]] if name in self.conv_bias else [])
        return dict(zip(self.x_names, split_convs_triton(y, self.out_features, tuple(convs), dispatch.memory,
                                                         dispatch.position, params)))

    def _recomputes(self, dispatch: Dispatch, backend: str, conv_rows) -> bool:
        """Whether the fused projection of x is computed again in the backward rather than kept (``forward``):
        on the triton backend when its output feeds the split's convs (``_split_convs``), with gradients on and
        ``recompute`` set. (Not under torch.compile, whose traced graph decides what it keeps itself.)"""
        return (self.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and bool(self._split_convs(backend, dispatch, conv_rows)))

    def _project_x(self, x: torch.Tensor, dispatch: Dispatch, backend: str, conv_rows) -> dict[str, torch.Tensor]:
        """x [N, in] -> name -> [S, out] for the projections of x, as ``forward`` runs them under ``checkpoint``:
        one grouped GEMM of the fused weight, then ``_split``; without ``regathered`` (its hooks would take what
        the grouped GEMM saves from checkpoint's, which must see everything saved here)."""
        y = self._linear(x, self.weight, self._x_bias(), dispatch, per_slot=False, regather=False)
        return self._split(y, dispatch, backend, conv_rows)

    def _x_bias(self) -> torch.Tensor | None:
        """The fused projection's bias [E, sum(out)] (zeros for projections without one), or None."""
        if not any(n in self.proj_bias for n in self.x_names):
            return None
        E = self.weight.shape[0]
        return torch.cat([self.proj_bias[n] if n in self.proj_bias else self.weight.new_zeros(E, f)
                          for n, f in zip(self.x_names, self.out_features)], dim=1)

    def forward(self, inputs: dict[str, torch.Tensor], dispatch: Dispatch, backend: str = 'torch',
                conv_rows: dict[str, PoolRows] | None = None) -> dict[str, torch.Tensor]:
        """inputs: 'x' (the layer input) and the read-side tensors projections read, each [N, in] per flat token
        -> name -> [S, out] per sorted slot (projection, second stage, segment conv).

        With ``conv_rows`` (name -> the cached conv states of ``dispatch``'s G segments, rows of the pool
        [N, E, D, W]) every segment's conv starts from its cached state and writes the new one back.
        """
        parts = {}
        if self.weight is not None:
            if self._recomputes(dispatch, backend, conv_rows):
                # nothing of the projection kept for the backward but x (kept anyway): its output, S = (top-k
                # + 1) x N rows that the convs would keep, is computed again when the convs' backward needs it,
                # after the host's recurrence has freed its own backward's buffers (the layer's peak)
                parts.update(checkpoint(self._project_x, inputs['x'], dispatch, backend, conv_rows,
                                        use_reentrant=False))
            else:  # (inline, not through _project_x: under torch.compile a frame more is a graph break more)
                y = self._linear(inputs['x'], self.weight, self._x_bias(), dispatch, per_slot=False)
                parts.update(self._split(y, dispatch, backend, conv_rows))
        for name, w in self.input_weight.items():
            parts[name] = self._linear(inputs[self.inputs[name]], w, self.proj_bias[name] if name in self.proj_bias
                                       else None, dispatch, per_slot=False)
        out, fused = {}, self._split_convs(backend, dispatch, conv_rows)
        for name in self.names:  # a handful of named parts
            part = parts[name]
            if name in self.second:  # low rank: activation, then the second stage, per slot
                part = self._linear(STAGE_ACTIVATIONS[self.activation[name]](part), self.second[name],
                                    self.second_bias[name] if name in self.second_bias else None, dispatch,
                                    per_slot=True)
            if name in self.conv and name not in fused:
                w, b, act = self.conv[name], self.conv_bias[name] if name in self.conv_bias else None, \
                    self.conv_activation[name]
                if conv_rows is None:
                    part = segment_conv(part, w, b, dispatch.memory, dispatch.position, act, backend)
                else:
                    part = cached_conv(part, conv_rows[name], w, b, act, backend, dispatch.segment_memory,
                                       None if dispatch.token_major else dispatch.cu_seqlens)
            out[name] = part
        return out
