"""Memory specialisation and balance: which memories the routers use, and for which tokens.

``MemoryStats(model)`` (or ``record(model)``, the same as a context manager) registers a forward hook on every
``MixtureOfMemories`` layer of ``model`` and accumulates, per layer, from the routing of each forward
(``layer._routing``: fp32 probabilities [N, M], routed memories [N, k], valid [N] or None):

* ``load`` [M]: each routed memory's share of the routed slots of the non-padding tokens (sums to 1; uniform:
  1/M; the shared memory is not counted: it takes every token);
* ``mean_prob`` [M]: the mean router probability of each memory (the ``P_e`` of the balancing loss);
* ``entropy``: the mean entropy (nats, at most log M) of the router's softmax per non-padding token;
* ``max_prob``: the mean largest probability per non-padding token.

Cheap enough to leave on during training: each forward adds a few small kernels per layer into running fp64 sums
on the layer's device (exact counts up to 2^53 slots), without a host sync and without autograd graph; values come
to the host only when read (``summary``, ``loads``, ``history``, ``assignments``: one sync per layer there).
Forwards that run inside a backward are not counted: the recomputation of activation checkpointing (reentrant,
as HF's gradient checkpointing, or not) would count every token twice. ``snapshot(step)`` keeps the sums since
the last snapshot (on the device) for ``history()`` and ``plot_loads``; ``capture_next()`` keeps the token ->
memory assignment of each layer's next forward for ``assignments()`` and ``plot_assignment``. The numbers are
those of this process (under data parallelism, of its shard). Plots need matplotlib (``pip install
"mom_wrap[plot]"``), imported when a plot is made.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.dispatch import histogram
from mom_wrap.wrapper import MixtureOfMemories

ROOT = '(root)'  # the key of a MixtureOfMemories passed itself as the model


def _in_backward() -> bool:
    """Whether this forward runs inside autograd's backward (a checkpointed forward being recomputed):
    ``-1`` is the id of "no graph task", which torch has no public call for."""
    return torch._C._current_graph_task_id() != -1


def routing_sums(probs: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """One forward's sums: probs [N, M] fp32, indices [N, k] routed memories, valid [N] bool or None ->
    fp64 [2M + 3]: routed slots per memory [M], probability sums [M], then tokens, entropy sum and max-probability
    sum, over the non-padding tokens. Device ops only: no host sync."""
    N, M = probs.shape
    probs = probs.detach()
    if valid is None:
        tokens = probs.new_full((1,), N, dtype=torch.float64)
    else:
        probs = torch.where(valid[:, None], probs, 0)  # entr(0) = 0, max 0: padding adds nothing below
        indices = torch.where(valid[:, None], indices, M)  # padding slots go to a bin of their own
        tokens = valid.sum(dtype=torch.float64).reshape(1)
    counts = histogram(indices.reshape(-1), M + 1)[:M]
    return torch.cat([counts.double(), probs.sum(0, dtype=torch.float64), tokens,
                      torch.special.entr(probs).sum(dtype=torch.float64).reshape(1),
                      probs.max(-1).values.sum(dtype=torch.float64).reshape(1)])


def _read(sums: torch.Tensor, M: int, k: int) -> dict:
    """fp64 sums [..., 2M + 3] (``routing_sums`` added up) -> the means; NaN where no token was seen."""
    tokens = sums[..., 2 * M]
    return {'tokens': tokens.long(), 'load': sums[..., :M] / (tokens[..., None] * k),
            'mean_prob': sums[..., M:2 * M] / tokens[..., None],
            'entropy': sums[..., 2 * M + 1] / tokens, 'max_prob': sums[..., 2 * M + 2] / tokens}


@dataclass
class Assignment:
    """One layer's routing of one forward, on the CPU once read (``MemoryStats.assignments``).

    indices [B, T, k] int64: each token's routed memories in descending probability, -1 at padding; weights
    [B, T, k] fp32: their combine weights (sum to 1 per token), 0 at padding; valid [B, T] bool. Packed input
    (``cu_seqlens``) has B = 1.
    """
    indices: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    num_memories: int
    layer_idx: int | None = None

    def to(self, device) -> Assignment:
        return Assignment(self.indices.to(device), self.weights.to(device), self.valid.to(device),
                          self.num_memories, self.layer_idx)

    def shares(self, categories, names: list[str] | None = None,
               weighted: bool = False) -> tuple[list[str], torch.Tensor]:
        """Which memories each category of tokens went to -> (category names, share [C, M] fp64): row c, the
        share of the routed slots of the non-padding tokens of category c that memory e took (rows sum to 1; NaN
        for a category without such tokens). ``weighted``: shares of the combine weights instead of slots.

        categories (per position, [T] for every row or [B, T]):
        * a dict name -> bool (or 0/1) mask;
        * an integer tensor of category codes (< 0: no category), named by ``names`` (default: the codes);
        * a sequence of category names (None: no category), or a sequence of such sequences per row.
        """
        names, masks = _category_masks(categories, names, tuple(self.valid.shape))
        masks = masks & self.valid.to(masks.device)
        routed = self.indices >= 0
        per_token = (F.one_hot(self.indices.clamp(min=0), self.num_memories)
                     * (self.weights if weighted else routed.to(self.weights.dtype))[..., None]).sum(2)  # [B,T,M]
        share = torch.einsum('cbt,btm->cm', masks.double(), per_token.double())
        return names, share / share.sum(1, keepdim=True)


def _category_masks(categories, names, shape: tuple[int, int]) -> tuple[list[str], torch.Tensor]:
    """categories (see ``Assignment.shares``) -> names [C], masks [C, B, T] bool."""
    B, T = shape
    if names is not None and not isinstance(categories, torch.Tensor):
        raise ValueError("names: only for integer category codes (masks and names name their categories)")
    if isinstance(categories, dict):
        if not categories:
            raise ValueError("categories: empty dict")
        names = [str(n) for n in categories]
        masks = [torch.as_tensor(m) for m in categories.values()]
        for n, m in zip(names, masks):
            if m.shape not in ((T,), (B, T)):
                raise ValueError(f"categories: mask {n!r} has shape {tuple(m.shape)}, expected [{T}] or [{B}, {T}]")
        masks = torch.stack([m.bool().expand(B, T) for m in masks])
        return names, masks
    if isinstance(categories, torch.Tensor):
        codes = categories
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"categories: expected integer category codes, got {codes.dtype}")
    elif isinstance(categories, (list, tuple)):
        per_row = bool(categories) and isinstance(categories[0], (list, tuple))
        rows = categories if per_row else [categories]
        order = {}  # name -> code, in order of first appearance
        for row in rows:
            for c in row:
                if c is not None:
                    order.setdefault(c, len(order))
        names = [str(c) for c in order]
        codes = torch.tensor([[-1 if c is None else order[c] for c in row] for row in rows], dtype=torch.long)
        codes = codes if per_row else codes[0]
    else:
        raise TypeError(f"categories: expected a dict of masks, an integer tensor or a sequence of names, got "
                        f"{type(categories).__name__}")
    if codes.shape not in ((T,), (B, T)):
        raise ValueError(f"categories: shape {tuple(codes.shape)}, expected [{T}] or [{B}, {T}] (the assignment's)")
    num = int(codes.max()) + 1 if codes.numel() else 0
    if names is None:
        names = [str(c) for c in range(num)]
    elif len(names) < num:
        raise ValueError(f"names: {len(names)} names for category codes up to {num - 1}")
    masks = codes.expand(B, T)[None] == torch.arange(len(names), device=codes.device)[:, None, None]
    return list(names), masks


class _Layer:
    """One MixtureOfMemories' running sums (fp64 [2M + 3] on its device, see ``routing_sums``)."""

    def __init__(self, name: str, module: MixtureOfMemories):
        self.name, self.module = name, module
        self.M, self.k, self.layer_idx = module.num_memories, module.topk, module.layer_idx
        self.sums = torch.zeros(2 * self.M + 3, dtype=torch.float64, device=module.router.weight.device)
        self.mark = self.sums.clone()  # the sums at the last snapshot
        self.forwards = self.forwards_mark = 0
        self.capture = False
        self.assignment: Assignment | None = None  # on the device until read


class MemoryStats:
    """Router statistics of every MixtureOfMemories layer of ``model``, keyed by module path (``ROOT`` for a
    MixtureOfMemories passed itself). ``attach()`` / ``detach()`` add and remove the forward hooks; as a context
    manager it attaches on entry and detaches on exit (the recorded numbers stay readable). See the module
    docstring for what is counted and when it syncs. Raises ``ValueError`` (naming ``model``) for a model without
    MixtureOfMemories layers.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self._layers = {name or ROOT: _Layer(name or ROOT, m) for name, m in model.named_modules()
                        if isinstance(m, MixtureOfMemories)}
        if not self._layers:
            raise ValueError(f"model: contains no MixtureOfMemories layer ({type(model).__name__}; wrap layers with "
                             "mom_wrap.MixtureOfMemories or mom_wrap.convert first)")
        self._handles = []
        self._snapshots: list[tuple[object, dict[str, tuple[torch.Tensor, int]]]] = []

    # ------------------------------------------------------------------ recording

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> MemoryStats:
        """Start recording (a forward hook per layer); returns self."""
        if self.attached:
            raise RuntimeError("MemoryStats: already attached")
        # eager under torch.compile: a graph break per layer (the triton backend's layers make one anyway)
        hook = torch.compiler.disable(self._on_forward)  # (made here, not at import: see wrapper._RUN_EAGERLY)
        self._handles = [layer.module.register_forward_hook(functools.partial(hook, layer))
                         for layer in self._layers.values()]
        return self

    def detach(self) -> None:
        """Stop recording: the hooks are removed; the numbers recorded so far stay."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> MemoryStats:
        return self if self.attached else self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _on_forward(self, layer: _Layer, module: MixtureOfMemories, args, output) -> None:
        """The per-forward path: device ops only (no host sync), no autograd graph."""
        if _in_backward():  # a checkpointed forward recomputed in the backward: counted when it first ran
            return
        probs, indices, valid = module._routing
        with torch.no_grad():
            sums = routing_sums(probs, indices, valid)
            if layer.sums.device != sums.device:  # the model moved since
                layer.sums, layer.mark = layer.sums.to(sums.device), layer.mark.to(sums.device)
            layer.sums += sums
            layer.forwards += 1
            if layer.capture:
                layer.capture = False
                layer.assignment = _assignment(module, probs, indices, valid)

    def capture_next(self) -> None:
        """Keep the token -> memory assignment of each layer's next (counted) forward, for ``assignments()``."""
        for layer in self._layers.values():
            layer.capture = True

    def reset(self) -> None:
        """Zero every sum and drop the snapshots and captured assignments."""
        for layer in self._layers.values():
            layer.sums.zero_()
            layer.mark.zero_()
            layer.forwards = layer.forwards_mark = 0
            layer.capture, layer.assignment = False, None
        self._snapshots = []

    def snapshot(self, step=None) -> None:
        """Keep the sums since the last snapshot (or since recording began) under ``step`` (any label; default:
        the snapshot's number), on the device: no sync until ``history()`` reads them."""
        step = len(self._snapshots) if step is None else step
        deltas = {}
        for name, layer in self._layers.items():
            deltas[name] = (layer.sums - layer.mark, layer.forwards - layer.forwards_mark)
            layer.mark = layer.sums.clone()
            layer.forwards_mark = layer.forwards
        self._snapshots.append((step, deltas))

    # ------------------------------------------------------------------ reading (syncs)

    @property
    def names(self) -> list[str]:
        """The layers' keys: module paths, in the model's order."""
        return list(self._layers)

    def summary(self) -> dict[str, dict]:
        """Per layer, over every counted forward: ``{'layer_idx', 'forwards', 'tokens'`` (non-padding tokens),
        ``'load'`` [M] fp64 (sums to 1), ``'mean_prob'`` [M] fp64, ``'entropy'`` and ``'max_prob'`` (floats,
        means over the tokens)``}``, on the CPU; NaN before any token."""
        out = {}
        for name, layer in self._layers.items():
            stats = _read(layer.sums.cpu(), layer.M, layer.k)
            out[name] = {'layer_idx': layer.layer_idx, 'forwards': layer.forwards, 'tokens': int(stats['tokens']),
                         'load': stats['load'], 'mean_prob': stats['mean_prob'],
                         'entropy': float(stats['entropy']), 'max_prob': float(stats['max_prob'])}
        return out

    def loads(self) -> dict[str, torch.Tensor]:
        """Per layer, each routed memory's load [M] fp64 on the CPU (see ``summary``)."""
        return {name: s['load'] for name, s in self.summary().items()}

    def history(self) -> dict[str, dict]:
        """Per layer, one entry per snapshot: ``{'layer_idx', 'steps'`` (list), ``'forwards'`` (list),
        ``'tokens'`` [S] int64, ``'load'`` [S, M], ``'mean_prob'`` [S, M], ``'entropy'`` [S], ``'max_prob'``
        [S]``}``, CPU tensors of the interval since the snapshot before (NaN for one without tokens)."""
        steps = [step for step, _ in self._snapshots]
        out = {}
        for name, layer in self._layers.items():
            deltas = [d[name][0] for _, d in self._snapshots]
            sums = torch.stack(deltas).cpu() if deltas else torch.zeros(0, 2 * layer.M + 3, dtype=torch.float64)
            out[name] = {'layer_idx': layer.layer_idx, 'steps': steps,
                         'forwards': [d[name][1] for _, d in self._snapshots], **_read(sums, layer.M, layer.k)}
        return out

    def assignments(self) -> dict[str, Assignment]:
        """Per layer, the assignment ``capture_next()`` asked for (layers whose next forward has not run yet are
        left out), on the CPU."""
        return {name: layer.assignment.to('cpu') for name, layer in self._layers.items()
                if layer.assignment is not None}


def record(model: nn.Module) -> MemoryStats:
    """``with mom_wrap.stats.record(model) as rec: ...``: a ``MemoryStats`` attached inside the block."""
    return MemoryStats(model)


def _assignment(module: MixtureOfMemories, probs, indices, valid) -> Assignment:
    """The routing of one forward as an Assignment on the device (the weights as the router renormalises them)."""
    B, T = module.router_logits.shape[:2]
    weights = probs.detach().gather(1, indices)
    weights = weights / weights.sum(-1, keepdim=True)
    if valid is None:
        valid = torch.ones(B * T, dtype=torch.bool, device=probs.device)
    else:
        indices, weights = torch.where(valid[:, None], indices, -1), torch.where(valid[:, None], weights, 0)
    k = indices.shape[1]
    return Assignment(indices.reshape(B, T, k).clone(), weights.reshape(B, T, k), valid.reshape(B, T).clone(),
                      module.num_memories, module.layer_idx)


# ------------------------------------------------------------------------------------------ plots

def _figure(panels: int, width: float, height: float):
    """A matplotlib Figure (no pyplot: no global backend or figure registry) with a grid of ``panels`` axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('mom_wrap.stats plots need matplotlib: pip install "mom_wrap[plot]"') from e
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout='constrained')
    axes = fig.subplots(rows, cols, squeeze=False).flat
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _title(name: str, layer_idx) -> str:
    return name if layer_idx is None else f"{name} (layer {layer_idx})"


def plot_loads(history, path) -> Path:
    """Load per memory over training: one panel per layer, a line per routed memory over the snapshots' steps
    and a dashed line at the uniform load 1/M. ``history``: ``MemoryStats.history()`` (or the MemoryStats).
    Writes a PNG to ``path``; returns the path."""
    if isinstance(history, MemoryStats):
        history = history.history()
    if not isinstance(history, dict) or not history:
        raise ValueError("history: expected MemoryStats.history() (a non-empty dict per layer)")
    if not all(len(h['steps']) for h in history.values()):
        raise ValueError("history: no snapshots (call MemoryStats.snapshot(step) while recording)")
    fig, axes = _figure(len(history), 4.5, 3.2)
    for ax, (name, h) in zip(axes, history.items()):
        load = h['load']
        M = load.shape[1]
        for e in range(M):
            ax.plot(h['steps'], load[:, e].numpy(), marker='.', label=f"memory {e}")
        ax.axhline(1 / M, color='gray', linestyle='--', label='uniform 1/M')
        ax.set(title=_title(name, h.get('layer_idx')), xlabel='step', ylabel='load', ylim=(0, None))
    axes[0].legend(fontsize='small')
    return _save(fig, path)


def plot_assignment(assignments, categories, path, names: list[str] | None = None, weighted: bool = False) -> Path:
    """Which memories each category of tokens went to, for one batch: a heatmap per layer of the share matrix
    [category, memory] (``Assignment.shares``; rows sum to 1). ``assignments``: ``MemoryStats.assignments()`` (or
    one Assignment); ``categories`` / ``names`` / ``weighted``: as ``Assignment.shares``, the same for every layer.
    Writes a PNG to ``path``; returns the path."""
    if isinstance(assignments, Assignment):
        assignments = {'layer': assignments}
    if not isinstance(assignments, dict) or not assignments:
        raise ValueError("assignments: expected MemoryStats.assignments() (a non-empty dict per layer; call "
                         "capture_next() before a recorded forward)")
    fig, axes = _figure(len(assignments), 1.2 + 0.6 * max(a.num_memories for a in assignments.values()), 3.2)
    for ax, (name, a) in zip(axes, assignments.items()):
        rows, share = a.shares(categories, names, weighted)
        ax.imshow(share.numpy(), vmin=0, vmax=1, cmap='viridis', aspect='auto')
        for c, row in enumerate(share.tolist()):
            for e, v in enumerate(row):
                ax.text(e, c, f"{v:.2f}", ha='center', va='center', fontsize='small', color='w' if v < 0.6 else 'k')
        ax.set(title=_title(name, a.layer_idx), xlabel='memory', xticks=range(a.num_memories),
               yticks=range(len(rows)), yticklabels=rows)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, format='png', dpi=100)
    return path
