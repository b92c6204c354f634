"""Our Triton kernels compiled for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' arithmetic on the CPU (``test_kernels.py``) but skips the compiler's type
checks (a loop-carried variable that changes type, say), which fail only when a GPU compiles the kernel.
Triton's wheel carries its NVIDIA backend and ptxas, so the whole compile runs here, in a subprocess:
the test session runs with TRITON_INTERPRET=1, under which ``triton.jit`` makes no compilable kernels.
"""
import os
import subprocess
import sys

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mom_wrap.kernels import conv_step, rows, segment_conv

H100 = GPUTarget('cuda', 90, 32)


def signature(fn, pointers: dict[str, str], constexprs: dict):
    """Every argument of ``fn``: pointers with their element type, constexprs, the rest int32 scalars."""
    return {name: ('constexpr' if name in constexprs else '*' + pointers[name] if name in pointers else 'i32')
            for name in fn.arg_names}


CONV = dict(x='bf16', wt='bf16', b='bf16', memory='i64', position='i64', y='bf16', dy='bf16', dpre='fp32',
            dx='bf16', dwt='fp32', db='fp32')
BLOCKS = dict(BT=64, BD=64)
CASES = [
    (segment_conv._conv_fwd_kernel, CONV, dict(W=4, HAS_BIAS=True, HAS_MEMORY=True, SILU=True, **BLOCKS)),
    (segment_conv._conv_fwd_kernel, CONV, dict(W=3, HAS_BIAS=False, HAS_MEMORY=False, SILU=False, **BLOCKS)),
    (segment_conv._conv_bwd_pre_kernel, CONV, dict(W=4, HAS_BIAS=True, HAS_MEMORY=True, SILU=True, **BLOCKS)),
    (segment_conv._conv_bwd_dx_kernel, CONV, dict(W=4, HAS_MEMORY=True, **BLOCKS)),
    (segment_conv._conv_bwd_dw_kernel, CONV, dict(W=4, BW=4, HAS_BIAS=True, HAS_MEMORY=True, ROWS=1024, **BLOCKS)),
    (segment_conv._conv_bwd_dw_kernel, CONV, dict(W=3, BW=4, HAS_BIAS=False, HAS_MEMORY=False, ROWS=64, **BLOCKS)),
    (conv_step._conv_step_kernel, dict(x='bf16', pool='bf16', index='i64', w='bf16', b='bf16', memory='i64',
                                       valid='u8', y='bf16'),
     dict(W=4, BW=4, HAS_INDEX=True, HAS_MEMORY=True, HAS_BIAS=True, HAS_VALID=True, SILU=True, BD=128)),
    (rows._scatter_rows_kernel, dict(dst='fp32', index='i64', src='fp32', valid='u8'), dict(HAS_VALID=True, BLOCK=2048)),
]


def compile_case(i: int) -> None:
    fn, pointers, constexprs = CASES[i]
    src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
    triton.compile(src, target=H100)


@pytest.mark.parametrize('i', range(len(CASES)), ids=[f"{c[0].__name__}-{n}" for n, c in enumerate(CASES)])
def test_kernel_compiles_for_h100(i):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, __file__, str(i)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == '__main__':
    compile_case(int(sys.argv[1]))
