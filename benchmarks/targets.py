"""Issue 24's record: a Markdown table per host of the cases its targets name, each against its target, from the
JSON rows that ``bench_layer.py`` and ``bench_decode.py`` wrote (``--json``). Standard library only: the table of a
GPU run is made anywhere.

    python benchmarks/targets.py rows.json [more.json ...] [--host GatedDeltaNet]

The cases and targets (ratios against the host layer measured in the same run):

    fwd+bwd   8 x 2048, 2 x 16384   ours <= 2.0x the host; GatedDeltaNet: fla's MomAttention >= 2.0x ours,
                                    our peak memory <= MomAttention's
    prefill   1 x 32768, 8 x 4096   ours <= 2.0x the host (``bench_layer.py --prefill``)
    decode    B = 64                CUDA graph <= 1.5x the host's step, eager <= 1.3x (``bench_decode.py``)

A case no row holds is listed as "not measured". Where several rows hold one case (several runs), the latest run's
is taken. Each line gives the card, the date and the commit of its run, and whether the layers took turns
(``bench_layer.py --repeats``: the median of interleaved repetitions, as the issue asks).
"""
from __future__ import annotations

import argparse

from record import read_rows  # benchmarks/ is the script's directory, so on sys.path

# (label, benchmark, mode, batch, length, target x host (ours / host at most), fla's targets apply)
CASES = [
    ('fwd+bwd 8 x 2048', 'bench_layer', 'fwd+bwd', 8, 2048, 2.0, True),
    ('fwd+bwd 2 x 16384', 'bench_layer', 'fwd+bwd', 2, 16384, 2.0, True),
    ('prefill 1 x 32768', 'bench_layer', 'prefill', 1, 32768, 2.0, False),
    ('prefill 8 x 4096', 'bench_layer', 'prefill', 8, 4096, 2.0, False),
    ('decode B = 64, graph', 'bench_decode', 'decode step, graph', 64, None, 1.5, False),
    ('decode B = 64, eager', 'bench_decode', 'decode step, eager', 64, None, 1.3, False),
]
FLA_FASTER = 2.0  # fla's MomAttention's time / ours, at least


def _matches(row: dict, benchmark: str, mode: str, batch: int, length: int | None) -> bool:
    case = row.get('case', {})
    return (row.get('benchmark') == benchmark and case.get('mode') == mode and case.get('batch') == batch
            and (length is None or case.get('seq_len') == length))


def latest(rows: list[dict], role: str, **case) -> dict | None:
    """The row of ``role`` for the case, from the latest run that has one (None if no run has)."""
    found = [r for r in rows if r.get('role') == role and _matches(r, **case)]
    return max(found, key=lambda r: r.get('run', {}).get('date') or '', default=None)


def _ms(row: dict | None) -> str:
    if row is None:
        return '-'
    return f"{row['ms']:.2f}" if row.get('ms') is not None else row.get('status', '-')


def _run(row: dict) -> str:
    run = row.get('run', {})
    card = (run.get('gpu') or '?').replace('NVIDIA ', '')
    commit = (run.get('git_commit') or '?')[:7]
    turns = row.get('case', {}).get('interleaved')
    how = f", median of {row['case']['repeats']} taking turns" if turns else ''
    return f"{card}, {(run.get('date') or '?')[:10]}, {commit}{how}"


def host_table(rows: list[dict], host: str) -> str:
    """The Markdown table of ``host``'s cases: times, the ratio against the target, memory, the floor."""
    rows = [r for r in rows if r.get('host') == host]
    lines = [f"#### {host}", '',
             '| case | host ms | ours ms | x host | target | met | peak MiB host / ours | ours / floor | run |',
             '|---|---|---|---|---|---|---|---|---|']
    notes = []
    for label, benchmark, mode, batch, length, target, fla_targets in CASES:
        case = dict(benchmark=benchmark, mode=mode, batch=batch, length=length)
        host_row, ours = latest(rows, 'host', **case), latest(rows, 'mom_wrap', **case)
        if ours is None:
            lines.append(f"| {label} | {_ms(host_row)} | not measured | | <= {target:g}x | | | | |")
            continue
        ratio = ours.get('ratio')
        met = '' if ratio is None else ('yes' if ratio <= target else 'no')
        peaks = ' / '.join('-' if r is None or r.get('peak_mib') is None else f"{r['peak_mib']:.0f}"
                           for r in (host_row, ours))
        floor = f"{ours['ms'] / ours['floor_ms']:.1f}x" if ours.get('floor_ms') and ours.get('ms') else '-'
        lines.append(f"| {label} | {_ms(host_row)} | {_ms(ours)} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"<= {target:g}x | {met} | {peaks} | {floor} | {_run(ours)} |")
        fla = latest(rows, 'fla_mom', **case) if fla_targets else None
        if fla is not None and fla.get('ms') and ours.get('ms'):
            faster = fla['ms'] / ours['ms']
            lean = None if fla.get('peak_mib') is None or ours.get('peak_mib') is None else \
                ours['peak_mib'] <= fla['peak_mib']
            notes.append(f"- {label}: fla MomAttention {fla['ms']:.2f} ms, {faster:.2f}x ours (target >= "
                         f"{FLA_FASTER:g}x: {'yes' if faster >= FLA_FASTER else 'no'}); peak {fla['peak_mib']:.0f} "
                         f"MiB against our {ours['peak_mib']:.0f} (ours at most its: "
                         f"{'-' if lean is None else 'yes' if lean else 'no'})")
    return '\n'.join(lines + ([''] + notes if notes else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('json', nargs='+', help='files written by bench_layer.py / bench_decode.py --json')
    p.add_argument('--host', help='only this host (default: every host the rows hold)')
    args = p.parse_args(argv)
    rows = read_rows(*args.json)
    hosts = [args.host] if args.host else sorted({r['host'] for r in rows if r.get('host')})
    print('\n\n'.join(host_table(rows, h) for h in hosts))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
