"""``python -m mom_wrap.check``'s command line: its help, its usage errors and its progress. The checks themselves
are ``tests/test_parity.py``'s; here ``run_checks`` is faked wherever only the command line is under test."""
import os
import subprocess
import sys

import pytest
import torch

import mom_wrap
import mom_wrap.check as check
import mom_wrap.testing as testing
from tests import hosts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_mom_wrap_imports_neither_the_command_nor_triton():
    """``mom_wrap.interpret_on_cpu`` comes from ``mom_wrap.interpret``, which imports nothing heavy: importing the
    package leaves Triton, fla and torch._dynamo unimported (interpret_on_cpu must come first) and does not import
    ``mom_wrap.check`` (which ``python -m`` then runs: runpy warns when it finds it imported already)."""
    code = ("import sys, mom_wrap, mom_wrap.interpret as interpret; "
            "assert mom_wrap.interpret_on_cpu is interpret.interpret_on_cpu; "
            "print(sorted({'mom_wrap.check', 'triton', 'fla', 'torch._dynamo'} & set(sys.modules)))")
    run = _command('-c', code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '[]'


def test_help_describes_the_checks_and_lists_the_installed_hosts():
    run = _command('-m', 'mom_wrap.check', '--help')
    assert run.returncode == 0, run.stderr
    assert 'found in sys.modules' not in run.stderr  # runpy's RuntimeWarning about mom_wrap.check
    description = run.stdout.split('positional arguments:')[0].split('\n\n', 1)[1]  # (after the usage)
    assert description.rstrip().endswith('.'), description  # whole sentences, not the docstring's first line
    installed = run.stdout.split('\nhosts installed here')[1].split('supported, but')[0].split('\n\n')[0]
    for path in mom_wrap.supported_hosts():
        assert path.rpartition('.')[2] in installed, installed
    assert 'exit status' in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error without CUDA')
def test_device_cuda_without_cuda_is_a_one_line_usage_error():
    run = _command('-m', 'mom_wrap.check', 'GatedDeltaNet', '--device', 'cuda')
    assert run.returncode == 2
    assert 'Traceback' not in run.stderr and run.stdout == ''
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith('python -m mom_wrap.check: error: --device cuda:') and 'CUDA' in last[40:], run.stderr


def test_progress_goes_to_stderr_and_the_table_to_stdout_unchanged(monkeypatch, capsys):
    """A bar over the hosts on stderr whose postfix follows each host's checks as ``run_checks`` reports them;
    stdout carries the table as it always did."""
    monkeypatch.setattr(check, 'interpret_on_cpu', lambda: None)  # this process is set up already (conftest)
    fake = {'DeltaNet': [testing.Result('DeltaNet', 'good', 1e-7, 1e-4),
                         testing.Result('DeltaNet', 'bad', 0.5, 1e-4, 'why')],
            'GatedDeltaNet': [testing.Result('GatedDeltaNet', 'nan', float('nan'), 1e-4),
                              testing.Result('GatedDeltaNet', 'exact', 0.0, 0.0)]}

    def run_checks(factory, name, device='cpu', progress=None):
        for result in fake[name]:
            progress(result)
        return fake[name]
    monkeypatch.setattr(testing, 'run_checks', run_checks)

    assert check.main(['GatedDeltaNet', 'DeltaNet']) == 1
    out, err = capsys.readouterr()
    assert out == (
        'host                  check                                          max rel err  tolerance  result\n'
        'DeltaNet              good                                               1.0e-07      1e-04  pass\n'
        'DeltaNet              bad                                                5.0e-01      1e-04  FAIL  why\n'
        'GatedDeltaNet         nan                                                    nan      1e-04  FAIL\n'
        'GatedDeltaNet         exact                                              0.0e+00      0e+00  pass\n'
        '2 passed, 2 failed\n')
    assert 'DeltaNet:' in err and 'check 2 done: bad' in err
    assert 'GatedDeltaNet:' in err and 'check 2 done: exact' in err and '2/2' in err


def test_run_checks_reports_each_result_as_it_is_done():
    """``run_checks(progress=...)`` is called once per result, in order, and changes nothing of the results."""
    seen = []
    results = testing.run_checks(hosts.ADAPTERS['GatedDeltaNet'].example_host, interpret=False, progress=seen.append)
    assert len(results) >= 8 and len(seen) == len(results) and all(a is b for a, b in zip(seen, results))


def test_a_host_whose_checks_raise_fails_and_the_next_host_still_runs(monkeypatch, capsys):
    """An exception inside one host's suite is that host's failed row (with the traceback on stderr), not the end of
    the command: the hosts after it are still checked."""
    monkeypatch.setattr(check, 'interpret_on_cpu', lambda: None)

    def run_checks(factory, name, device='cpu', progress=None):
        if name == 'DeltaNet':
            raise TypeError("'NoneType' object is not callable")
        return [testing.Result(name, 'exact', 0.0, 0.0)]
    monkeypatch.setattr(testing, 'run_checks', run_checks)

    assert check.main(['DeltaNet', 'GatedDeltaNet']) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == [
        "DeltaNet              run_checks                                             nan      0e+00  FAIL  "
        "raised TypeError: 'NoneType' object is not callable",
        'GatedDeltaNet         exact                                              0.0e+00      0e+00  pass',
        '1 passed, 1 failed']
    assert 'Traceback' in err
