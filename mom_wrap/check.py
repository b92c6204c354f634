"""``python -m mom_wrap.check [HOST ...] [--device cpu|cuda]``: the parity checks of ``mom_wrap.testing`` for
every supported host that is installed (or the named ones: a class name such as ``GatedDeltaNet``, or the
dotted path ``supported_hosts()`` lists), printed as one table. Exit status 1 on any failure.

On the CPU the host layers' own forwards run through Triton's interpreter (set here before Triton is
imported), as the tests do.
"""
from __future__ import annotations

import argparse
import os
import sys


def first_config_only() -> None:
    """Make Triton's autotuner take the first of each kernel's configs instead of compiling and timing them
    all. The checks' results do not depend on the config; a fresh GPU then spends seconds per host instead of
    the minutes autotuning fla's kernels takes (and under the interpreter timings mean nothing: running each
    config once cost fla's recurrent RWKV7 kernel, 36 configs, half a minute).

    A config the GPU cannot launch (more shared memory than the card has: mamba-ssm's first configs on an
    H100/H200) is skipped for the next one. A single config is never timed, so nothing of this reaches
    Triton's on-disk autotune cache."""
    from triton.runtime import autotuner
    from triton.runtime.errors import OutOfResources

    prune, run = autotuner.Autotuner.prune_configs, autotuner.Autotuner.run

    def first(self, *args, **kwargs):
        configs = prune(self, *args, **kwargs)
        return configs[min(getattr(self, 'mom_skip', 0), len(configs) - 1):][:1]

    def run_next_if_too_big(self, *args, **kwargs):
        while True:
            try:
                return run(self, *args, **kwargs)
            except OutOfResources:
                self.mom_skip = getattr(self, 'mom_skip', 0) + 1
                if self.mom_skip >= len(self.configs):
                    raise
                self.cache.clear()  # forget the config that did not fit

    autotuner.Autotuner.prune_configs, autotuner.Autotuner.run = first, run_next_if_too_big


def interpret_on_cpu() -> None:
    """TRITON_INTERPRET=1 and ``first_config_only``; and for a mamba-ssm built without its CUDA extensions
    (``MAMBA_SKIP_CUDA_BUILD``): an empty ``selective_scan_cuda`` module (mamba-ssm 2.3 imports it with the
    package; only Mamba1 calls it) and ``torch.cuda.device`` as a no-op context (mamba-ssm's Triton kernels
    enter the CUDA device of their input). Call it before Triton (and so fla, mamba-ssm or mom_wrap's
    kernels) is imported."""
    import contextlib
    import importlib.util
    import types

    import torch

    os.environ.setdefault('TRITON_INTERPRET', '1')
    first_config_only()
    if 'selective_scan_cuda' not in sys.modules and importlib.util.find_spec('selective_scan_cuda') is None:
        sys.modules.setdefault('selective_scan_cuda', types.ModuleType('selective_scan_cuda'))
    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m mom_wrap.check', description=__doc__.splitlines()[0])
    p.add_argument('hosts', nargs='*', help='host class names or dotted paths (default: every installed one)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--first-config', action='store_true',
                   help="on CUDA: run each Triton kernel's first config instead of autotuning (a fresh GPU "
                        "otherwise autotunes fla's kernels for minutes; the CPU always does this)")
    p.add_argument('--tf32', action='store_true',
                   help="on CUDA: leave Triton's fp32 dot products in TF32 (fla's default) instead of IEEE fp32")
    args = p.parse_args(argv)
    if args.device == 'cpu':
        interpret_on_cpu()
    else:
        # IEEE fp32 dots (before any kernel compiles), so that the fp32 checks test the code, not TF32's
        # rounding: with TF32 the decay parameters' gradients at the example shapes differ by up to 5e-2
        # (GatedDeltaNet's A_log; 9e-5 with IEEE dots, H200). The bf16 checks test the real precision.
        if not args.tf32:
            os.environ.setdefault('TRITON_F32_DEFAULT', 'ieee')
        if args.first_config:
            first_config_only()

    from mom_wrap.adapters.base import _REGISTRY
    from mom_wrap.testing import run_checks

    adapters = [a for a in _REGISTRY if a.load_host_class() is not None]
    if args.hosts:
        wanted = set(args.hosts)
        unknown = wanted - {a.host_class for a in adapters} - {a.host_class.rpartition('.')[2] for a in adapters}
        if unknown:
            p.error(f"unknown or not installed host(s): {', '.join(sorted(unknown))}; "
                    f"installed: {', '.join(a.host_class for a in adapters)}")
        adapters = [a for a in adapters if a.host_class in wanted or a.host_class.rpartition('.')[2] in wanted]
    results = []
    for adapter in adapters:  # each host's rows as soon as they are done: a later host may run out of time
        name = adapter.host_class.rpartition('.')[2]
        print(f"checking {name} on {args.device} ...", file=sys.stderr, flush=True)
        rows = run_checks(adapter.example_host, name, device=args.device)
        _table(rows, header=not results)
        results += rows
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _table(results, header: bool) -> None:
    if header:
        print(f"{'host':<22}{'check':<46}{'max rel err':>12}{'tolerance':>11}  result")
    for r in results:
        print(f"{r.host:<22}{r.check:<46}{r.error:>12.1e}{r.tolerance:>11.0e}  "
              f"{'pass' if r.passed else 'FAIL'}{'  ' + r.detail if r.detail else ''}", flush=True)


if __name__ == '__main__':
    sys.exit(main())
