"""Host-device syncs per training forward, per forward+backward and per decode step: each host's
MixtureOfMemories wrapper and the plain host layer.

The layers of bench_layer.py (hidden 1024, 4 heads; M=4, top-2, shared memory), bf16, B x T = 2 x 2048 for
training. The decode step is one token after a 16-token prefill into an fla ``Cache`` (eval, no grad).
Each count follows one warm-up of the same work (first-call probes and autotuning may sync) and is what
``torch.cuda.set_sync_debug_mode('warn')`` reports.

    python benchmarks/syncs.py [--host GatedDeltaNet --host DeltaNet ...]   (default: every host)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layer import fwd_bwd, host_factory, host_kwargs  # noqa: E402

from mom_wrap import MixtureOfMemories  # noqa: E402
from mom_wrap.interpret import first_config_only  # noqa: E402
from mom_wrap.testing import host_syncs  # noqa: E402

HOSTS = ('GatedLinearAttention', 'RWKV6Attention', 'RWKV7Attention', 'GatedDeltaNet', 'DeltaNet', 'Mamba2')
PREFILL = 16


def measure(layer, x, dy, kwargs) -> tuple[int, int, int]:
    """Syncs of one training forward, one forward+backward and one decode step (each after a warm-up).
    kwargs: the host forward's own arguments, [B, T, ...] tensors (RWKV7's v_first). The decode step goes
    through the cache of the host's family (``mom_wrap.calls``: fla's Cache, mamba-ssm's InferenceParams)."""
    from mom_wrap.adapters import adapter_for
    convention = layer._adapter.convention if isinstance(layer, MixtureOfMemories) else adapter_for(layer).convention

    def forward():
        layer(x, **kwargs)

    def forward_backward():
        fwd_bwd(layer, x, dy, **kwargs)

    layer.train()
    forward_backward()
    fwd = len(host_syncs(forward))
    step = len(host_syncs(forward_backward))

    layer.eval()
    prompt, token = x.detach()[:, :PREFILL], x.detach()[:, PREFILL:PREFILL + 1]
    prompt_kw = {k: v[:, :PREFILL] for k, v in kwargs.items()}
    token_kw = {k: v[:, PREFILL:PREFILL + 1] for k, v in kwargs.items()}
    with torch.no_grad():
        def prefill():
            cache = convention.new_cache(x.shape[0], PREFILL + 1)
            convention.call_cached(layer, prompt, cache, **prompt_kw)
            return cache

        convention.call_cached(layer, token, prefill(), **token_kw)
        cache = prefill()
        decode = len(host_syncs(lambda: convention.call_cached(layer, token, cache, **token_kw)))
    return fwd, step, decode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', action='append', choices=HOSTS, help='repeatable (default: all of them)')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--seq-len', type=int, default=2048)
    args = p.parse_args()
    if args.seq_len <= PREFILL:
        p.error(f'--seq-len must exceed the {PREFILL}-token prefill')
    if not torch.cuda.is_available():
        raise SystemExit('syncs.py needs a CUDA GPU')
    first_config_only()  # autotuning would only cost time here: the counts follow a warm-up either way

    hidden, heads, head_dim, dtype = 1024, 4, 256, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, hidden, device='cuda', dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    print(f"{torch.cuda.get_device_name()}  bf16  B x T = {args.batch} x {args.seq_len}  hidden {hidden}  "
          f"M=4 top-2 + shared  decode: 1 token after a {PREFILL}-token prefill")
    print(f"{'layer':<36}{'syncs/forward':>15}{'syncs/fwd+bwd':>15}{'syncs/decode step':>19}", flush=True)
    for host in args.host or HOSTS:
        make = host_factory(host, hidden, heads, head_dim)
        for name, build in ((f'{host} (host)', make),
                            (f'mom_wrap MoM({host})',
                             lambda: MixtureOfMemories(make(), num_memories=4, topk=2, shared_memory=True))):
            layer = build().to('cuda', dtype)
            fwd, step, decode = measure(layer, x, dy, host_kwargs(host, x))
            print(f"{name:<36}{fwd:>15}{step:>15}{decode:>19}", flush=True)  # row by row: a host may run long
            del layer
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
