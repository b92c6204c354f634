"""Our Triton kernels compiled for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' arithmetic on the CPU (``test_kernels.py``) but skips the compiler's type
checks (a loop-carried variable that changes type, say), which fail only when a GPU compiles the kernel.
Triton's wheel carries its NVIDIA backend and ptxas, so the whole compile runs here, in a subprocess:
the test session runs with TRITON_INTERPRET=1, under which ``triton.jit`` makes no compilable kernels.
"""
import json
import os
import subprocess
import sys
import traceback

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mom_wrap.kernels import combine, conv_step, delta_step, route, rows, scalar_decay, segment_conv

H100 = GPUTarget('cuda', 90, 32)


SCALARS = dict(scale='fp32')  # scalar arguments that are not int32


def signature(fn, pointers: dict[str, str], constexprs: dict):
    """Every argument of ``fn``: pointers with their element type, constexprs, the rest int32 scalars (or as
    SCALARS says)."""
    return {name: ('constexpr' if name in constexprs else '*' + pointers[name] if name in pointers else
                   SCALARS.get(name, 'i32')) for name in fn.arg_names}


CONV = dict(x='bf16', wt='bf16', b='bf16', memory='i64', position='i64', y='bf16', dy='bf16', dpre='fp32',
            dx='bf16', dwt='fp32', db='fp32')
BLOCKS = dict(BT=64, BD=64)

def DELTA_STEP(dtype: str, index: str) -> dict[str, str]:  # noqa: N802 (reads like the other pointer tables)
    return dict(q=dtype, k=dtype, v=dtype, a='fp32', b=dtype, A_log='fp32', dt_bias='fp32', pool='fp32', index=index,
                valid='u8', o=dtype)


CASES = [
    (segment_conv._conv_fwd_kernel, CONV, dict(W=4, HAS_BIAS=True, HAS_MEMORY=True, SILU=True, **BLOCKS)),
    (segment_conv._conv_fwd_kernel, CONV, dict(W=3, HAS_BIAS=False, HAS_MEMORY=False, SILU=False, **BLOCKS)),
    (segment_conv._conv_bwd_pre_kernel, CONV, dict(W=4, HAS_BIAS=True, HAS_MEMORY=True, SILU=True, **BLOCKS)),
    (segment_conv._conv_bwd_dx_kernel, CONV, dict(W=4, HAS_MEMORY=True, **BLOCKS)),
    (segment_conv._conv_bwd_dw_kernel, CONV, dict(W=4, BW=4, HAS_BIAS=True, HAS_MEMORY=True, **BLOCKS)),
    (segment_conv._conv_bwd_dw_kernel, CONV, dict(W=3, BW=4, HAS_BIAS=False, HAS_MEMORY=False, **BLOCKS)),
    (conv_step._conv_step_kernel, dict(x='bf16', pool='bf16', index='i64', w='bf16', b='bf16', memory='i64',
                                       valid='u8', y='bf16'),
     dict(W=4, BW=4, HAS_INDEX=True, HAS_MEMORY=True, HAS_BIAS=True, HAS_VALID=True, SILU=True, BD=128)),
    (rows._scatter_rows_kernel, dict(dst='fp32', index='i64', src='fp32', valid='u8'),
     dict(HAS_VALID=True, BLOCK=2048)),
]


def scalar_decay_pointers(dtype: str, dq: str = 'fp32') -> dict[str, str]:
    """The chunk kernels' pointers: inputs (and o, dv) in ``dtype``, g and states fp32, dq / dk shares in ``dq``."""
    return dict(q=dtype, k=dtype, v=dtype, g='fp32', cu_seqlens='i64', h0='fp32', o=dtype, ht='fp32', dht='fp32',
                do=dtype, dq=dq, dk=dq, dv=dtype, qdq='fp32', dg='fp32', dh0='fp32')


MAMBA2 = dict(H=8, HG=8, K=128, V=64, BT=64, BK=128, BV=64)  # d_state 128, headdim 64, one group of 8 heads
SMALL = dict(H=4, HG=1, K=12, V=20, BT=16, BK=16, BV=32)  # K and V not powers of 2, a group per head
CASES += [
    (scalar_decay._fwd_kernel, scalar_decay_pointers('bf16'), dict(HAS_H0=True, STORE_HT=True, **MAMBA2),
     dict(num_warps=8, num_stages=3)),
    (scalar_decay._fwd_kernel, scalar_decay_pointers('fp32'), dict(HAS_H0=False, STORE_HT=False, **SMALL)),
    (scalar_decay._bwd_dq_kernel, scalar_decay_pointers('bf16'), dict(HAS_H0=True, **MAMBA2),
     dict(num_warps=8, num_stages=2)),
    (scalar_decay._bwd_dq_kernel, scalar_decay_pointers('fp16', 'fp16'), dict(HAS_H0=False, **SMALL)),
    (scalar_decay._bwd_dkv_kernel, scalar_decay_pointers('bf16'), dict(HAS_DHT=True, STORE_DH0=True, **MAMBA2),
     dict(num_warps=8, num_stages=3)),
    (scalar_decay._bwd_dkv_kernel, scalar_decay_pointers('fp32', 'fp32'), dict(HAS_DHT=False, STORE_DH0=False,
                                                                              **SMALL)),
    (scalar_decay._step_kernel, dict(q='bf16', k='bf16', v='bf16', g='fp32', pool='fp32', index='i64', valid='u8',
                                     o='bf16'), dict(H=8, HG=8, K=128, V=64, BK=128, BV=32, HAS_VALID=True)),
    (scalar_decay._step_kernel, dict(q='fp32', k='fp32', v='fp32', g='fp32', pool='fp32', index='i32', valid='u8',
                                     o='fp32'), dict(H=4, HG=2, K=12, V=20, BK=16, BV=32, HAS_VALID=False)),
    (delta_step._delta_step_kernel, DELTA_STEP('bf16', 'i64'),
     dict(HV=4, HG=1, K=256, V=256, BK=256, BV=32, GATE=1, BETA_SIGMOID=True, NEG_EIGVAL=False, L2NORM=True,
          HAS_VALID=True)),
    (delta_step._delta_step_kernel, DELTA_STEP('fp32', 'i32'),
     dict(HV=6, HG=2, K=12, V=20, BK=16, BV=32, GATE=0, BETA_SIGMOID=False, NEG_EIGVAL=True, L2NORM=False,
          HAS_VALID=False)),
]


def combine_pointers(dtype: str, weight: str = 'fp32') -> dict[str, str]:
    """The combine kernels' pointers: rows and gradients in ``dtype``, idx int64, weight (the accumulation
    dtype) and present float, dweight fp32."""
    return dict(y=dtype, idx='i64', weight=weight, present='fp32', out=dtype, grad=dtype, dy=dtype, dweight='fp32')


CASES += [
    (combine._combine_fwd_kernel, combine_pointers('bf16'), dict(HAS_PRESENT=True, BN=32, BD=128)),
    (combine._combine_fwd_kernel, combine_pointers('fp64', 'fp64'), dict(HAS_PRESENT=False, BN=32, BD=128)),
    (combine._combine_bwd_kernel, combine_pointers('bf16'),
     dict(HAS_PRESENT=True, NEED_DWEIGHT=True, BN=32, BD=64, BS=4)),
    (combine._combine_bwd_kernel, combine_pointers('fp64', 'fp64'),
     dict(HAS_PRESENT=False, NEED_DWEIGHT=False, BN=32, BD=64, BS=64)),
]

ROUTE = dict(logits='fp32', probs='fp32', weights='fp32', indices='i64', dprobs='fp32', dweights='fp32',
             dlogits='fp32')
CASES += [
    (route._route_fwd_kernel, ROUTE, dict(K=2, S=3, SHARED=True, BM=4, BN=64)),
    (route._route_fwd_kernel, ROUTE, dict(K=1, S=1, SHARED=False, BM=8, BN=64)),
    (route._route_bwd_kernel, ROUTE, dict(K=2, S=3, HAS_DPROBS=True, HAS_DWEIGHTS=True, BM=4, BN=64)),
    (route._route_bwd_kernel, ROUTE, dict(K=3, S=3, HAS_DPROBS=False, HAS_DWEIGHTS=True, BM=8, BN=64)),
]


def compile_case(i: int) -> None:
    fn, pointers, constexprs, *options = CASES[i]  # options: the launch's num_warps / num_stages, if not default
    src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
    triton.compile(src, target=H100, options=options[0] if options else None)


@pytest.fixture(scope='module')
def compiled():
    """Every case compiled in one subprocess (one interpreter start instead of one per case: that start was
    most of each case's 8 s): case index -> the compiler's error, or None."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, __file__, 'all'], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(i): err for i, err in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize('i', range(len(CASES)), ids=[f"{c[0].__name__}-{n}" for n, c in enumerate(CASES)])
def test_kernel_compiles_for_h100(i, compiled):
    assert compiled[i] is None, compiled[i]


if __name__ == '__main__':
    errors = {}
    for i in range(len(CASES)):
        try:
            compile_case(i)
            errors[i] = None
        except Exception:  # reported per case by the test
            errors[i] = traceback.format_exc()[-3000:]
    print(json.dumps(errors))
