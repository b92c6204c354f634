"""Decode ms/step after a 512-token prompt: MixtureOfMemories(GatedDeltaNet) vs GatedDeltaNet vs fla
MomAttention, bf16, hidden 1024, 4 heads x 256, M=4, top-2 + shared, batch sizes 1 / 16 / 64, one run.

Eager steps for all three layers (taking turns, round by round); ours and the host's also as a replayed
CUDA graph of one step. Each number is the median of 5 rounds of --steps steps.

    python benchmarks/bench_decode.py [--prompt 512 --batch 1 16 64 --steps 50] [--json rows.json]
"""
from __future__ import annotations

import argparse

import torch
from bench_layer import layers, role  # benchmarks/ is the script's directory, so on sys.path
from fla.models.utils import Cache
from record import Recorder


def make_layers(memories, topk):
    """bench_layer's three layers, in eval mode."""
    made = layers(hidden=1024, heads=4, head_dim=256, memories=memories, topk=topk, dtype=torch.bfloat16)
    return {name: layer.eval() for name, layer in made.items()}


def prefill(layer, batch, prompt):
    cache = Cache()
    layer(torch.randn(batch, prompt, 1024, device='cuda', dtype=torch.bfloat16), past_key_values=cache, use_cache=True)
    return cache


ROUNDS = 5


def mean_ms(run, steps):
    """Mean milliseconds per call of ``steps`` calls of ``run``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def median(values):
    return sorted(values)[len(values) // 2]


def time_eager(layers, caches, x, steps):
    """name -> eager ms per step: the median of ROUNDS rounds, the layers taking turns within each round. An
    eager step is bound by the host's Python and launch overhead, which drifts over seconds; taking turns
    exposes every layer to the same drift, so the ratios hold better than the absolute times."""
    steppers = {name: (lambda layer=layer, cache=caches[name]: layer(x, past_key_values=cache, use_cache=True))
                for name, layer in layers.items()}
    for step in steppers.values():
        for _ in range(5):
            step()
    rounds = {name: [] for name in layers}
    for _ in range(ROUNDS):
        for name, step in steppers.items():
            rounds[name].append(mean_ms(step, steps))
    return {name: median(r) for name, r in rounds.items()}


def time_graph(layer, cache, x, steps):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            layer(x, past_key_values=cache, use_cache=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x, past_key_values=cache, use_cache=True)
    for _ in range(5):
        graph.replay()
    return median([mean_ms(graph.replay, steps) for _ in range(ROUNDS)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    layers = make_layers(args.memories, args.topk)
    rec = Recorder(args.json, 'bench_decode') if args.json else None
    rows = []
    with torch.no_grad():
        for batch in args.batch:
            x = torch.randn(batch, 1, 1024, device='cuda', dtype=torch.bfloat16)
            eager = time_eager(layers, {name: prefill(layer, batch, args.prompt) for name, layer in layers.items()},
                               x, args.steps)
            for name, layer in layers.items():
                row = {'layer': name, 'B': batch, 'eager': eager[name]}
                if not name.startswith('fla MomAttention'):
                    try:
                        row['graph'] = time_graph(layer, prefill(layer, batch, args.prompt), x, args.steps)
                    except Exception as e:  # report, keep measuring the others
                        row['graph'] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
                print(row, flush=True)  # partial results survive a time limit
                if rec is not None:  # the host's row comes first
                    record(rec, args, row, next(r for r in rows if r['B'] == batch and role(r['layer']) == 'host'))
    print(f"\n{torch.cuda.get_device_name()}  bf16  decode after a {args.prompt}-token prompt  hidden 1024  "
          f"4 heads x 256  M={args.memories} top-{args.topk} + shared")
    print(f"{'layer':<24}{'B':>4}{'eager ms':>10}{'x host':>8}{'graph ms':>10}{'x host':>8}")
    host = {r['B']: r for r in rows if r['layer'].startswith('GatedDeltaNet')}
    for r in rows:
        cells = []
        for mode in ('eager', 'graph'):
            v, h = r.get(mode, '-'), host[r['B']].get(mode)
            if isinstance(v, float):
                cells.append(f"{v:>10.3f}" + (f"{v / h:>8.2f}" if isinstance(h, float) else f"{'-':>8}"))
            else:
                cells.append(f"{'-':>10}{'-':>8}" if v == '-' else f"  {v}")
        print(f"{r['layer']:<24}{r['B']:>4}" + ''.join(cells))
    if args.json:
        print(args.json)
    if args.profile:
        profile_step(layers, args.prompt, args.batch)


def record(rec, args, r, host):
    """JSON rows of one printed row ``r``: one per mode (eager, graph), ratios against the host's row."""
    for mode in ('eager', 'graph'):
        if mode not in r:
            continue  # fla's MomAttention is timed eagerly only
        v, h = r[mode], host.get(mode)
        case = {'batch': r['B'], 'prompt': args.prompt, 'mode': f'decode step, {mode}', 'dtype': 'bf16',
                'hidden': 1024, 'heads': 4, 'head_dim': 256, 'memories': args.memories, 'topk': args.topk,
                'shared_memory': True, 'steps': args.steps, 'rounds': ROUNDS}
        ok = isinstance(v, float)
        rec.add(r['layer'], role(r['layer']), 'GatedDeltaNet', case, v if ok else None, None,
                'ok' if ok else v, ref={'ms': h if isinstance(h, float) else None, 'peak_mib': None})


def profile_step(layers, prompt, batches, steps=5):
    """Kernel launches and GPU time per eager decode step, ours and the host's: where fusion would pay."""
    from torch.profiler import ProfilerActivity, profile
    for batch in batches:
        x = torch.randn(batch, 1, 1024, device='cuda', dtype=torch.bfloat16)
        for name in ('GatedDeltaNet (host)', 'mom_wrap MoM(GatedDeltaNet)'):
            layer = layers[name]
            with torch.no_grad():
                cache = prefill(layer, batch, prompt)
                for _ in range(3):
                    layer(x, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        layer(x, past_key_values=cache, use_cache=True)
                    torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            launches = sum(e.count for e in kernels) / steps
            gpu_us = sum(e.self_device_time_total for e in kernels) / steps
            print(f"\n{name} B={batch}: {launches:.0f} kernels, {gpu_us:.0f} us GPU time per step")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
                print(f"  {e.self_device_time_total / steps:8.1f} us  x{e.count // steps:<3} {e.key[:90]}")


if __name__ == '__main__':
    main()
