"""mamba-ssm's Mamba3 Triton kernels under Triton's interpreter (the CPU): what ``mom_wrap.interpret_on_cpu`` swaps
in, so that the host layer and its wrapper run there as CI oracles. Nothing here runs on a GPU.

Two things stop them on the CPU (reproduced in tests/test_host_mamba3.py):

* the kernels call PTX approximations (``cos_approx``, ``sin_approx``, ``tanh_approx``, ``sech2_approx``: inline
  asm, which the interpreter refuses): each kernel module's is swapped for Triton's exact function below;
* ``mamba3_siso_combined`` casts q, k, v, trap, angles and z to bf16, and the interpreter computes ``tl.dot`` of
  bf16 blocks wrongly (Triton 3.x): ``combined_in_input_dtypes`` is the same call without those casts (the
  kernels then compute in the inputs' dtype, fp32 in the tests).
"""
from __future__ import annotations

import importlib
import sys

import triton
import triton.language as tl

KERNEL_MODULES = ('angle_dt', 'mamba3_siso_fwd', 'mamba3_siso_bwd', 'mamba3_siso_step')
PACKAGE = 'mamba_ssm.ops.triton.mamba3'
# the modules that take mamba3_siso_combined by name (the host layers), patched where imported already
USERS = ('mamba_ssm.modules.mamba3', 'fla.layers.mamba3')


@triton.jit
def cos_exact(x):
    return tl.cos(x)


@triton.jit
def sin_exact(x):
    return tl.sin(x)


@triton.jit
def tanh_exact(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def sech2_exact(x):
    t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return 1.0 - t * t


EXACT = {'cos_approx': cos_exact, 'sin_approx': sin_exact, 'tanh_approx': tanh_exact, 'sech2_approx': sech2_exact}
ORIGINALS: dict[tuple[str, str], object] = {}  # (module, name) -> what was swapped out (tests undo the swap)


def combined_in_input_dtypes(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                             chunk_size=64, return_final_states=False, cu_seqlens=None):
    """``mamba3_siso_combined`` without its casts to bf16: its autograd function on the inputs as they are."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import _Mamba3Function
    return _Mamba3Function.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                                 *(Input_States or (None,) * 4), cu_seqlens, chunk_size, return_final_states)


def _swap(module, name: str, value) -> None:
    ORIGINALS.setdefault((module.__name__, name), getattr(module, name))
    setattr(module, name, value)


def install() -> bool:
    """Swap the exact functions and ``combined_in_input_dtypes`` into mamba-ssm's Mamba3 modules (idempotent);
    False where mamba-ssm or its Mamba3 kernels are missing."""
    try:
        kernels = [importlib.import_module(f'{PACKAGE}.{name}') for name in KERNEL_MODULES]
        combined = importlib.import_module(f'{PACKAGE}.mamba3_siso_combined')
    except ImportError:
        return False
    for module in kernels:
        for name, exact in EXACT.items():
            if hasattr(module, name):
                _swap(module, name, exact)
    for module in [combined, *(sys.modules[m] for m in USERS if m in sys.modules)]:
        _swap(module, 'mamba3_siso_combined', combined_in_input_dtypes)
    return True
