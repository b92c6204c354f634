"""The MQAR experiment's code on the CPU (the results come from the GPU): every model of the comparison trains a step
through the same code and writes its row, the variants hold what they claim (equal parameters, equal state), runs
resume, and the figures and table come out of the rows."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from evidence import runs
from evidence.models import ModelSpec, build, count_parameters, describe
from evidence.mqar import TrainConfig, categories, jobs, main, parser, train, train_command
from evidence.mqar_data import MQARSetting, make_mqar_batch
from tests import hosts

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")

HOSTS = ['GatedDeltaNet', 'GLA', hosts.param('Mamba2')]
VARIANTS = ['host', 'mom', 'host_params', 'host_state']
TINY = TrainConfig(steps=2, batch_size=2, eval_examples=2, eval_batch=2, snapshots=2, eval_every=1, curve_examples=1,
                   train_mix=(MQARSetting(64, 4),), test_settings=(MQARSetting(64, 4), MQARSetting(64, 8)),
                   assignment_setting=MQARSetting(64, 4), assignment_examples=2)


@pytest.mark.parametrize('host', HOSTS)
def test_every_model_trains_writes_its_row_and_resumes(host, tmp_path, monkeypatch):
    results = tmp_path / 'mqar.jsonl'
    rows = [train(ModelSpec(host, 64, variant, vocab_size=512), TINY, 'cpu', results, progress=False)
            for variant in VARIANTS]
    for row, variant in zip(rows, VARIANTS):
        assert row['variant'] == variant and row['task'] == 'mqar'
        assert set(row['accuracy']) == {'64x4', '64x8'} and all(0 <= a <= 1 for a in row['accuracy'].values())
        assert torch.isfinite(torch.tensor(row['loss'])).all() and len(row['loss']) == 2
        assert row['device'] == 'cpu' and row['commit'] and row['date']
        assert row['complete'] and row['steps_done'] == 2 and 'time_limit' not in row
        assert row['host_as_one_memory'] == (variant != 'mom')  # the CPU's stand-in for a plain host
        assert ('loads' in row) == ('assignment' in row) == (variant == 'mom')
        # accuracy along the way (on the test sets' first example each), then the final one on all of them
        (s1, a1), (s2, a2) = row['accuracy_curve']
        assert (s1, s2) == (1, 2) and 0 <= a1 <= 1 and a2 == round(row['mean_accuracy'], 4)
    mom = rows[1]
    for layer in mom['loads'].values():
        assert layer['steps'] == [1, 2] and all(abs(sum(load) - 1) < 1e-9 for load in layer['load'])
    for layer in mom['assignment'].values():
        assert layer['categories'] == ['key', 'value', 'query', 'filler']
        assert all(abs(sum(share) - 1) < 1e-9 for share in layer['share'])
    assert [json.loads(line)['run_id'] for line in results.read_text().splitlines()] == [r['run_id'] for r in rows]

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run trained again')
    monkeypatch.setattr('evidence.mqar.build', no_training)
    assert train(ModelSpec(host, 64, 'mom', vocab_size=512), TINY, 'cpu', results, progress=False) == mom

    from evidence import plots
    entries = plots.best(runs.read_rows(results))
    assert len(entries) == 4
    for plot in (plots.plot_pairs, plots.plot_state, plots.plot_curves, plots.plot_loads, plots.plot_assignment):
        path = plot(entries, tmp_path / f'{plot.__name__}.png')
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = plots.summary_table(entries)
    assert table.count('\n') == 5 and f'MoM({host})' in table


@pytest.mark.parametrize('host', HOSTS)
def test_variants_hold_equal_parameters_and_equal_state(host):
    """``host_params`` has MoM's parameter count (within 2%: the nearest value width), ``host_state`` exactly MoM's
    state, (M + 1) times the host's; MoM's write side is M + 1 copies of the host's."""
    d = {v: describe(ModelSpec(host, 64, v), build(ModelSpec(host, 64, v))) for v in VARIANTS}
    assert abs(d['host_params']['params'] - d['mom']['params']) <= 0.02 * d['mom']['params']
    assert d['host']['params'] < d['mom']['params']
    assert d['mom']['state_size'] == d['host_state']['state_size'] == 5 * d['host']['state_size']
    assert d['host_params']['state_size'] > d['host']['state_size']


def test_one_memory_stand_in_has_the_hosts_parameters():
    """On the CPU the plain host trains as its one-memory copy: the same parameter count but for the router
    (d_model x 1 per layer)."""
    spec = ModelSpec('GatedDeltaNet', 64)
    plain, stand_in = build(spec), build(spec, host_as_one_memory=True)
    assert count_parameters(stand_in) == count_parameters(plain) + 2 * 64


def test_categories_mark_every_position_once():
    batch = make_mqar_batch(MQARSetting(64, 4), 3, vocab_size=64, seed=0)
    masks = categories(batch)
    assert torch.equal(sum(m.long() for m in masks.values()), torch.ones(3, 64, dtype=torch.long))
    assert masks['key'][:, :8].sum() == 12 and masks['query'].sum() == 12
    assert torch.equal(batch.inputs[masks['query']].view(3, 4).sort(1).values, batch.keys.sort(1).values)


def test_sweep_runs_its_grid_in_processes_and_resumes(tmp_path):
    results = tmp_path / 'mqar.jsonl'
    args = ['sweep', '--hosts', 'GLA', '--d-models', '64', '--variants', 'host', '--lrs', '1e-3', '--steps', '1',
            '--batch-size', '2', '--eval-examples', '2', '--eval-batch', '2', '--vocab-size', '256', '--train-mix',
            '64x4', '--eval-every', '1', '--test-settings', '64x4', '--device', 'cpu', '--results', str(results),
            '--logs', str(tmp_path / 'logs'), '--jobs', '1']
    assert main(args) == 0, (tmp_path / 'logs').joinpath(os.listdir(tmp_path / 'logs')[0]).read_text()[-3000:]
    rows = runs.read_rows(results)
    assert len(rows) == 1 and rows[0]['run_id'].startswith('GLA-d64-host-v256-lr0.001-s0-n1-b2-data')
    assert rows[0]['eval_every'] == 1 and len(rows[0]['accuracy_curve']) == 1  # (1 step: only the final accuracy)
    assert main(args) == 0 and len(runs.read_rows(results)) == 1  # resumed: nothing left to run
    # another machine's output folder: the runs done in the committed rows (--done-in) are not run again
    elsewhere = tmp_path / 'out' / 'mqar.jsonl'
    assert main(args[:-6] + ['--results', str(elsewhere), '--done-in', str(results)] + args[-4:]) == 0
    assert not elsewhere.exists()


def test_sweep_grid_and_errors():
    grid = jobs(['GatedDeltaNet', 'GLA'], [64, 128], VARIANTS, [1e-3, 3e-3], [0, 1], [0.01, 0.0])
    assert len(grid) == 2 * 2 * (3 + 2) * 2 * 2  # the balancing-loss settings multiply the MoM models only
    assert len({TINY.run_id(s) + f'{lr}{seed}' for s, lr, seed in grid}) == len(grid)
    with pytest.raises(ValueError, match='host: expected one of'):
        ModelSpec('LSTM', 64)
    with pytest.raises(ValueError, match='d_model: must be a multiple of 64'):
        ModelSpec('GLA', 96)
    with pytest.raises(SystemExit):
        main(['train', '--host', 'GLA'])  # --d-model is required
    # the attention control: the host variant only
    assert [(s.host, s.variant) for s, _, _ in jobs(['Attention'], [64], VARIANTS, [1e-3], [0], [0.01])] == [
        ('Attention', 'host')]
    with pytest.raises(ValueError, match="variant: Attention is a control"):
        ModelSpec('Attention', 64, 'mom')


def test_attention_control_trains_and_sits_beside_the_hosts_in_the_figures(tmp_path, capsys):
    """The softmax-attention control (transformers' Llama) runs through the same loop and command; its row has no
    fixed state (None), the state figure leaves it out, the pairs figure and the table show it."""
    results = tmp_path / 'mqar.jsonl'
    assert main(['train', '--host', 'Attention', '--d-model', '64', '--steps', '2', '--batch-size', '2',
                 '--eval-examples', '2', '--eval-batch', '2', '--vocab-size', '512', '--train-mix', '64x4',
                 '--test-settings', '64x4,64x8', '--eval-every', '1', '--device', 'cpu', '--results',
                 str(results)]) == 0
    out = capsys.readouterr()
    assert 'state a KV cache' in out.out and 'step 1: loss' in out.err + out.out
    rows = runs.read_rows(results) + [train(ModelSpec('GLA', 64, vocab_size=512), TINY, 'cpu', results,
                                            progress=False)]
    assert rows[0]['state_size'] is None and rows[0]['host_as_one_memory'] is False and rows[1]['state_size'] > 0
    from evidence import plots
    entries = plots.best(runs.read_rows(results))
    for plot in (plots.plot_pairs, plots.plot_state, plots.plot_curves):
        assert plot(entries, tmp_path / f'{plot.__name__}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the control is a grey reference line in the hosts' panels of its width, not a panel of its own
    control = next(e for e in entries if e['host'] == 'Attention')
    assert plots._panels(entries) == [('GLA', 64)] and plots._targets(control, [('GLA', 64)]) == [('GLA', 64)]
    assert '| Attention | 64 |' in plots.summary_table(entries) and '| KV cache |' in plots.summary_table(entries)


def test_sweep_passes_every_training_option_to_its_runs():
    """A sweep run's command line parses back to the sweep's own training options (--first-config was once
    dropped there, and every run of a sweep tuned its kernels again)."""
    p = parser()
    sweep = p.parse_args(['sweep', '--steps', '7', '--batch-size', '3', '--eval-examples', '5', '--eval-batch', '4',
                          '--eval-every', '2', '--curve-examples', '6', '--vocab-size', '600', '--train-mix', '64x4',
                          '--test-settings', '64x4,128x8', '--device', 'cpu', '--results', 'r.jsonl',
                          '--first-config', '--time-limit', '30'])
    spec = ModelSpec('GLA', 128, 'mom', balance=0.0)
    run = p.parse_args(train_command(sweep, spec, 3e-3, 2)[3:])
    train_options = {a.dest for a in p._subparsers._group_actions[0].choices['train']._actions} - {'help'}
    for dest in train_options - {'host', 'd_model', 'variant', 'balance', 'lr', 'seed', 'quiet'}:
        assert getattr(run, dest) == getattr(sweep, dest), dest
    assert (run.host, run.d_model, run.variant, run.balance, run.lr, run.seed) == ('GLA', 128, 'mom', 0.0, 3e-3, 2)


def test_a_run_stopped_at_its_time_limit_says_so_and_runs_again(tmp_path):
    """--time-limit (a time-boxed machine): training stops after the first step past the limit, the row says how
    far it got (complete false, steps_done, the curve's last point there), and it counts as not done: the sweep's
    resume list, the figures and a later train call leave it out (that call trains the run in full)."""
    from evidence import plots
    results = tmp_path / 'mqar.jsonl'
    spec = ModelSpec('GLA', 64, 'mom', vocab_size=512)
    cut = train(spec, dataclasses.replace(TINY, time_limit=0.0), 'cpu', results, progress=False)
    assert not cut['complete'] and cut['steps_done'] == 1 and cut['steps'] == 2
    assert [step for step, _ in cut['accuracy_curve']] == [1] and len(cut['loss']) == 1
    assert runs.done(results) == set() and plots.best(runs.read_rows(results)) == []
    full = train(spec, TINY, 'cpu', results, progress=False)
    assert full['complete'] and full['steps_done'] == 2 and full['run_id'] == cut['run_id']
    assert runs.done(results) == {full['run_id']} and len(plots.best(runs.read_rows(results))) == 1


def test_figures_and_table_read_several_results_files_as_one(tmp_path, capsys):
    """`python -m evidence.plots --results A B`: the rows of every file (one per machine session) make the figures
    and the table, the same as one file holding them all. The rows are the first GPU pair's, as committed."""
    from evidence import plots
    committed = Path(__file__).parent.parent / 'evidence' / 'results' / 'mqar-2026-12-07-h100.jsonl'
    lines = committed.read_text().splitlines(keepends=True)
    first, second = tmp_path / 'a.jsonl', tmp_path / 'b.jsonl'
    first.write_text(''.join(lines[:3]))
    second.write_text(''.join(lines[3:]))
    assert plots.main(['--results', str(committed), '--out', str(tmp_path / 'one')]) == 0
    one = capsys.readouterr().out
    assert plots.main(['--results', str(first), str(second), '--out', str(tmp_path / 'two')]) == 0
    two = capsys.readouterr().out
    table = one[one.index('| model |'):]
    assert table == two[two.index('| model |'):]
    assert table.count('\n| ') == len(plots.best(runs.read_rows(committed)))  # (a row a model, after the header)
    assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == sorted(p.name for p in (tmp_path / 'one').iterdir())
