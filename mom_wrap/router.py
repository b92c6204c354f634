"""Token router: a bias-free linear layer, softmax over fp32 logits, top-k (ties to the lower memory index),
renormalised weights."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Fp32Linear(torch.autograd.Function):
    """x @ weight.T in fp32 that keeps x in its own dtype for the backward: autograd's F.linear(x.float(), ...)
    would keep the fp32 copy, [N, hidden] x 4 bytes for the whole step (64 MiB at 16K tokens, hidden 1024)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Router(nn.Linear):
    """``nn.Linear(hidden, num_memories, bias=False)`` that also picks each token's top-k memories.

    The routing itself runs in fp32 whatever the input dtype: softmax and top-k over bf16 logits would tie
    and flip between memories on small differences.
    """

    def __init__(self, hidden_size: int, num_memories: int, topk: int, device=None, dtype=None):
        super().__init__(hidden_size, num_memories, bias=False, device=device, dtype=dtype)
        self.num_memories = num_memories
        self.topk = topk

    def route(self, x: torch.Tensor, shared: bool = False,
              kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> logits [N, M] fp32, probs [N, M] fp32, weights [N, s] fp32, indices [N, s] int64,
        s = k, or k + 1 with ``shared`` (the shared memory's slot last: index M, weight 1).

        ``weights`` are the top-k probabilities renormalised to sum to 1 per token. ``indices`` are in
        descending probability; ties (equal probabilities, e.g. a zero router) go to the lower memory index,
        on every device and every time: a stable sort, where ``torch.topk`` leaves ties to its algorithm (on
        the CPU it picked memories 6, 5, 4 of 8 equal ones, and other ones at other batch sizes).
        ``kernels``: the selection after the logits in one Triton kernel, and its backward in one
        (``mom_wrap.kernels.route``; the triton backend), where PyTorch takes about ten operations each way.
        """
        with torch.autocast(x.device.type, enabled=False):  # autocast would take the logits back to bf16
            logits = _Fp32Linear.apply(x, self.weight)
        if kernels:
            from mom_wrap.kernels.route import route_triton
            return (logits, *route_triton(logits, self.topk, shared))
        probs = logits.softmax(dim=-1)
        top_p, indices = probs.sort(dim=-1, descending=True, stable=True)
        top_p, indices = top_p[..., :self.topk], indices[..., :self.topk]
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        if shared:  # the shared memory is memory M, in every token's slots with weight 1
            indices = F.pad(indices, (0, 1), value=self.num_memories)
            weights = F.pad(weights, (0, 1), value=1.0)
        return logits, probs, weights, indices
