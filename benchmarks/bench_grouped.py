"""The write side's grouped projection at fla's default GatedDeltaNet size: the grouped GEMM, the per-block
fallback (one product per memory) and the E-fold dense product (what unaligned widths used to take).

hidden 2048, 6 heads x 256, expand_v 2: k 1536 + v 3072 + a 6 + b 6 = 4620 fused columns (rows of 9240 bytes
in bf16, not a multiple of 16). M=4 top-2 + shared (E=5), B x T = 8 x 2048: S = 3 slots a token.

    python benchmarks/bench_grouped.py [--tokens 16384]
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import mom_wrap.ops as ops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tokens', type=int, default=8 * 2048)
    p.add_argument('--hidden', type=int, default=2048)
    p.add_argument('--width', type=int, default=4620)
    args = p.parse_args()
    torch.manual_seed(0)
    E, slots = 5, 3
    S = args.tokens * slots
    dev, dt = 'cuda', torch.bfloat16
    # slots sorted memory-major: the shared memory sees every token, the 4 routed ones share 2 slots a token
    counts = torch.tensor([args.tokens * 2 // 4] * 4 + [args.tokens])
    memory = torch.repeat_interleave(torch.arange(E), counts).to(dev)
    ends_cpu = counts.cumsum(0)
    ends = ends_cpu.to(dev, torch.int32)
    x = torch.randn(S, args.hidden, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(E, args.width, args.hidden, device=dev, dtype=dt) * args.hidden ** -0.5).requires_grad_()
    dy = torch.randn(S, args.width, device=dev, dtype=dt)

    def dense():  # every memory for every row, then a select: the old fallback
        y = (x @ w.reshape(E * args.width, -1).t()).view(S, E, args.width)
        return y.gather(1, memory.view(S, 1, 1).expand(-1, -1, args.width)).reshape(S, args.width)

    ok = ops._grouped_mm_ok

    def per_block():  # the fallback where torch has no sync-free grouped GEMM
        ops._grouped_mm_ok = lambda *a: False
        try:
            return ops.grouped_linear(x, w, memory, ends, ends_cpu)
        finally:
            ops._grouped_mm_ok = ok
    paths = {'grouped GEMM': lambda: ops.grouped_linear(x, w, memory, ends, ends_cpu),
             'per-block fallback': per_block, 'dense E-fold (old)': dense}
    assert ok(x, w), "expected torch's grouped GEMM for this input"
    ref = None
    rows = []
    for name, fn in paths.items():
        y = fn()
        ref = y.float() if ref is None else ref
        err = ((y.float() - ref).norm() / ref.norm()).item()

        def step():
            x.grad = w.grad = None
            fn().backward(dy)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        fwd = do_bench(fn, warmup=25, rep=200, return_mode='median')
        both = do_bench(step, warmup=25, rep=200, return_mode='median')
        rows.append((name, fwd, both, peak, err))
    print(f"{torch.cuda.get_device_name()}  S={S} slots, in {args.hidden}, out {args.width}, E={E}, bf16")
    print(f"{'path':<22}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}{'rel err':>10}")
    for name, fwd, both, peak, err in rows:
        print(f"{name:<22}{fwd:>9.2f}{both:>12.2f}{peak:>10.0f}{err:>10.1e}")


if __name__ == '__main__':
    main()
