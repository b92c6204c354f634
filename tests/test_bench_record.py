"""The benchmarks' record (benchmarks/record.py): JSON rows round-trip, and the sequence-length plot renders
from synthetic rows on the CPU; bench_decode.py calls every layer the host's way."""
import copy
import importlib.util
import json
import pathlib

import pytest
import torch

from tests import hosts

_PATH = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'record.py'
_spec = importlib.util.spec_from_file_location('mom_wrap_bench_record', _PATH)
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

RUN = {'gpu': 'NVIDIA H100 80GB HBM3', 'cuda': '12.8', 'torch': '2.13.0', 'triton': '3.7.1', 'fla': '0.6.0',
       'mamba_ssm': None, 'git_commit': '0' * 40, 'git_dirty': False, 'date': '2026-11-26T00:00:00+00:00',
       'python': '3.12.0', 'argv': ['bench_layer.py']}


def sweep_rows(path=None):
    """A bench_layer sweep as the benchmark records it: constant tokens, fla out of memory at the longest."""
    rec = record.Recorder(path, 'bench_layer', run=RUN)
    for T, (host, ours, fla) in {2048: (5.0, 16.0, 21.0), 8192: (5.5, 17.0, 23.0),
                                 16384: (6.0, 18.0, 25.0), 65536: (7.0, 20.0, None)}.items():
        case = {'batch': 65536 // T, 'seq_len': T, 'tokens': 65536, 'mode': 'fwd+bwd'}
        ref = rec.add('GatedDeltaNet (host)', 'host', 'GatedDeltaNet', case, host, 800.0)
        rec.add('mom_wrap MoM(GatedDeltaNet)', 'mom_wrap', 'GatedDeltaNet', case, ours, 2500.0, ref=ref)
        rec.add('fla MomAttention', 'fla_mom', 'GatedDeltaNet', case, fla, None if fla is None else 2000.0,
                'ok' if fla else 'oom', ref=ref)
    return rec.rows


def test_json_rows_round_trip(tmp_path):
    path = tmp_path / 'rows.json'
    rows = sweep_rows(str(path))
    assert json.loads(path.read_text())['format'] == record.FORMAT
    back = record.read_rows(str(path), str(path))
    assert back == rows + rows
    ours = back[1]
    assert set(ours) == {'benchmark', 'name', 'role', 'host', 'case', 'ms', 'peak_mib', 'ratio', 'peak_ratio',
                         'status', 'run'}
    assert (ours['ratio'], ours['peak_ratio'], ours['run']['gpu']) == (3.2, 3.125, RUN['gpu'])
    oom = back[-1]
    assert (oom['status'], oom['ms'], oom['peak_mib'], oom['ratio']) == ('oom', None, None, None)
    (tmp_path / 'other.json').write_text('[]')
    with pytest.raises(ValueError, match='format'):
        record.read_rows(str(tmp_path / 'other.json'))


def test_run_metadata_is_json():
    meta = record.run_metadata()
    assert {'gpu', 'torch', 'triton', 'fla', 'git_commit', 'date'} <= set(meta)
    json.dumps(meta)


def test_plot_from_synthetic_rows(tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'seq_len.png'
    record.plot_seq_len(sweep_rows() + [{'benchmark': 'bench_decode'}], str(out))
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000
    with pytest.raises(ValueError, match='no bench_layer rows'):
        record.plot_seq_len([], str(tmp_path / 'empty.png'))



@pytest.mark.parametrize('host', ['GatedDeltaNet', 'RWKV7Attention', 'HGRN2Attention', hosts.param('Mamba2')])
def test_decode_bench_calls_each_layer_the_hosts_way(host, monkeypatch):
    """bench_decode.py's prefill and step go through the host's convention (fla's Cache, mamba-ssm's
    InferenceParams) with the host's own arguments (RWKV7's v_first, HGRN2's lower bound): a step after an 8-token
    prompt equals the full forward's 9th output, for the host and its wrapper (on the CPU, a small layer of each)."""
    monkeypatch.syspath_prepend(str(_PATH.parent))  # (the benchmarks import each other by name)
    import bench_decode
    import bench_layer
    from mom_wrap import MixtureOfMemories
    base = hosts.make(host)
    layers = {'host': copy.deepcopy(base).eval(),
              'mom': MixtureOfMemories(copy.deepcopy(base), num_memories=4, topk=2).eval()}
    convention = bench_decode.convention_of(layers)
    hidden = layers['mom']._adapter.hidden_size
    torch.manual_seed(0)
    prompt, x = torch.randn(2, 8, hidden), torch.randn(2, 1, hidden)
    extra = bench_layer.host_kwargs(host, torch.cat([prompt, x], 1))  # per token [B, T, hidden] or per channel

    def tokens(lo, hi):  # the host's own arguments of tokens lo .. hi-1
        return lambda _: {k: v[:, lo:hi] if v.dim() == 3 else v for k, v in extra.items()}
    for name, layer in layers.items():
        with torch.no_grad():
            cache = convention.new_cache(2, 9)
            convention.call_cached(layer, prompt, cache, **tokens(0, 8)(None))
            got = bench_decode.stepper(layer, convention, cache, x, tokens(8, 9))()
            full = convention.outputs(layer(torch.cat([prompt, x], 1), **extra))[0][:, -1:]
            assert (got - full).abs().max() <= 1e-4 * full.abs().max(), name
            cache = bench_decode.prefill(layer, convention, tokens(0, 8), 2, 8, hidden=hidden, device='cpu',
                                         dtype=torch.float32)
            assert bench_decode.stepper(layer, convention, cache, x, tokens(8, 9))().shape == (2, 1, hidden)


def test_layer_bench_takes_turns_and_reports_the_median(monkeypatch):
    """bench_layer.interleaved: warm-up, then ``repeats`` rounds in which the layers take turns; each layer's number
    is the median of its rounds, its peak the highest; a layer that runs out of memory in a round leaves the rounds
    with an 'oom' status and the others go on."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    import bench_layer
    order, times = [], {'host': iter([3.0, 1.0, 2.0]), 'ours': iter([5.0, 4.0, 6.0]), 'big': iter([1.0])}

    def timed(step, iters):
        name = step()
        order.append(name)
        t = next(times[name], None)
        if t is None:
            raise torch.cuda.OutOfMemoryError('out of memory')
        return t, 10.0 * t

    monkeypatch.setattr(bench_layer, 'timed', timed)
    monkeypatch.setattr(bench_layer.torch.cuda, 'empty_cache', lambda: None)
    steps = {name: (lambda name=name: name) for name in ('host', 'ours', 'big')}
    out = bench_layer.interleaved(steps, iters=4, repeats=3)
    assert order == ['host', 'ours', 'big', 'host', 'ours', 'big', 'host', 'ours']
    assert out['host'] == (2.0, 30.0, [3.0, 1.0, 2.0]) and out['ours'] == (5.0, 60.0, [5.0, 4.0, 6.0])
    assert out['big'] == (None, None, 'oom') and list(out) == ['host', 'ours', 'big']


def test_targets_table_holds_each_case_to_its_target(tmp_path, monkeypatch):
    """benchmarks/targets.py (issue 24's record): per host a line per case with the host's and our times, the ratio
    against its target and whether it is met, peaks, the floor, and the run; the latest run's row where several hold
    a case; "not measured" where none does; fla MomAttention's two targets for GatedDeltaNet."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    import targets
    old, new = dict(RUN, date='2026-12-01T00:00:00+00:00'), dict(RUN, date='2026-12-08T00:00:00+00:00')
    rec_old, rec = record.Recorder(None, 'bench_layer', run=old), record.Recorder(None, 'bench_layer', run=new)
    train = {'batch': 8, 'seq_len': 2048, 'mode': 'fwd+bwd', 'repeats': 5, 'interleaved': True}
    host = rec_old.add('GatedDeltaNet (host)', 'host', 'GatedDeltaNet', train, 6.0, 500.0)
    rec_old.add('mom_wrap MoM(GatedDeltaNet)', 'mom_wrap', 'GatedDeltaNet', train, 18.0, 2500.0, ref=host)
    host = rec.add('GatedDeltaNet (host)', 'host', 'GatedDeltaNet', train, 6.0, 500.0)
    ours = rec.add('mom_wrap MoM(GatedDeltaNet)', 'mom_wrap', 'GatedDeltaNet', train, 11.4, 2100.0, ref=host)
    ours['floor_ms'] = 3.8
    rec.add('fla MomAttention', 'fla_mom', 'GatedDeltaNet', train, 26.0, 2000.0, ref=host)
    prefill = {'batch': 1, 'seq_len': 32768, 'mode': 'prefill'}
    host = rec.add('GatedDeltaNet (host)', 'host', 'GatedDeltaNet', prefill, 4.0, 100.0)
    rec.add('mom_wrap MoM(GatedDeltaNet)', 'mom_wrap', 'GatedDeltaNet', prefill, 9.0, 300.0, ref=host)
    dec = record.Recorder(None, 'bench_decode', run=new)
    graph = {'batch': 64, 'prompt': 512, 'mode': 'decode step, graph'}
    host = dec.add('GatedDeltaNet (host)', 'host', 'GatedDeltaNet', graph, 0.1)
    dec.add('mom_wrap MoM(GatedDeltaNet)', 'mom_wrap', 'GatedDeltaNet', graph, 0.14, ref=host)
    path = tmp_path / 'rows.json'
    record.write_rows(path, rec_old.rows + rec.rows + dec.rows)

    table = targets.host_table(record.read_rows(path), 'GatedDeltaNet').splitlines()
    line = {row.split(' | ')[0].lstrip('| '): row for row in table if row.startswith('| ') and ' ms ' not in row}
    assert line['fwd+bwd 8 x 2048'].startswith('| fwd+bwd 8 x 2048 | 6.00 | 11.40 | 1.90 | <= 2x | yes | 500 / 2100 '
                                               '| 3.0x | H100 80GB HBM3, 2026-12-08, 0000000, median of 5 taking turns')
    assert '| 4.00 | 9.00 | 2.25 | <= 2x | no |' in line['prefill 1 x 32768']
    assert '| 0.10 | 0.14 | 1.40 | <= 1.5x | yes |' in line['decode B = 64, graph']
    assert 'not measured' in line['fwd+bwd 2 x 16384'] and 'not measured' in line['decode B = 64, eager']
    assert ('- fwd+bwd 8 x 2048: fla MomAttention 26.00 ms, 2.28x ours (target >= 2x: yes); peak 2000 MiB against '
            'our 2100 (ours at most its: no)') in table
