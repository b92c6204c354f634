"""benchmarks/host_profile.py's aggregation of py-spy samples (the profiling itself needs a GPU and py-spy)."""
import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'host_profile.py'
_spec = importlib.util.spec_from_file_location('mom_wrap_host_profile', _PATH)
host_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_profile)

# py-spy's raw format: thread;outer frame;...;inner frame count (frames "function (path:line)")
RAW = """\
MainThread (hostprof.py:53);step (/x/benchmarks/host_profile.py:80);forward (/r/mom_wrap/wrapper.py:190);route (/r/mom_wrap/router.py:48) 6
MainThread (hostprof.py:53);step (/x/benchmarks/host_profile.py:80);forward (/r/mom_wrap/wrapper.py:190) 2
MainThread (hostprof.py:53);step (/x/benchmarks/host_profile.py:80);forward (/r/mom_wrap/wrapper.py:191);forward (/r/mom_wrap/wrapper.py:190) 1
autograd;apply (/v/lib/python3.12/site-packages/torch/autograd/function.py:317);backward (/v/lib/python3.12/site-packages/fla/ops/chunk.py:340) 3
garbage line
"""


def test_aggregate_counts_self_and_inclusive_once_per_stack():
    total, own, inclusive = host_profile.aggregate(RAW.splitlines(keepends=True))
    assert total == 12
    assert own['mom_wrap/router.py:route'] == 6
    assert own['mom_wrap/wrapper.py:forward'] == 3  # line numbers do not split a function
    assert own['fla/ops/chunk.py:backward'] == 3  # cut to what follows site-packages/
    # inclusive: every function on the stack, a recursive one once
    assert inclusive['mom_wrap/wrapper.py:forward'] == 9
    assert inclusive['benchmarks/host_profile.py:step'] == 9
    assert inclusive['torch/autograd/function.py:apply'] == 3
    text = host_profile.report(total, own, inclusive, rows=3, ms_per_sample=0.5)
    assert '50.00%     3.000 ms/step  mom_wrap/router.py:route' in text
