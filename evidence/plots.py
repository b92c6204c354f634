"""Figures of the MQAR rows (``evidence.mqar``): ``python -m evidence.plots [--results F] [--out DIR]``.

* ``mqar_pairs.png``: accuracy against the number of key-value pairs, a panel per (host, d_model), a line per
  variant (host, MoM, host with MoM's parameters, host with MoM's state);
* ``mqar_state.png``: mean accuracy against the recurrent state size (Zoology's figure), a line per (host, variant)
  over the model widths;
* ``mqar_curves.png``: mean accuracy over training (rows run with ``--eval-every``), a panel per (host, d_model), a
  line per model, the mean over its seeds;
* ``mqar_loads.png``: the memory loads of each MoM layer over training, with and without the balancing loss;
* ``mqar_assignment.png``: which memory the keys, values, queries and fillers of a test batch went to.

Each point is a model at its best learning rate (highest mean accuracy, averaged over its seeds), the mean over
seeds; ``summary_table`` gives the same as Markdown for README.
"""
from __future__ import annotations

import argparse
import collections
import math
import statistics
from pathlib import Path

from evidence import runs
from evidence.models import CONTROLS

VARIANT_LABEL = {'host': 'host', 'mom': 'MoM(host)', 'host_params': 'host, MoM params', 'host_state': 'host, MoM state'}
VARIANT_STYLE = {'host': '-', 'mom': '-', 'host_params': '--', 'host_state': ':'}


def _key(row: dict) -> tuple:
    """A model (everything but the learning rate and seed)."""
    return (row['host'], row['d_model'], row['variant'], row['balance'] if row['variant'] == 'mom' else None,
            row['steps'], row['batch_size'], row['vocab_size'])


def best(rows: list[dict]) -> list[dict]:
    """One entry per model at its best learning rate (the highest mean accuracy averaged over its seeds): the rows of
    the model's seeds at that rate, with their mean accuracy per setting (``accuracy``), ``mean_accuracy``,
    ``seeds``, ``lr`` and the learning rates tried (``lrs``). Runs stopped at their time limit (``complete``
    false) are left out."""
    by_model = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if row.get('task') == 'mqar' and runs.complete(row):
            by_model[_key(row)][row['lr']].append(row)
    out = []
    for key, by_lr in by_model.items():
        lr = max(by_lr, key=lambda r: statistics.mean(x['mean_accuracy'] for x in by_lr[r]))
        seeds = by_lr[lr]
        settings = seeds[0]['accuracy'].keys()
        out.append({**{k: seeds[0][k] for k in ('host', 'd_model', 'variant', 'balance', 'params', 'params_no_embed',
                                                 'state_size', 'steps', 'batch_size', 'device', 'commit', 'date')},
                    'lr': lr, 'lrs': sorted(by_lr), 'seeds': [r['seed'] for r in seeds],
                    'accuracy': {s: statistics.mean(r['accuracy'][s] for r in seeds) for s in settings},
                    'mean_accuracy': statistics.mean(r['mean_accuracy'] for r in seeds),
                    'mean_accuracy_spread': [min(r['mean_accuracy'] for r in seeds),
                                             max(r['mean_accuracy'] for r in seeds)],
                    'rows': seeds})
    return sorted(out, key=lambda r: (r['host'], r['d_model'], list(VARIANT_LABEL).index(r['variant']),
                                      -(r['balance'] or 0)))


def _label(entry: dict) -> str:
    label = VARIANT_LABEL[entry['variant']].replace('host', entry['host'])
    if entry['variant'] == 'mom' and not entry['balance']:
        label += ', no balancing loss'
    return label


def _panels(entries: list[dict]) -> list[tuple[str, int]]:
    """The (host, d_model) panels of a figure: the recurrent hosts' (a control's own only where no host has one)."""
    hosts = {(e['host'], e['d_model']) for e in entries if e['host'] not in CONTROLS}
    return sorted(hosts or {(e['host'], e['d_model']) for e in entries})


def _targets(entry: dict, panels: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The panels ``entry`` is drawn in: its own, or for a control every panel of its d_model (the reference
    line beside each host)."""
    if entry['host'] in CONTROLS:
        return [p for p in panels if p[1] == entry['d_model']]
    return [(entry['host'], entry['d_model'])]


def _style(entry: dict) -> dict:
    return dict(color='0.5') if entry['host'] in CONTROLS else {}


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * cols, height * rows), layout='constrained')
    return fig, fig.subplots(rows, cols, squeeze=False)


def _by_pairs(accuracy: dict[str, float]) -> tuple[list[int], list[float]]:
    """Accuracy per number of pairs, averaged over the test lengths that have it."""
    per = collections.defaultdict(list)
    for setting, value in accuracy.items():
        per[int(setting.split('x')[1])].append(value)
    pairs = sorted(per)
    return pairs, [statistics.mean(per[p]) for p in pairs]


def plot_pairs(entries: list[dict], path) -> Path:
    panels = _panels(entries)
    hosts = sorted({h for h, _ in panels})
    widths = sorted({d for _, d in panels})
    fig, axes = _figure(len(hosts), len(widths), 4.0, 3.0)
    for e in entries:
        pairs, acc = _by_pairs(e['accuracy'])
        for host, d in _targets(e, panels):
            ax = axes[hosts.index(host)][widths.index(d)]
            ax.plot(pairs, acc, VARIANT_STYLE[e['variant']], marker='o', label=_label(e), **_style(e))
            ax.set(title=f"{host}, d_model {d}", xscale='log', xlabel='key-value pairs', ylabel='accuracy',
                   ylim=(0, 1.02))
    for row in axes:
        for ax in row:
            if ax.has_data():
                ax.legend(fontsize='x-small')
    return save_png(fig, path)


def plot_curves(entries: list[dict], path) -> Path:
    """Mean accuracy against the training step, from the rows' ``accuracy_curve`` (the mean over seeds at each step
    they share)."""
    curves = []
    for e in entries:
        per_step = collections.defaultdict(list)
        for row in e['rows']:
            for step, acc in row.get('accuracy_curve', []):
                per_step[step].append(acc)
        steps = [s for s in sorted(per_step) if len(per_step[s]) == len(e['rows'])]
        if len(steps) > 1:
            curves.append((e, steps, [statistics.mean(per_step[s]) for s in steps]))
    if not curves:
        raise ValueError('no accuracy curves in the rows (train with --eval-every)')
    panels = _panels([e for e, _, _ in curves])
    fig, axes = _figure(1, len(panels), 4.5, 3.2)
    for e, steps, acc in curves:
        for host, d in _targets(e, panels):
            ax = axes[0][panels.index((host, d))]
            ax.plot(steps, acc, VARIANT_STYLE[e['variant']], marker='.', label=f"{_label(e)}, lr {e['lr']:g}",
                    **_style(e))
            ax.set(title=f"{host}, d_model {d}", xlabel='training step', ylabel='mean accuracy', ylim=(0, 1.02))
    for ax in axes[0]:
        ax.legend(fontsize='x-small')
    return save_png(fig, path)


def plot_state(entries: list[dict], path) -> Path:
    fig, axes = _figure(1, 1, 6.0, 4.0)
    ax = axes[0][0]
    lines = collections.defaultdict(list)
    for e in entries:
        if e['state_size'] is not None:  # (the attention control: no fixed state)
            lines[(e['host'], e['variant'], e['balance'] if e['variant'] == 'mom' else None)].append(e)
    if not lines:
        raise ValueError('no rows of a model with a fixed state')
    for (host, variant, _), points in sorted(lines.items(), key=lambda kv: str(kv[0])):
        points.sort(key=lambda e: e['state_size'])
        ax.plot([p['state_size'] for p in points], [p['mean_accuracy'] for p in points], VARIANT_STYLE[variant],
                marker='o', label=_label(points[0]))
    ax.set(xscale='log', xlabel='recurrent state (elements per sequence, all layers)',
           ylabel='mean accuracy over the test settings', ylim=(0, 1.02), title='MQAR accuracy vs state size')
    ax.legend(fontsize='x-small')
    return save_png(fig, path)


def _layer_panels(entries: list[dict], field: str, width: float, height: float):
    """A panel per (MoM entry, layer) of the first seed's ``field`` ('loads' or 'assignment'): the figure and
    [(axes, entry, layer name, its data)]."""
    panels = [(e, name, data) for e in entries if e['variant'] == 'mom' and e['rows'][0].get(field)
              for name, data in e['rows'][0][field].items()]
    if not panels:
        raise ValueError(f"entries: no MoM row with {field}")
    cols = min(4, len(panels))
    fig, axes = _figure(math.ceil(len(panels) / cols), cols, width, height)
    return fig, [(ax, *panel) for ax, panel in zip([a for row in axes for a in row], panels)]


def plot_loads(entries: list[dict], path) -> Path:
    """The loads of every MoM entry's first seed, a panel per (entry, layer)."""
    fig, panels = _layer_panels(entries, 'loads', 4.0, 3.0)
    for ax, e, name, h in panels:
        M = len(h['load'][0])
        for m in range(M):
            ax.plot(h['steps'], [load[m] for load in h['load']], marker='.', label=f"memory {m}")
        ax.axhline(1 / M, color='gray', linestyle='--')
        ax.set(title=f"{_label(e)} d{e['d_model']}\n{name}", xlabel='step', ylabel='load', ylim=(0, 1))
        ax.title.set_fontsize('small')
    return save_png(fig, path)


def plot_assignment(entries: list[dict], path) -> Path:
    """Heatmaps of the share of each token category's slots per memory, for every MoM entry's first seed and layer."""
    fig, panels = _layer_panels(entries, 'assignment', 3.6, 2.8)
    for ax, e, name, a in panels:
        ax.imshow(a['share'], vmin=0, vmax=1, cmap='viridis', aspect='auto')
        for c, row in enumerate(a['share']):
            for m, v in enumerate(row):
                ax.text(m, c, f"{v:.2f}", ha='center', va='center', fontsize='x-small', color='w' if v < 0.6 else 'k')
        ax.set(title=f"{_label(e)} d{e['d_model']}\n{name}", xlabel='memory', xticks=range(len(a['share'][0])),
               yticks=range(len(a['categories'])), yticklabels=a['categories'])
        ax.title.set_fontsize('small')
    return save_png(fig, path)


def summary_table(entries: list[dict]) -> str:
    """Markdown: a row per model at its best learning rate."""
    lines = ['| model | d_model | params | state | lr | seeds | mean accuracy | hardest setting |',
             '|---|---|---|---|---|---|---|---|']
    for e in entries:
        hardest = max(e['accuracy'], key=lambda s: (int(s.split('x')[1]), int(s.split('x')[0])))
        spread = e['mean_accuracy_spread']
        state = 'KV cache' if e['state_size'] is None else f"{e['state_size']:,}"
        lines.append(f"| {_label(e)} | {e['d_model']} | {e['params']:,} | {state} | {e['lr']:g} | "
                     f"{len(e['seeds'])} | {e['mean_accuracy']:.3f}"
                     + (f" ({spread[0]:.3f}-{spread[1]:.3f})" if len(e['seeds']) > 1 else '')
                     + f" | {hardest}: {e['accuracy'][hardest]:.3f} |")
    return '\n'.join(lines)


def save_png(fig, path) -> Path:
    """Write the matplotlib Figure ``fig`` as a PNG to ``path`` (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format='png', dpi=100)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m evidence.plots', description=__doc__.split('\n\n')[0])
    p.add_argument('--results', nargs='+', default=['evidence/results/mqar.jsonl'],
                   help='JSON-lines files of rows (one per machine session, say), read as one')
    p.add_argument('--out', default='evidence/figures')
    args = p.parse_args(argv)
    entries = best([row for path in args.results for row in runs.read_rows(path)])
    if not entries:
        p.error(f"--results: no complete MQAR rows in {' '.join(args.results)}")
    out = Path(args.out)
    for name, plot in (('mqar_pairs', plot_pairs), ('mqar_state', plot_state), ('mqar_curves', plot_curves),
                       ('mqar_loads', plot_loads), ('mqar_assignment', plot_assignment)):
        try:
            print(plot(entries, out / f"{name}.png"))
        except ValueError as e:
            print(f"{name}: {e}")
    print(summary_table(entries))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
