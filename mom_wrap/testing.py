"""Per-host parity checks, public: the evidence that a host's adapter is right, for our hosts and yours.

``run_checks(factory)`` builds small host layers with ``factory()`` (a fresh layer each call), wraps them
and returns a list of :class:`Result`. Every forward gets the host's own arguments from its adapter's
``example_inputs(x)`` (RWKV7 after layer 0: ``v_first``), and the checks against the host compare the
host's extra outputs too. ``python -m mom_wrap.check`` runs it for every
supported host (see ``mom_wrap/check.py``). The checks, each against a reference that does not go through
the code it checks:

* ``one_memory_equals_host`` (per backend): M=1 copying the host equals the host layer's own eval forward.
* ``topk_copies_equal_host``: M=3, top-3 copies without shared memory (weights sum to 1) equal the host.
* ``preserve_equals_host``: ``init="preserve"`` (M=4, top-2 + shared) equals the host, and
  ``preserve_routed_memories_get_gradients``: the routed memories' silenced stage gets gradients.
* ``naive_loop`` (with and without shared memory): routed memories equal a loop over memories and batch
  rows, each memory's write side run on its own tokens with plain ``F.linear`` / ``F.conv1d`` and the
  adapter's reference recurrence (torch backend) on that one segment; no dispatch, sort, grouped GEMM or
  segment conv of ours.
* ``causal``, ``batch_rows_independent``, ``left_padding``, ``packed_sequences``: layouts against plain runs
  (left padding only for hosts whose forward takes a padding mask: not mamba-ssm's).
* ``every_parameter_gets_a_gradient``.
* ``cached_chunks_equal_full_forward``: prefill, chunked prefill and one-token decode through the cache of
  the host's family (fla's Cache, mamba-ssm's InferenceParams; ``mom_wrap.calls``).
* on CUDA, ``triton_vs_torch_{fp32,bf16}``: forward and backward of both backends, and
  ``one_memory_equals_host_training``: M=1 vs the host in training mode (chunk kernels) at T = 2048, bf16.

The host's own forward needs fla's kernels: on the CPU run under ``TRITON_INTERPRET=1`` (the check command
and the tests set it), which runs their eval path (fused_recurrent) for T <= 64.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap.adapters import adapter_for
from mom_wrap.dispatch import plan_dispatch
from mom_wrap.layout import TokenLayout
from mom_wrap.memories import STAGE_ACTIVATIONS
from mom_wrap.wrapper import MixtureOfMemories

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}
GPU_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}  # fla's fp32 dots run in TF32 on the GPU


@dataclass
class Result:
    host: str
    check: str
    error: float  # max relative error (or 0/1 for yes/no checks)
    tolerance: float
    detail: str = ''

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


# Routing rounding: the tolerance of comparisons across batch shapes ---------------------------------------------
# How far the router's fp32 rounding may move a routed output between two batch shapes: the tolerance of the tests
# that compare the same tokens routed in calls of different shapes (a batch vs its rows alone, padded vs unpadded,
# packed vs separate, full forward vs decode steps or cached chunks, one process vs DDP ranks).
#
# The router computes its logits l = x @ w.T in fp32 whatever the module's dtype (mom_wrap/router.py), and an fp32
# matmul rounds differently for different row counts (MKL's kernels per shape and instruction set; cuBLAS's per
# shape): a logit moves by up to about 2 u sum_i |x_i w_i|, u = 2^-24 (measured with MKL here: up to 1.9, between row
# counts and with MKL_CBWR=AVX2). The renormalised top-k weights w_e = exp(l_e) / sum_{f in top-k} exp(l_f) (the
# softmax's denominator cancels) then move by
#     |dw_e| = w_e |(1 - w_e) dl_e - sum_{f != e} w_f dl_f| <= 2 w_e (1 - w_e) max|dl|,
# zero for a token whose weights are exact (top-1, or all but one underflowed); the softmax and the renormalisation,
# rounded on their own, add a few u of each weight. A routed sum sum_e w_e o_e then moves by at most
# sum_e |dw_e| max_e |o_e|; what follows it in the layer (the host's output norm, gate and projection) carries that
# to the output at about the same relative size. tests/routing_perturbation.py moves the logits by this much.

U = 2.0 ** -24  # fp32's unit roundoff
LOGIT_ROUNDING = 2  # a logit's move between shapes, in u * sum_i |x_i w_i|
WEIGHT_ROUNDING = 12  # the softmax's and the renormalisation's own rounding (~3 u a weight each), both ways


def routing_rounding(mom, x: torch.Tensor, topk: int | None = None) -> float:
    """The bound on sum_e |dw_e| above, the largest over the tokens ``x`` [..., hidden] (rows that are not
    finite, e.g. NaN padding, left out) routed by ``mom.router``: the relative move of the routed output that
    another batch shape may cause. ``topk``: default the layer's; ``mom.num_memories`` bounds the softmax's
    probabilities themselves."""
    x, w = _tokens(x), mom.router.weight.detach().double()
    top, chosen = (x @ w.t()).softmax(-1).topk(topk or mom.topk, -1)
    weights = top / top.sum(-1, keepdim=True)
    # [N]: the largest move of a token's chosen logits (the others cancel in the renormalised weights)
    dl = LOGIT_ROUNDING * U * (x.abs() @ w.abs().t()).gather(-1, chosen).amax(-1)
    return (2 * dl * (weights * (1 - weights)).sum(-1)).max().item() + WEIGHT_ROUNDING * U


def logit_rounding(mom, x: torch.Tensor) -> float:
    """The largest move of a logit of the tokens ``x`` between two batch shapes, LOGIT_ROUNDING u sum_i |x_i w_i|.
    A token's router entropy H = -sum_e p_e log p_e moves by |sum_e log p_e p_e (dl_e - sum_f p_f dl_f)|
    <= 2 max|dl| H: relatively, by at most twice this."""
    x, w = _tokens(x), mom.router.weight.detach().double()
    return LOGIT_ROUNDING * U * (x.abs() @ w.abs().t()).max().item()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return x[x.isfinite().all(-1)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(max |want|, 1)"""
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if got.isnan().any():
        return float('nan')
    return err / max(want.abs().max().item() if want.numel() else 0.0, 1.0)


def wrap(host: nn.Module, num_memories: int = 4, topk: int = 2, shared: bool = True, init: str = 'random',
         backend: str = 'torch', seed: int = 0, adapter=None) -> MixtureOfMemories:
    """A wrapped layer without balancing loss (references have none) and a router spread enough to route
    (``adapter``: a variant's adapter class, as ``MixtureOfMemories`` takes it)."""
    torch.manual_seed(seed)
    mom = MixtureOfMemories(host, num_memories=num_memories, topk=topk, shared_memory=shared, init=init,
                            backend=backend, balance_loss_weight=0.0, adapter=adapter)
    nn.init.normal_(mom.router.weight, std=0.5)
    if init == 'random':  # copies must stay copies of the host's biases (the copy checks compare with the host)
        for b in (*mom.memories.conv_bias.values(), *mom.memories.proj_bias.values(),
                  *mom.memories.second_bias.values()):
            nn.init.normal_(b.data, std=0.3)  # fresh biases start at zero: make them count
    return mom.to(next(host.parameters()).device)


_wrap = wrap  # run_checks' own ``wrap`` passes its adapter on to this one


@contextlib.contextmanager
def recurrence_calls(mom: MixtureOfMemories):
    """Inside: a list that gets one entry per call of ``mom``'s adapter's recurrence (the tests of
    ``recurrence_parts`` count them, so that parts cannot fall back to one call unnoticed)."""
    calls, adapter = [], mom._adapter
    original = adapter.recurrence
    adapter.recurrence = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        yield calls
    finally:
        del adapter.recurrence  # the instance attribute: the class's method again


# ------------------------------------------------------------------------------------------ naive loop

def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """One sequence x [T, D] through a depthwise causal conv weight [D, W] (+ bias [D])."""
    W = weight.shape[-1]
    y = F.conv1d(x.t()[None], weight[:, None], bias, padding=W - 1, groups=x.shape[1])[0, :, :x.shape[0]].t()
    return F.silu(y) if activation in ('silu', 'swish') else y


def memory_write(mom: MixtureOfMemories, inputs: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    """Memory e's write side on one token subsequence: name -> [T, out], with plain F.linear / F.conv1d."""
    bank = mom.memories
    out = {}
    for n in bank.names:
        y = F.linear(inputs[bank.inputs[n]], bank.proj[n][e], bank.proj_bias[n][e] if n in bank.proj_bias else None)
        if n in bank.second:
            y = F.linear(STAGE_ACTIVATIONS[bank.activation[n]](y), bank.second[n][e],
                         bank.second_bias[n][e] if n in bank.second_bias else None)
        if n in bank.conv:
            y = _causal_conv(y, bank.conv[n][e], bank.conv_bias[n][e] if n in bank.conv_bias else None,
                             bank.conv_activation[n])
        out[n] = y
    return out


def routed(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented routing rule, written out: a memory's rank is the number of memories before it, those
    of a higher probability and those of an equal one and a lower index; a token's top-k are ranks 0 to k-1.
    probs [T, M] -> memories [T, k] by rank and their probabilities renormalised to sum to 1 (summed by rank,
    as the router sums them: fp32 sums in another order differ in the last bit)."""
    p, e = probs[:, :, None], torch.arange(probs.shape[1], device=probs.device)
    before = (probs[:, None, :] > p) | ((probs[:, None, :] == p) & (e[None, None, :] < e[None, :, None]))
    rank = before.sum(-1)  # [T, M], a permutation of 0..M-1 per token
    top_i = torch.stack([(rank == r).float().argmax(-1) for r in range(topk)], -1)
    top_p = probs.gather(1, top_i)
    return top_p / top_p.sum(-1, keepdim=True), top_i


def naive_mom(mom: MixtureOfMemories, x: torch.Tensor, host_kwargs: dict | None = None) -> torch.Tensor:
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing written out here.
    ``host_kwargs``: the host's own forward arguments ([B, ...] tensors, e.g. RWKV7's v_first)."""
    adapter = mom._adapter
    E, M = mom.num_slots_memories, mom.num_memories
    out = []
    with torch.no_grad():
        for b, xb in enumerate(x):
            T = xb.shape[0]
            probs = F.linear(xb.float(), mom.router.weight.float()).softmax(-1)
            top_p, top_i = routed(probs, mom.topk)
            layout = TokenLayout.build(1, T, xb.device)
            row_kwargs = {k: v[b:b + 1] for k, v in (host_kwargs or {}).items()}
            read = {**adapter.read(xb, layout, 'torch'), **adapter.host_inputs(row_kwargs, layout)}
            inputs = {'x': xb, **read}
            total = None
            for e in range(E):
                if e < M:
                    sel = (top_i == e).any(-1).nonzero().squeeze(1)
                    weight = (top_p * (top_i == e)).sum(-1)[sel]
                else:  # the shared memory: every token, weight 1
                    sel, weight = torch.arange(T, device=xb.device), torch.ones(T, device=xb.device)
                if sel.numel() == 0:
                    continue
                write = memory_write(mom, {k: v[sel] for k, v in inputs.items()}, e)
                # one segment of memory 0 in a bank of one: the adapter's reference recurrence on it
                n = sel.numel()
                zeros = torch.zeros(n, dtype=torch.long, device=xb.device)
                one = plan_dispatch(zeros[:, None], torch.ones(n, 1, device=xb.device), zeros, None, 1, 1)
                o, _ = adapter.recurrence({k: v[sel] for k, v in read.items()}, write, one, 'torch')
                o = o.double() * weight.double().view(-1, *[1] * (o.dim() - 1))
                if total is None:
                    total = torch.zeros(T, *o.shape[1:], dtype=torch.float64, device=xb.device)
                total[sel] += o
            out.append(adapter.finish(total.to(x.dtype), read, 'torch'))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ the checks

def _feed(convention, call, x, sizes, mask=None):
    """``call(x_chunk, cache, **kwargs)`` over consecutive chunks of x with one cache of the host's family:
    the outputs, concatenated. With ``mask``: the mask of everything seen so far, as generate() passes it."""
    cache, outs, start = convention.new_cache(x.shape[0], x.shape[1]), [], 0
    for n in sizes:
        kw = {} if mask is None else {'attention_mask': mask[:, :start + n]}
        outs.append(call(x[:, start:start + n], cache, **kw))
        start += n
    return torch.cat(outs, 1)


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A forward's output and the host's own extra outputs, flattened into one."""
    return torch.cat([t.flatten() for t in outputs])


def run_checks(factory: Callable[[], nn.Module], name: str | None = None, device: str = 'cpu',
               dtype: torch.dtype = torch.float32, interpret: bool = True,
               progress: Callable[[Result], None] | None = None, adapter: type | None = None) -> list[Result]:
    """Every check for the host ``factory()`` builds; ``interpret``: the host's own forward can run here (CUDA,
    or the CPU under TRITON_INTERPRET=1, where the adapter's ``host_forward_runs_on`` says it does); without it the
    checks against the host layer are skipped.
    ``progress``, if given, is called with each :class:`Result` as soon as its check is done. ``adapter``: the
    adapter class to wrap with (as ``MixtureOfMemories(..., adapter=)``: a variant, or one not registered);
    default: the registered one."""
    host0 = factory().to(device, dtype)
    name = name or type(host0).__name__
    adapter_cls, adapter = adapter, adapter_for(host0, adapter)
    interpret = interpret and adapter.host_forward_runs_on(torch.device(device))

    def wrap(host, **kw):
        return _wrap(host, adapter=adapter_cls, **kw)
    hidden = adapter.hidden_size
    tol = TOL[dtype]
    host_tol = tol + adapter.host_kernel_rounding(torch.device(device), dtype)  # where the host's kernels run
    results = []

    def add(result: Result) -> None:
        results.append(result)
        if progress is not None:
            progress(result)

    convention = adapter.convention

    def run(layer, x, **kwargs):
        """A forward with the example host's own arguments (adapter.example_inputs) -> [output, *extras]."""
        return convention.outputs(layer(x, **kwargs, **adapter.example_inputs(x)))

    def record(check, got, want, t=tol, detail=''):
        add(Result(name, check, rel_err(got, want), t, detail))

    def new(**kw):
        return wrap(factory().to(device, dtype), **kw).eval()

    g = torch.Generator(device='cpu').manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = randn(2, 20, hidden)
    with torch.no_grad():
        if interpret:
            for backend in ('torch', 'triton'):
                host = factory().to(device, dtype).eval()
                want = _flat(run(copy.deepcopy(host), x))
                mom = wrap(host, num_memories=1, topk=1, shared=False, init='copy', backend=backend).eval()
                record(f'one_memory_equals_host[{backend}]', _flat(run(mom, x)), want, host_tol)
            host = factory().to(device, dtype).eval()
            want = _flat(run(copy.deepcopy(host), x))
            mom = wrap(host, num_memories=3, topk=3, shared=False, init='copy').eval()
            record('topk_copies_equal_host', _flat(run(mom, x)), want, host_tol)
            host = factory().to(device, dtype).eval()
            want = _flat(run(copy.deepcopy(host), x))
            record('preserve_equals_host', _flat(run(wrap(host, init='preserve').eval(), x)), want, host_tol)
            for label, make in adapter.example_models().items():
                record(f'model_one_memory_equals_host[{label}]',
                       *_one_memory_model(make, device, dtype, adapter_cls, g), host_tol)
        for shared in (False, True):
            mom = new(shared=shared)
            record(f'naive_loop[shared={shared}]', run(mom, x)[0], naive_mom(mom, x, adapter.example_inputs(x)))

        mom = new()
        full = run(mom, x)[0]
        # the checks below route the same tokens in calls of other shapes: the router's fp32 rounding may move
        # their weights by up to routing_rounding (above fp64's tolerance, far below fp32's and bf16's)
        shapes = tol + routing_rounding(mom, x)
        y = x.clone()
        y[:, 12:] = randn(2, 8, hidden)
        record('causal', run(mom, y)[0][:, :12], full[:, :12])
        record('batch_rows_independent', torch.cat([run(mom, x[b:b + 1])[0] for b in range(2)]), full, shapes)
        cu = torch.tensor([0, 7, 8, 20], device=device)
        packed = run(mom, x[:1], **convention.packed_kwargs(cu))[0][0]
        record('packed_sequences', packed,
               torch.cat([run(mom, x[:1, s:e])[0][0] for s, e in zip(cu[:-1], cu[1:])]), shapes)

        def call(xc, cache, **kw):
            return convention.call_cached(mom, xc, cache, **kw, **adapter.example_inputs(xc))
        record('cached_chunks_equal_full_forward', _feed(convention, call, x, [9, 1, 1, 6, 1, 2]), full, shapes)
        if convention.padding_mask:  # (mamba-ssm's layers take no padding mask)
            lengths = [20, 11]
            mask = torch.zeros(2, 20, dtype=torch.long, device=device)
            xp = x.clone()
            for b, n in enumerate(lengths):
                mask[b, 20 - n:] = 1
                xp[b, :20 - n] = float('nan')  # padding content must not matter, not even NaN
            out = run(mom, xp, attention_mask=mask)[0]
            record('left_padding', torch.cat([out[b, 20 - n:] for b, n in enumerate(lengths)]),
                   torch.cat([run(mom, x[b:b + 1, 20 - n:])[0][0] for b, n in enumerate(lengths)]), shapes)
            record('cached_chunks_with_padding', _feed(convention, call, xp, [9, 1, 1, 6, 1, 2], mask)[mask.bool()],
                   out[mask.bool()], shapes)

    mom = new().train()
    xg = x.clone().requires_grad_()
    run(mom, xg)[0].square().mean().backward()
    missing = [n for n, p in mom.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    add(Result(name, 'every_parameter_gets_a_gradient', float(bool(missing)), 0.0, ', '.join(missing)))
    # init="preserve": the routed memories' silenced stage starts at zero and still gets gradients
    mom = wrap(factory().to(device, dtype), init='preserve').train()
    run(mom, x.clone().requires_grad_())[0].square().mean().backward()
    grads = mom.memories.last_stage(adapter.silent_projection, grads=True)
    moved = bool(grads) and all(g[:mom.num_memories].abs().sum() > 0 for g in grads)
    add(Result(name, 'preserve_routed_memories_get_gradients', float(not moved), 0.0))

    if device == 'cuda':
        for result in _gpu_checks(factory, name, interpret, adapter_cls):
            add(result)
    return results


def _one_memory_model(make: Callable[[], nn.Module], device, dtype, adapter: type | None,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits of ``make()``'s model converted with one-memory copies, its logits before) for 2 x 12 token ids:
    the host layers inside their model, with the settings the model gives them."""
    from mom_wrap.convert import convert
    model = make().to(device, dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g).to(device)
    want = model(ids).logits
    convert(model, num_memories=1, topk=1, shared_memory=False, init='copy', balance_loss_weight=0.0, adapter=adapter)
    return model(ids).logits, want


def _gpu_checks(factory, name: str, interpret: bool, adapter_cls: type | None = None) -> list[Result]:
    results = []
    adapter = adapter_for(factory(), adapter_cls)

    def wrap(host, **kw):
        return _wrap(host, adapter=adapter_cls, **kw)
    hidden = adapter.hidden_size
    for dtype in (torch.float32, torch.bfloat16):
        mom = wrap(factory().to('cuda', dtype)).train()
        x = torch.randn(2, 256, hidden, device='cuda', dtype=dtype)
        dy = torch.randn_like(x)
        runs = {}
        for backend in ('torch', 'triton'):
            mom.backend = backend
            xi = x.clone().requires_grad_()
            y = adapter.convention.outputs(mom(xi, **adapter.example_inputs(x)))[0]
            y.backward(dy)
            runs[backend] = [y.detach(), xi.grad] + [p.grad.clone() for p in mom.parameters()]
            mom.zero_grad()
        names = ['output', 'input grad'] + [f'{n} grad' for n, _ in mom.named_parameters()]
        err, worst = max((norm_rel_err(a, b), n) for a, b, n in zip(runs['triton'], runs['torch'], names))
        results.append(Result(name, f'triton_vs_torch[{str(dtype)[6:]}]', err,
                              GPU_TOL[dtype] + adapter.host_kernel_rounding(torch.device('cuda'), dtype),
                              f'worst: {worst}'))
    if interpret:  # in bf16: some hosts' chunk kernels refuse fp32 (fla 0.6's DeltaNet)
        host = factory().to('cuda', torch.bfloat16).train()
        ref = copy.deepcopy(host)
        mom = wrap(host, num_memories=1, topk=1, shared=False, init='copy', backend='triton').train()
        x = torch.randn(2, 2048, hidden, device='cuda', dtype=torch.bfloat16)
        dy = torch.randn_like(x)

        def fwd_bwd(layer):
            xi = x.clone().requires_grad_()
            y = adapter.convention.outputs(layer(xi, **adapter.example_inputs(x)))[0]
            y.backward(dy)
            return y.detach(), xi.grad
        note = ''
        try:
            want = fwd_bwd(ref)
        except Exception as e:  # a host whose training path needs a package this machine lacks (fla's Mamba2's
            # fused path calls causal-conv1d's CUDA kernel): its eval path computes the same function, gradients too
            note = f'; the host ran in eval mode, its training path failed: {type(e).__name__}: {e}'
            want = fwd_bwd(ref.eval())
        err, worst = max((norm_rel_err(a, b), n) for a, b, n in zip(fwd_bwd(mom), want, ('output', 'input grad')))
        results.append(Result(name, 'one_memory_equals_host_training[bf16,T=2048]', err,
                              GPU_TOL[torch.bfloat16] + adapter.host_kernel_rounding(torch.device('cuda'),
                                                                                     torch.bfloat16),
                              f'worst: {worst}{note}'))
    return results


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, fp32): the GPU checks' measure, where TF32 and bf16 rounding spread over all
    elements (``rel_err``, the largest element's error, is the exact checks')."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def host_syncs(fn) -> list[str]:
    """The synchronizing CUDA operations ``fn()`` makes, as torch's sync debug mode reports them, and every
    wait for a CUDA event (``torch.cuda.Event.synchronize``, which that mode does not report: the plan's
    deferred sync, ``mom_wrap.dispatch.HostCounts``, is one)."""
    import warnings
    torch.cuda.synchronize()
    waits = []
    real = torch.cuda.Event.synchronize

    def synchronize(event):
        waits.append('torch.cuda.Event.synchronize')
        return real(event)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        torch.cuda.Event.synchronize = synchronize
        try:
            fn()
        finally:
            torch.cuda.Event.synchronize = real
            torch.cuda.set_sync_debug_mode('default')
    # (the mode's own "prototype feature" notice is a warning too: count only the reports)
    return [str(w.message) for w in caught if 'called a synchronizing CUDA operation' in str(w.message)] + waits
