"""Our varlen scalar-decay kernel (``mom_wrap.kernels.scalar_decay``) against mamba-ssm's and fla's on the
same tokens: forward and forward+backward time, bf16.

Mamba2 at d_model 1024 (32 heads x 64, d_state 128, one group); B x T = 8 x 2048 tokens at top-2 + shared
memory: 49,152 slots in MoM's segment layout (4 routed memories + the shared one, per sequence: 40
segments; routed segments of random length around T/2, the shared memory's of T). The kernels:

* ``chunk_scalar_decay`` on the segments (what the Mamba2 adapter runs from cached states);
* mamba-ssm's ``mamba_chunk_scan_combined`` on the same slots as [1, S] packed with ``seq_idx`` (what the
  adapter runs for plain forwards), and as a plain batch [24, 2048] (the same number of tokens, no varlen);
* fla's ``chunk_simple_gla`` (the same recurrence, varlen) on the segments.

    python benchmarks/bench_scalar_decay.py [--batch 8 --seq-len 2048] [--json rows.json]
"""
from __future__ import annotations

import argparse

import torch
from record import Recorder  # benchmarks/ is the script's directory, so on sys.path
from triton.testing import do_bench


def segments(batch, seq_len, memories, topk, device):
    """cu_seqlens of MoM's layout: per sequence, each routed memory's share of its top-k slots (random) and the
    shared memory's whole sequence."""
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(batch):
        picks = torch.multinomial(torch.ones(seq_len, memories), topk, generator=g)
        lengths += torch.bincount(picks.flatten(), minlength=memories).tolist() + [seq_len]
    cu = torch.tensor([0] + lengths).cumsum(0)
    return cu.to(device), cu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--json', metavar='PATH', help='write the rows as JSON (one per kernel and mode: fwd, fwd+bwd)')
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('bench_scalar_decay.py needs a CUDA GPU')
    from mom_wrap.kernels.scalar_decay import chunk_scalar_decay

    H, P, N, G, dtype, dev = 32, 64, 128, 1, torch.bfloat16, 'cuda'
    cu, cu_cpu = segments(args.batch, args.seq_len, 4, 2, dev)
    S = int(cu_cpu[-1])
    torch.manual_seed(0)
    x = torch.randn(S, H, P, device=dev, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(S, H, device=dev) - 3)  # fp32, ~0.05
    A = -torch.rand(H, device=dev) * 8 - 1
    B = torch.randn(S, G, N, device=dev, dtype=dtype)
    C = torch.randn(S, G, N, device=dev, dtype=dtype)
    v, g = (x.float() * dt[..., None]).to(dtype), dt * A
    do = torch.randn(S, H, P, device=dev, dtype=dtype)
    seq_idx = torch.repeat_interleave(torch.arange(cu_cpu.numel() - 1, device=dev, dtype=torch.int32),
                                      (cu_cpu[1:] - cu_cpu[:-1]).to(dev))[None]

    def ours():
        return chunk_scalar_decay(C, B, v, g, cu, cu_cpu)[0]

    def mamba_packed():
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined(x[None], dt[None], A, B[None], C[None], 256, seq_idx=seq_idx)[0]

    rows = S // args.seq_len

    def mamba_plain():
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        T = args.seq_len
        return mamba_chunk_scan_combined(x[:rows * T].view(rows, T, H, P), dt[:rows * T].view(rows, T, H), A,
                                         B[:rows * T].view(rows, T, G, N), C[:rows * T].view(rows, T, G, N), 256)

    def fla_simple_gla():
        from fla.ops.simple_gla import chunk_simple_gla
        q, k = (t.expand(S, H, N)[None] for t in (C, B))  # fla takes q, k per head
        return chunk_simple_gla(q, k, v[None], g[None], scale=1.0, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)[0][0]

    leaves = (x, dt, B, C, v, g)
    results, failed = {}, {}
    kernels = (('mom_wrap chunk_scalar_decay (segments)', ours), ('mamba-ssm scan, seq_idx [1, S]', mamba_packed),
               (f'mamba-ssm scan, plain [{rows}, {args.seq_len}]', mamba_plain),
               ('fla chunk_simple_gla (segments)', fla_simple_gla))
    for name, fn in kernels:
        for t in leaves:
            t.requires_grad_(True)

        def step(fn=fn):
            y = fn()
            y.backward(do[:y.numel() // (H * P)].view_as(y))
        try:
            with torch.no_grad():
                fwd = do_bench(fn, warmup=10, rep=100, return_mode='median')
            both = do_bench(step, warmup=10, rep=100, return_mode='median')
        except Exception as e:  # a missing or failing library: report it, keep the others
            print(f"{name}: {type(e).__name__}: {e}")
            failed[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        results[name] = (fwd, both)
    print(f"\n{torch.cuda.get_device_name()}  bf16  {H} heads x {P}, d_state {N}  {S} slots in "
          f"{cu_cpu.numel() - 1} segments")
    ref = results.get(f'mamba-ssm scan, plain [{rows}, {args.seq_len}]', (None, None))[1]
    print(f"{'kernel':<44}{'fwd ms':>9}{'fwd+bwd ms':>12}{'x mamba plain':>15}")
    for name, (fwd, both) in results.items():
        print(f"{name:<44}{fwd:>9.3f}{both:>12.3f}{both / ref if ref else float('nan'):>15.2f}")
    if args.json:
        rec = Recorder(args.json, 'bench_scalar_decay')
        plain = results.get(f'mamba-ssm scan, plain [{rows}, {args.seq_len}]', (None, None))
        for name, _ in kernels:
            fwd, both = results.get(name, (None, None))
            for i, (mode, ms) in enumerate((('fwd', fwd), ('fwd+bwd', both))):
                case = {'batch': args.batch, 'seq_len': args.seq_len, 'slots': S, 'segments': cu_cpu.numel() - 1,
                        'memories': 4, 'topk': 2, 'shared_memory': True, 'heads': H, 'head_dim': P,
                        'd_state': N, 'groups': G, 'mode': mode, 'dtype': 'bf16'}
                rec.add(name, name.split(' ')[0], 'Mamba2', case, ms, None, failed.get(name, 'ok'),
                        ref={'ms': plain[i], 'peak_mib': None})
        print(args.json)


if __name__ == '__main__':
    main()
