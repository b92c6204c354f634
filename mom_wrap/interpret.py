"""Triton's interpreter and autotuner set up for the checks, the tests and the benchmarks: ``interpret_on_cpu``
(public as ``mom_wrap.interpret_on_cpu``) and ``first_config_only``.

Both must run before Triton (and so fla, mamba-ssm or mom_wrap's kernels) is imported, and ``import mom_wrap``
imports this module: so it imports nothing but the standard library at module import (not torch._dynamo
either: see ``mom_wrap.wrapper._run_eagerly``). It is not ``mom_wrap.check``, so that the package does not
import the module ``python -m mom_wrap.check`` runs (runpy warns when it finds it imported already).
"""
from __future__ import annotations

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
    enter the CUDA device of their input); and mamba-ssm's Mamba3 kernels with Triton's exact functions for their
    PTX approximations, without their casts to bf16 (``mom_wrap.kernels.mamba3_interpreter``). Call it before Triton
    (and so fla, mamba-ssm or mom_wrap's kernels) is imported."""
    import contextlib
    import importlib.util
    import types

    import torch

    os.environ.setdefault('TRITON_INTERPRET', '1')
    first_config_only()
    if 'selective_scan_cuda' not in sys.modules and importlib.util.find_spec('selective_scan_cuda') is None:
        sys.modules.setdefault('selective_scan_cuda', types.ModuleType('selective_scan_cuda'))
    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    if importlib.util.find_spec('mamba_ssm') is not None:  # its Mamba3 kernels: PTX approximations, bf16 dots
        from mom_wrap.kernels import mamba3_interpreter
        mamba3_interpreter.install()
