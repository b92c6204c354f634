"""Forward+backward time and peak memory: a host layer vs its MixtureOfMemories wrapper (vs fla MomAttention
for GatedDeltaNet).

The paper's 340M layer size (hidden 1024, 4 heads; GatedDeltaNet: 4 x 256, expand_v 1; the other hosts
their default head sizes), M=4, top-2, shared memory, bf16, all layers measured in one run on one GPU;
ratios are against the plain host layer.

    python benchmarks/bench_layer.py [--host GatedDeltaNet|GatedLinearAttention|DeltaNet|RWKV6Attention|
                                             RWKV7Attention|Mamba2]
                                     [--batch 8 --seq-len 2048 --iters 20] [--profile]
"""
from __future__ import annotations

import argparse

import torch

from mom_wrap import MixtureOfMemories


def host_factory(host, hidden, heads, head_dim):
    """A function making the plain host layer (layer_idx 0)."""
    if host == 'Mamba2':  # mamba-ssm's defaults at this width: 32 heads x 64, d_state 128 (no fused path:
        # it needs the causal-conv1d CUDA package, and the wrapper computes the layer itself either way)
        from mamba_ssm.modules.mamba2 import Mamba2
        return lambda: Mamba2(d_model=hidden, layer_idx=0, use_mem_eff_path=False)
    import fla.layers as L
    if host == 'GatedDeltaNet':
        return lambda: L.GatedDeltaNet(hidden_size=hidden, head_dim=head_dim, num_heads=heads, expand_v=1,
                                       layer_idx=0)
    if host == 'RWKV7Attention':  # layer 1 of 2: like most layers of a model, it takes v_first (head_dim 64)
        return lambda: L.RWKV7Attention(hidden_size=hidden, layer_idx=1, num_hidden_layers=2)
    if host in ('GatedLinearAttention', 'DeltaNet', 'RWKV6Attention'):
        return lambda: getattr(L, host)(hidden_size=hidden, num_heads=heads, layer_idx=0)
    raise SystemExit(f"--host: unknown host {host!r}")


def output(result):
    """The output tensor of a host's return value: fla's layers return a tuple, mamba-ssm's the tensor."""
    return result if isinstance(result, torch.Tensor) else result[0]


def host_kwargs(host, x):
    """The host forward's own arguments besides x: RWKV7's layer 1 takes v_first [B, T, hidden]."""
    return {'v_first': torch.randn_like(x).detach()} if host == 'RWKV7Attention' else {}


def layers(hidden, heads, head_dim, memories, topk, dtype, host='GatedDeltaNet'):
    make = host_factory(host, hidden, heads, head_dim)
    made = {f'{host} (host)': make(),
            f'mom_wrap MoM({host})': MixtureOfMemories(make(), num_memories=memories, topk=topk, shared_memory=True)}
    if host == 'GatedDeltaNet':
        from fla.layers.mom import MomAttention
        made['fla MomAttention'] = MomAttention(hidden_size=hidden, head_dim=head_dim, num_heads=heads, expand_v=1,
                                                layer_idx=0, num_memories=memories, topk=topk, shared_mem=True)
    return {name: m.to('cuda', dtype).train() for name, m in made.items()}


def measure(layer, x, dy, iters, **kwargs):
    """Mean fwd+bwd milliseconds over ``iters`` (after warm-up) and peak memory above the inputs (MiB)."""
    def step():
        x.grad = None
        output(layer(x, **kwargs)).backward(dy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**20


def profile(layer, x, dy, rows=25, **kwargs):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            output(layer(x, **kwargs)).backward(dy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', default='GatedDeltaNet')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--hidden', type=int, default=1024)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--head-dim', type=int, default=256)
    p.add_argument('--memories', type=int, default=4)
    p.add_argument('--topk', type=int, default=2)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--profile', action='store_true', help='print the CUDA kernel table of the MoM layer')
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('bench_layer.py needs a CUDA GPU')

    torch.manual_seed(0)
    dtype = torch.bfloat16
    x = torch.randn(args.batch, args.seq_len, args.hidden, device='cuda', dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    kwargs = host_kwargs(args.host, x)
    results = {}
    for name, layer in layers(args.hidden, args.heads, args.head_dim, args.memories, args.topk, dtype,
                              args.host).items():
        results[name] = measure(layer, x, dy, args.iters, **kwargs)
        if args.profile and name.startswith('mom_wrap'):
            profile(layer, x, dy, **kwargs)
        del layer
        torch.cuda.empty_cache()

    host_ms, host_mem = results[f'{args.host} (host)']
    print(f"\n{torch.cuda.get_device_name()}  bf16  B x T = {args.batch} x {args.seq_len}  hidden {args.hidden}  "
          f"{args.heads} heads  M={args.memories} top-{args.topk} + shared")
    print(f"{'layer':<36}{'fwd+bwd ms':>12}{'x host':>9}{'peak MiB':>11}{'x host':>9}")
    for name, (ms, mem) in results.items():
        print(f"{name:<36}{ms:>12.2f}{ms / host_ms:>9.2f}{mem:>11.0f}{mem / host_mem:>9.2f}")
    if 'fla MomAttention' in results:
        ours, fla_mom = results[f'mom_wrap MoM({args.host})'][0], results['fla MomAttention'][0]
        print(f"mom_wrap vs fla MomAttention: {fla_mom / ours:.2f}x faster")


if __name__ == '__main__':
    main()
