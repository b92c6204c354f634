"""Decode ms/step after a 512-token prompt: MixtureOfMemories(host) vs the host (vs fla MomAttention for
GatedDeltaNet), bf16, hidden 1024, the host at bench_layer's size (GatedDeltaNet: 4 heads x 256), M=4, top-2 +
shared, batch sizes 1 / 16 / 64, one run.

Eager steps for all the layers (taking turns, round by round); ours and the host's also as a replayed CUDA graph of
one step. Each number is the median of 5 rounds of --steps steps. Each layer is called the host's way (its
convention, ``mom_wrap.calls``: fla's Cache, mamba-ssm's InferenceParams) with the host's own arguments (RWKV7's
v_first, HGRN2's lower bound); a layer whose step fails (mamba-ssm's Mamba3 decodes with CuTe only) gets a failed
row and the others are still timed.

    python benchmarks/bench_decode.py [--host GatedDeltaNet|...|Mamba3] [--prompt 512 --batch 1 16 64 --steps 50]
                                      [--json rows.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from bench_layer import HEAD_DIM_HOSTS, host_kwargs, interleaved, layers, role, timed  # (benchmarks/: on sys.path)
from record import Recorder

from mom_wrap import MixtureOfMemories

HIDDEN = 1024


def make_layers(host, memories, topk):
    """bench_layer's layers of ``host``, in eval mode."""
    made = layers(hidden=HIDDEN, heads=4, head_dim=256, memories=memories, topk=topk, dtype=torch.bfloat16, host=host)
    return {name: layer.eval() for name, layer in made.items()}


def convention_of(layers):
    """How the host is called (its wrapper's adapter knows): every layer of the run is called that way."""
    return next(m for m in layers.values() if isinstance(m, MixtureOfMemories))._adapter.convention


def prefill(layer, convention, kwargs, batch, prompt, hidden=HIDDEN, device='cuda', dtype=torch.bfloat16):
    """A fresh cache after a ``prompt``-token prompt through ``layer``; ``kwargs``: the host's own arguments."""
    cache = convention.new_cache(batch, prompt + 100_000)
    x = torch.randn(batch, prompt, hidden, device=device, dtype=dtype)
    convention.call_cached(layer, x, cache, **kwargs(x))
    return cache


def stepper(layer, convention, cache, x, kwargs):
    """One decode step of ``x`` [B, 1, hidden] (the cache advanced), as a function of nothing."""
    kw = kwargs(x)
    return lambda: convention.call_cached(layer, x, cache, **kw)


ROUNDS = 5


def time_graph(step, steps):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    return statistics.median_high([timed(graph.replay, steps)[0] for _ in range(ROUNDS)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', default='GatedDeltaNet', help="bench_layer.py's --host names")
    p.add_argument('--prompt', type=int, default=512)
    p.add_argument('--batch', type=int, nargs='+', default=[1, 16, 64])
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--memories', type=int, default=4)
    p.add_argument('--topk', type=int, default=2)
    p.add_argument('--profile', action='store_true', help="also print the CUDA kernels one eager step of ours launches")
    p.add_argument('--json', metavar='PATH', help='write the rows as JSON (one per layer, batch size and mode)')
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('bench_decode.py needs a CUDA GPU')
    torch.manual_seed(0)
    layers = make_layers(args.host, args.memories, args.topk)
    convention = convention_of(layers)
    kwargs = lambda x: host_kwargs(args.host, x)  # noqa: E731
    rec = Recorder(args.json, 'bench_decode') if args.json else None
    rows = []
    with torch.no_grad():
        for batch in args.batch:
            x = torch.randn(batch, 1, HIDDEN, device='cuda', dtype=torch.bfloat16)
            # eager steps, the layers taking turns (bench_layer.interleaved): an eager step is bound by the host's
            # Python and launch overhead, which drifts over seconds; turns expose every layer to the same drift
            steppers, eager = {}, {}
            for name, layer in layers.items():
                try:
                    steppers[name] = stepper(layer, convention, prefill(layer, convention, kwargs, batch,
                                                                        args.prompt), x, kwargs)
                except Exception as e:  # report, keep measuring the others
                    eager[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            for name, (ms, _, status) in interleaved(steppers, args.steps, ROUNDS, warmup=5).items():
                eager[name] = ms if ms is not None else status
            for name, layer in layers.items():
                row = {'layer': name, 'B': batch, 'eager': eager[name]}
                if isinstance(eager[name], float) and not name.startswith('fla MomAttention'):
                    try:
                        row['graph'] = time_graph(stepper(layer, convention, prefill(layer, convention, kwargs, batch,
                                                                                     args.prompt), x, kwargs),
                                                  args.steps)
                    except Exception as e:  # report, keep measuring the others
                        row['graph'] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
                print(row, flush=True)  # partial results survive a time limit
                if rec is not None:  # the host's row comes first
                    record(rec, args, row, next(r for r in rows if r['B'] == batch and role(r['layer']) == 'host'))
    print(f"\n{torch.cuda.get_device_name()}  bf16  decode after a {args.prompt}-token prompt  hidden {HIDDEN}  "
          f"{args.host}  M={args.memories} top-{args.topk} + shared")
    print(f"{'layer':<34}{'B':>4}{'eager ms':>10}{'x host':>8}{'graph ms':>10}{'x host':>8}")
    host = {r['B']: r for r in rows if role(r['layer']) == 'host'}
    for r in rows:
        cells = []
        for mode in ('eager', 'graph'):
            v, h = r.get(mode, '-'), host[r['B']].get(mode)
            if isinstance(v, float):
                cells.append(f"{v:>10.3f}" + (f"{v / h:>8.2f}" if isinstance(h, float) else f"{'-':>8}"))
            else:
                cells.append(f"{'-':>10}{'-':>8}" if v == '-' else f"  {v}")
        print(f"{r['layer']:<34}{r['B']:>4}" + ''.join(cells))
    if args.json:
        print(args.json)
    if args.profile:
        profile_step(layers, convention, kwargs, args.host, args.prompt, args.batch)


def record(rec, args, r, host):
    """JSON rows of one printed row ``r``: one per mode (eager, graph), ratios against the host's row."""
    for mode in ('eager', 'graph'):
        if mode not in r:
            continue  # fla's MomAttention is timed eagerly only
        v, h = r[mode], host.get(mode)
        case = {'batch': r['B'], 'prompt': args.prompt, 'mode': f'decode step, {mode}', 'dtype': 'bf16',
                'hidden': HIDDEN, 'heads': 4, 'head_dim': 256 if args.host in HEAD_DIM_HOSTS else None,
                'memories': args.memories, 'topk': args.topk, 'shared_memory': True, 'steps': args.steps,
                'rounds': ROUNDS}
        ok = isinstance(v, float)
        rec.add(r['layer'], role(r['layer']), args.host, case, v if ok else None, None,
                'ok' if ok else v, ref={'ms': h if isinstance(h, float) else None, 'peak_mib': None})


def profile_step(layers, convention, kwargs, host, prompt, batches, steps=5):
    """Kernel launches and GPU time per eager decode step, ours and the host's: where fusion would pay."""
    from torch.profiler import ProfilerActivity, profile
    for batch in batches:
        x = torch.randn(batch, 1, HIDDEN, device='cuda', dtype=torch.bfloat16)
        for name in (f'{host} (host)', f'mom_wrap MoM({host})'):
            layer = layers[name]
            with torch.no_grad():
                step = stepper(layer, convention, prefill(layer, convention, kwargs, batch, prompt), x, kwargs)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        step()
                    torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            launches = sum(e.count for e in kernels) / steps
            gpu_us = sum(e.self_device_time_total for e in kernels) / steps
            print(f"\n{name} B={batch}: {launches:.0f} kernels, {gpu_us:.0f} us GPU time per step")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
                print(f"  {e.self_device_time_total / steps:8.1f} us  x{e.count // steps:<3} {e.key[:90]}")


if __name__ == '__main__':
    main()
