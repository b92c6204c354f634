"""Where the host (CPU) time of one training step goes: py-spy samples of a layer's fwd+bwd loop, per function.

A layer of bench_layer.py (the host, or ours with ``--parts N``) runs fwd+bwd in a loop in a child process; once
it is warm (kernels compiled, autotuned), ``py-spy record`` samples every thread of it for ``--seconds`` (the
autograd engine runs the backward on a thread of its own), and the samples are summed per function: its own
time ("self") and its time with everything it called ("inclusive"), as percentages of the samples and as
milliseconds per step. At a small input (the default 1 x 64) the GPU work is negligible, so a step's time is its
host time: what a step costs the host before any kernel runs late.

    pip install py-spy     # (optional dependency; a wheel for the GPU machine: see the device notes)
    python benchmarks/host_profile.py [--host GatedDeltaNet] [--layer mom|host] [--parts N] [--batch 1 --seq-len 64]
                                      [--seconds 10] [--rows 40] [--raw FILE]

``--aggregate FILE`` prints the tables of a raw py-spy file (``py-spy record -f raw``) without running anything
(on any machine). py-spy samples a running process from outside (ptrace), so it needs the permission to trace
its own child (root on the GPU machines; otherwise ``kernel.yama.ptrace_scope`` 0 or 1).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

FRAME = re.compile(r'^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$')
REPO_PATH = re.compile(r'^.*?/(mom_wrap|benchmarks|tests)/')


def aggregate(lines) -> tuple[int, collections.Counter, collections.Counter]:
    """py-spy's raw (collapsed) stacks -> (samples, self counts, inclusive counts) per ``file:function``. A
    line is ``thread;frame;...;frame count``, a frame ``function (path:line)``, the innermost last; paths are
    cut to what follows ``site-packages/`` (or the repository root), so a function is named the same on every
    machine. A function on a stack twice (recursion) counts once there."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in lines:
        stack, _, count = line.rstrip('\n').rpartition(' ')
        if not stack or not count.isdigit():
            continue
        names = []
        for frame in stack.split(';')[1:]:  # the first entry names the thread
            m = FRAME.match(frame)
            if m:
                path = REPO_PATH.sub(r'\1/', m.group('file').split('site-packages/')[-1])
                names.append(f"{path}:{m.group('name')}")
            else:
                names.append(frame)
        n = int(count)
        total += n
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    return total, own, inclusive


def report(total: int, own: collections.Counter, inclusive: collections.Counter, rows: int,
           ms_per_sample: float | None = None) -> str:
    """The two tables, most time first: share of the samples (and milliseconds per step, where known)."""
    out = [f"{total} samples"]
    for title, counts in (('self', own), ('inclusive', inclusive)):
        out.append(f"\n== {title}: the {rows} functions with the most samples")
        for name, n in counts.most_common(rows):
            ms = f"{n * ms_per_sample:8.3f} ms/step  " if ms_per_sample else ''
            out.append(f"{100 * n / max(total, 1):6.2f}%  {ms}{name}")
    return '\n'.join(out)


def child(args) -> None:
    """The profiled process: warm up, say so through ``args.ready``, then run steps for ``args.seconds`` + 3 s
    and write how many steps ran and for how long to ``args.ready`` + '.steps'."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_layer import fwd_bwd, host_factory, host_kwargs

    from mom_wrap import MixtureOfMemories
    torch.manual_seed(0)
    layer = host_factory(args.host, 1024, 4, 256)()
    if args.layer == 'mom':
        layer = MixtureOfMemories(layer, num_memories=4, topk=2, shared_memory=True, recurrence_parts=args.parts)
    layer = layer.to('cuda', torch.bfloat16).train()
    x = torch.randn(args.batch, args.seq_len, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    kwargs = host_kwargs(args.host, x)

    def step():
        fwd_bwd(layer, x, dy, **kwargs)
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    with open(args.ready, 'w') as f:
        f.write('warm')
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds + 3:
        step()
        steps += 1
    torch.cuda.synchronize()
    with open(args.ready + '.steps', 'w') as f:
        f.write(f"{steps} {time.perf_counter() - start}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', default='GatedDeltaNet')
    p.add_argument('--layer', choices=('mom', 'host'), default='mom', help='ours (default) or the plain host layer')
    p.add_argument('--parts', type=int, default=1, help="ours: recurrence_parts")
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--seconds', type=int, default=10, help='how long py-spy samples (whole seconds: py-spy takes no others)')
    p.add_argument('--rate', type=int, default=250, help='samples per second')
    p.add_argument('--rows', type=int, default=40)
    p.add_argument('--raw', metavar='FILE', help="keep py-spy's raw samples here")
    p.add_argument('--aggregate', metavar='FILE', help="only print the tables of a raw py-spy file")
    p.add_argument('--child', metavar='READY', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.aggregate:
        with open(args.aggregate) as f:
            print(report(*aggregate(f), args.rows))
        return 0
    if args.child:
        args.ready = args.child
        child(args)
        return 0
    spy = shutil.which('py-spy')
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        ready, raw = os.path.join(tmp, 'ready'), args.raw or os.path.join(tmp, 'samples.txt')
        argv = [sys.executable, os.path.abspath(__file__), '--child', ready, '--host', args.host, '--layer',
                args.layer, '--parts', str(args.parts), '--batch', str(args.batch), '--seq-len', str(args.seq_len),
                '--seconds', str(args.seconds)]
        proc = subprocess.Popen(argv)
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise SystemExit(f"the profiled process ended early (exit {proc.returncode})")
            time.sleep(0.2)
        subprocess.run([spy, 'record', '-r', str(args.rate), '-f', 'raw', '-d', str(args.seconds), '-p',
                        str(proc.pid), '-o', raw], check=True)
        if proc.wait() != 0:
            raise SystemExit(f"the profiled process failed (exit {proc.returncode})")
        with open(ready + '.steps') as f:
            steps, seconds = f.read().split()
        ms_per_step = 1e3 * float(seconds) / int(steps)
        with open(raw) as f:
            total, own, inclusive = aggregate(f)
    # one sample of one thread stands for 1 / rate s of that thread's time; the window held seconds / step steps
    per_sample = ms_per_step / (args.rate * args.seconds)
    layer = f"{'MoM(' + args.host + ')' if args.layer == 'mom' else args.host} parts={args.parts}"
    print(f"{layer}  B x T = {args.batch} x {args.seq_len}: {ms_per_step:.2f} ms per step ({steps} steps)")
    print(report(total, own, inclusive, args.rows, per_sample))
    return 0


if __name__ == '__main__':
    sys.exit(main())
