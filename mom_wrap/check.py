"""``python -m mom_wrap.check [HOST ...] [--device cpu|cuda]``: the parity checks of ``mom_wrap.testing`` for
every supported host that is installed (or the named ones: a class name such as ``GatedDeltaNet``, or the
dotted path ``supported_hosts()`` lists), printed as one table on stdout, with a progress bar on stderr.
Exit status 1 on any failure, 2 on a usage error; ``--help`` lists the hosts installed here.

On the CPU the host layers' own forwards run through Triton's interpreter (set here before Triton is
imported, by ``mom_wrap.interpret``), as the tests do.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

import torch
from tqdm import tqdm

from mom_wrap.interpret import first_config_only, interpret_on_cpu

DESCRIPTION = """\
Run mom_wrap's parity checks (mom_wrap.testing.run_checks) on every supported
host layer installed here, or on the named ones, and print the results as one
table. Each check wraps small layers of the host as Mixture-of-Memories layers
and compares them with a reference that does not go through the code checked:
the host itself (one memory, or top-k copies of it), a plain loop over the
memories, plain runs for causality, batch rows, left padding, packed sequences
and the decode cache; and every parameter must get a gradient. With --device
cuda also the Triton backend against the torch backend (fp32, bf16) and
training at T = 2048 against the host. On the CPU the host layers' own kernels
run through Triton's interpreter."""

EXIT_STATUS = """\
The table goes to stdout, a progress bar over the hosts to stderr.

exit status: 0 if every check passes, 1 if any fails, 2 on a usage error
(an unknown host, --device cuda without CUDA)."""


def main(argv: list[str] | None = None) -> int:
    """The command on ``argv`` (default: ``sys.argv[1:]``): the table on stdout; returns the exit status (usage
    errors exit with status 2, through argparse)."""
    p = argparse.ArgumentParser(prog='python -m mom_wrap.check', description=DESCRIPTION, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('hosts', nargs='*', metavar='HOST',
                   help='a host class name (e.g. GatedDeltaNet) or its dotted path; default: every host '
                        'installed here (listed below)')
    p.add_argument('-h', '--help', action='store_true',
                   help='show this help message, with the hosts installed here, and exit')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                   help='where the checks run (default: cpu); cuda adds checks that need a GPU')
    p.add_argument('--first-config', action='store_true',
                   help="on CUDA: run each Triton kernel's first config instead of autotuning (a fresh GPU "
                        "otherwise autotunes fla's kernels for minutes; the CPU always does this)")
    p.add_argument('--tf32', action='store_true',
                   help="on CUDA: leave Triton's fp32 dot products in TF32 (fla's default) instead of IEEE fp32")
    args = p.parse_args(argv)
    if args.device == 'cuda' and not args.help and not torch.cuda.is_available():  # (--help goes with anything)
        p.error('--device cuda: no CUDA GPU here (torch.cuda.is_available() is False); '
                'run the checks on the CPU with --device cpu')
    _setup(args.device, first_config=args.first_config, tf32=args.tf32)

    adapters, not_installed = _host_adapters()  # (the hosts' packages are imported after the setup)
    if args.help:
        p.epilog = _hosts_list(adapters, not_installed) + '\n\n' + EXIT_STATUS
        p.print_help()
        return 0
    if args.hosts:
        wanted = set(args.hosts)
        unknown = wanted - {a.host_class for a in adapters} - {_name(a) for a in adapters}
        if unknown:
            p.error(f"unknown or not installed host(s): {', '.join(sorted(unknown))}; "
                    f"installed here: {', '.join(_name(a) for a in adapters)} (see --help)")
        adapters = [a for a in adapters if a.host_class in wanted or _name(a) in wanted]

    from mom_wrap.testing import Result, run_checks

    results = []
    with tqdm(adapters, unit='host', file=sys.stderr, dynamic_ncols=True) as bar:
        for adapter in bar:  # each host's rows as soon as they are done: a later host may run out of time
            name = _name(adapter)
            bar.set_description(name)
            try:
                rows = run_checks(adapter.example_host, name, device=args.device, progress=_progress(bar))
            except Exception as e:  # a host that breaks the suite fails, and the other hosts still run
                tqdm.write(traceback.format_exc(), file=sys.stderr)
                rows = [Result(name, 'run_checks', float('nan'), 0.0, f'raised {type(e).__name__}: {e}')]
            tqdm.write(_table(rows, header=not results), file=sys.stdout)  # (clears the bar, then redraws it)
            if not adapter.host_forward_runs_on(torch.device(args.device)):
                tqdm.write(f"{name}: its own forward does not run on {args.device}: the checks against it were left "
                           "out (they run with --device cuda)", file=sys.stdout)
            sys.stdout.flush()
            results += rows
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _setup(device: str, first_config: bool, tf32: bool) -> None:
    """Triton set up for ``device``, before any host's package (and so Triton) is imported."""
    if device == 'cpu':
        interpret_on_cpu()
    else:
        # IEEE fp32 dots (before any kernel compiles), so that the fp32 checks test the code, not TF32's
        # rounding: with TF32 the decay parameters' gradients at the example shapes differ by up to 5e-2
        # (GatedDeltaNet's A_log; 9e-5 with IEEE dots, H200). The bf16 checks test the real precision.
        if not tf32:
            os.environ.setdefault('TRITON_F32_DEFAULT', 'ieee')
        if first_config:
            first_config_only()


def _host_adapters() -> tuple[list, list]:
    """The registered host adapters whose host class imports here, and those whose package is missing.
    Loading a host class imports its package (fla, mamba-ssm)."""
    from mom_wrap.adapters import registered_adapters

    with warnings.catch_warnings():
        # fla's notice that Triton runs on the CPU: here it does on purpose, through the interpreter
        warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform')
        adapters = registered_adapters()  # (mom_wrap's and those of installed packages' entry points)
        loaded = {a: a.load_host_class() is not None for a in adapters}
    return [a for a in adapters if loaded[a]], [a for a in adapters if not loaded[a]]


def _name(adapter) -> str:
    """The host's short name (``mom_wrap.adapters.host_names``): its class name, ``GatedDeltaNet``, or with its
    package's where another host has that class name, ``fla.Mamba2``."""
    from mom_wrap.adapters import host_names
    return {cls: name for name, cls in host_names().items()}.get(adapter, adapter.host_class)


def _hosts_list(installed: list, not_installed: list) -> str:
    """The hosts one can name, for ``--help``: class name and dotted path, one a line."""
    lines = ['hosts installed here (name one by its class name or dotted path):']
    lines += [f'  {_name(a):<22}{a.host_class}' for a in installed] or ['  none']
    if not_installed:
        lines += ['supported, but their package is not installed here:']
        lines += [f'  {_name(a):<22}{a.host_class}' for a in not_installed]
    return '\n'.join(lines)


def _progress(bar: tqdm):
    """A ``run_checks`` progress callback for one host: the bar's postfix counts the host's checks done and
    names the last one (``check 7 done: causal``)."""
    done = 0

    def report(result) -> None:
        nonlocal done
        done += 1
        bar.set_postfix_str(f'check {done} done: {result.check}')
    return report


def _table(results, header: bool) -> str:
    """The rows of ``results`` (with the column header first if ``header``), one a line."""
    lines = [f"{'host':<22}{'check':<46}{'max rel err':>12}{'tolerance':>11}  result"] if header else []
    lines += [f"{r.host:<22}{r.check:<46}{r.error:>12.1e}{r.tolerance:>11.0e}  "
              f"{'pass' if r.passed else 'FAIL'}{'  ' + r.detail if r.detail else ''}" for r in results]
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
