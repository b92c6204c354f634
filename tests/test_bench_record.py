"""The benchmarks' record (benchmarks/record.py): JSON rows round-trip, and the sequence-length plot renders
from synthetic rows on the CPU."""
import importlib.util
import json
import pathlib

import pytest

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
