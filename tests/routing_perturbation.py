"""Opt-in test tool: MOM_WRAP_PERTURB_ROUTING=<n> (an integer but 0, the pattern's seed; tests/conftest.py
installs it, and tests/test_distributed.py in its workers) rounds the router's fp32 logits differently for every
batch shape, as fp32 matmuls do on some machines (MKL's AVX2 path at 1 to 3 rows: MKL_CBWR=AVX2 shows it here).

Every fp32 logit of a router (its own forward, eager or compiled, and the routing a test or ``mom_wrap.testing``
writes out with F.linear on a live router's weight) moves by -2 to 2 times u * sum_i |x_i w_i|
(``tests.routing_rounding``), in a pattern keyed on the logits' shape [N, M]: the same shape rounds the same way,
another shape differently. A test that compares routed quantities across shapes (full forward vs decode steps, a
batch vs its rows alone, padded vs unpadded, packed vs separate, DDP ranks vs one process) must hold under it,
with the tolerance of ``tests.routing_rounding`` or a reference that routes the same rows in one call. A fresh
Python process (tests/test_convert.py's loads) is not perturbed: comparisons with one fail under it.
"""
import os
import weakref

import torch
import torch.nn.functional as F

from mom_wrap.router import Router, _Fp32Linear
from mom_wrap.testing import LOGIT_ROUNDING, U

_routers = weakref.WeakSet()  # every Router made, by __init__, deepcopy or pickle (all go through __new__)
_linear = F.linear
_forward = _Fp32Linear.forward
_in_router = False
_SEED = int(os.environ.get('MOM_WRAP_PERTURB_ROUTING', '1'))


def _is_router_weight(weight: torch.Tensor) -> bool:
    for router in list(_routers):
        w = router.__dict__.get('_parameters', {}).get('weight')
        if w is not None and w.shape == weight.shape and w.device == weight.device and (
                weight is w or torch.equal(weight.detach(), w.detach().to(weight.dtype))):
            return True
    return False


def _move(logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits [..., M] = x @ weight.T (fp32), each moved by -LOGIT_ROUNDING..LOGIT_ROUNDING times
    u * sum_i |x_i w_i|, the pattern a hash of (position, shape, seed): plain tensor ops, so that torch.compile
    traces it too. Gradients pass unchanged."""
    with torch.no_grad():
        M = logits.shape[-1]
        key = (logits.numel() // max(M, 1)) * 1009 + M + _SEED * 104729
        h = (torch.arange(logits.numel(), device=logits.device).view(logits.shape) + key * 7919) * 2654435761
        steps = (h % 2 ** 32) // 8192 % (2 * LOGIT_ROUNDING + 1) - LOGIT_ROUNDING
        delta = steps * U * _linear(x.detach().float().abs(), weight.detach().float().abs())
    return logits + delta


def _router_forward(ctx, x, weight):
    """The router's own logits (mom_wrap.router._Fp32Linear's forward; its backward is left as it is), moved."""
    global _in_router
    if torch.compiler.is_compiling():
        return _move(_forward(ctx, x, weight), x, weight)
    _in_router = True  # the F.linear in it is moved here, not by _reference_linear
    try:
        logits = _forward(ctx, x, weight)
    finally:
        _in_router = False
    return _move(logits, x, weight)


def _reference_linear(input, weight, bias=None):
    """F.linear; fp32 logits of a live router's weight (a test's own routing) moved as the router's are."""
    out = _linear(input, weight, bias)
    if (_in_router or torch.compiler.is_compiling() or out.dtype != torch.float32 or bias is not None
            or weight.dim() != 2 or not _is_router_weight(weight)):
        return out
    return _move(out, input, weight)


def install() -> None:
    def new(cls, *args, **kwargs):
        router = object.__new__(cls)  # nn.Module has no __new__ of its own
        _routers.add(router)
        return router
    Router.__new__ = new
    _Fp32Linear.forward = staticmethod(_router_forward)
    F.linear = _reference_linear
