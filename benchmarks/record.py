"""What the benchmarks record: their rows as JSON (``--json PATH``) and the sequence-length plot.

Standard library only at import time (torch and matplotlib are imported where they are needed), so the plot
can be made on a machine without a GPU from the JSON a GPU run wrote: ``python benchmarks/plot.py``.

A JSON file is ``{"format": "mom_wrap-bench/1", "rows": [row, ...]}``; every row stands alone (rows of
several files can be concatenated and compared):

    benchmark   "bench_layer" | "bench_decode" | "bench_scalar_decay"
    name        the layer or kernel as the benchmark prints it, e.g. "mom_wrap MoM(GatedDeltaNet)"
    role        "host" | "mom_wrap" | "fla_mom" (layers); "mom_wrap" | "mamba-ssm" | "fla" (kernels)
    host        the host layer the case is built on, e.g. "GatedDeltaNet" (scalar decay: "Mamba2")
    case        the case, e.g. {"batch": 8, "seq_len": 2048, "mode": "fwd+bwd", "hidden": 1024, ...}
    ms          milliseconds per call of the case's mode; null when missing
    peak_mib    peak memory above the inputs (MiB); null where not measured or missing
    ratio       ms / the reference row's ms of the same case (the host; scalar decay: mamba-ssm's plain
                scan); null when either is missing
    peak_ratio  peak_mib / the reference's peak_mib, or null
    status      "ok", "oom", or "failed: <error>" (then ms and peak_mib are null)
    run         gpu, cuda, torch, triton, fla, mamba_ssm versions (null: not installed), git_commit
                ($MOM_WRAP_COMMIT if set, else git's HEAD; null without either), git_dirty, date (UTC), python, argv
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys

FORMAT = 'mom_wrap-bench/1'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(module, dist):
    """The version of an imported module, else of the installed distribution, else None."""
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, '__version__', None):
        return str(mod.__version__)
    from importlib import metadata
    for name in (dist if isinstance(dist, tuple) else (dist,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def _git(*args):
    try:
        out = subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata():
    """The run's machine, library versions, commit and date."""
    gpu = cuda = None
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        gpu, cuda = torch.cuda.get_device_name(), torch.version.cuda
    # $MOM_WRAP_COMMIT first: a copy of the tree may carry a .git whose HEAD is not the code that runs (the
    # device tool's copies reported a commit four behind the tree they ran)
    commit, dirty = os.environ.get('MOM_WRAP_COMMIT') or None, None
    if commit is None:
        commit = _git('rev-parse', 'HEAD')
        if commit is not None:
            dirty = bool(_git('status', '--porcelain', '--untracked-files=no'))
    return {'gpu': gpu, 'cuda': cuda,
            'torch': _version('torch', 'torch'), 'triton': _version('triton', 'triton'),
            'fla': _version('fla', ('flash-linear-attention', 'fla-core')),
            'mamba_ssm': _version('mamba_ssm', 'mamba-ssm'),
            'git_commit': commit, 'git_dirty': dirty,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'python': platform.python_version(), 'argv': list(sys.argv)}


def _num(value, digits):
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 4)


class Recorder:
    """Collects a benchmark's rows; with a path, rewrites the JSON file after every row, so what was measured
    survives a time limit or a crash later in the run."""

    def __init__(self, path, benchmark, run=None):
        self.path, self.benchmark, self.rows = path, benchmark, []
        self.run = run if run is not None else run_metadata()

    def add(self, name, role, host, case, ms=None, peak_mib=None, status='ok', ref=None):
        """Record one row; ``ref`` is the reference row (a dict this returned) its ratios are taken against."""
        row = {'benchmark': self.benchmark, 'name': name, 'role': role, 'host': host, 'case': dict(case),
               'ms': _num(ms, 4), 'peak_mib': _num(peak_mib, 1), 'ratio': None, 'peak_ratio': None,
               'status': status, 'run': self.run}
        if ref is not None:
            row['ratio'] = _ratio(row['ms'], ref['ms'])
            row['peak_ratio'] = _ratio(row['peak_mib'], ref['peak_mib'])
        self.rows.append(row)
        if self.path:
            write_rows(self.path, self.rows)
        return row


def write_rows(path, rows):
    """Write rows as one JSON file (atomically: a reader never sees half a file)."""
    tmp = f'{path}.tmp'
    lines = ',\n'.join(json.dumps(r) for r in rows)  # one row a line: files diff row by row
    with open(tmp, 'w') as f:
        f.write(f'{{"format": "{FORMAT}", "rows": [\n{lines}\n]}}\n')
    os.replace(tmp, path)


def read_rows(*paths):
    """The rows of one or more JSON files written by ``write_rows``, in order."""
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get('format') != FORMAT:
            raise ValueError(f"{path}: not a benchmark JSON file of format {FORMAT!r}")
        rows += data['rows']
    return rows


def require_matplotlib():
    """matplotlib, or a SystemExit that says how to install it (the plot is an optional extra)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('plotting needs matplotlib: pip install "mom_wrap[plot]" (or pip install matplotlib); '
                         'or write --json here and run benchmarks/plot.py where matplotlib is') from None
    return matplotlib


def plot_seq_len(rows, path, title=None):
    """Two panels, time and peak memory against sequence length, one line per layer, from bench_layer rows
    (other rows are ignored). Missing points (out of memory, failed) are gaps, and the legend names them.
    Later rows of the same layer and length replace earlier ones. Writes a PNG (Agg backend)."""
    matplotlib = require_matplotlib()
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points, batches, tokens = {}, {}, set()
    for r in rows:
        if r.get('benchmark') != 'bench_layer':
            continue
        T = r['case']['seq_len']
        points.setdefault(r['name'], {})[T] = r
        batches.setdefault(T, set()).add(r['case'].get('batch'))
        tokens.add(r['case'].get('batch', 0) * T)
    if not points:
        raise ValueError('no bench_layer rows to plot')
    lengths = sorted(batches)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for name, by_len in points.items():
        xs = sorted(by_len)
        missing = [f"{T}: {by_len[T]['status'].split(':')[0]}" for T in xs if by_len[T]['ms'] is None]
        label = name + (f" (missing {', '.join(missing)})" if missing else '')
        for ax, key in zip(axes, ('ms', 'peak_mib')):
            ys = [by_len[T][key] if by_len[T][key] is not None else float('nan') for T in xs]
            ax.plot(xs, ys, marker='o', label=label)
    ticks = [f"{T}\nB={'/'.join(str(b) for b in sorted(batches[T], key=str))}" for T in lengths]
    per = f' ({tokens.pop()} tokens)' if len(tokens) == 1 else ''
    for ax, ylabel in zip(axes, (f'fwd+bwd ms{per}', f'peak MiB above inputs{per}')):
        ax.set_xscale('log', base=2)
        ax.set_xticks(lengths, ticks)
        ax.minorticks_off()
        ax.set_xlabel('sequence length (batch B)')
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=min(3, len(labels)), fontsize=8, frameon=False)
    if title is None:
        run = next(iter(next(iter(points.values())).values())).get('run') or {}
        title = ' '.join(str(v) for v in (run.get('gpu') or 'unknown GPU', run.get('date', '')[:10],
                                          (run.get('git_commit') or '')[:7]) if v)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format='png', dpi=120)
    plt.close(fig)
    return path
