"""The retrofit experiment's code on the CPU (the results come from the GPU): the corpus split, every arm through
the same code with its row, ``init="preserve"`` unchanged at the conversion, resume, the figure."""
import os

import pytest
import torch

from evidence import retrofit, runs
from evidence.retrofit import RetrofitConfig

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                reason="fla's model norms and MLP need TRITON_INTERPRET=1 or CUDA")

TINY = RetrofitConfig(d_model=64, layers=2, pretrain_steps=2, steps=2, batch_size=2, seq_len=32, eval_every=1,
                      eval_windows=2)


def test_corpus_split_by_file_and_windows(tmp_path):
    root = tmp_path / 'lib'
    for i in range(40):
        (root / f'pkg{i % 3}').mkdir(parents=True, exist_ok=True)
        (root / f'pkg{i % 3}' / f'm{i}.py').write_bytes(bytes([i]) * 100)
    (root / 'test').mkdir()
    (root / 'test' / 'test_x.py').write_bytes(b'x' * 100)
    files = retrofit.stdlib_files(str(root))
    assert len(files) == 40  # the test suite is left out
    train, val = retrofit.split(files, root, val_fraction=0.25)
    assert train.numel() + val.numel() == 4000 and 0 < val.numel() < 2000
    assert not set(train.tolist()) & set(val.tolist())  # each file's byte value lands on one side only
    w = retrofit.windows(train, 5, 16, torch.Generator().manual_seed(0))
    assert w.shape == (5, 17) and w.dtype == torch.long
    assert retrofit.split(files, root, 0.25)[1].tolist() == val.tolist()  # stable


def test_every_arm_runs_preserve_starts_at_the_hosts_loss_and_resumes(tmp_path, monkeypatch):
    results = tmp_path / 'retrofit.jsonl'
    rows = retrofit.experiment(TINY, 0, 'cpu', str(results), checkpoints=str(tmp_path / 'ckpt'))
    by_arm = {r['arm']: r for r in rows}
    assert list(by_arm) == list(retrofit.ARMS)
    N, K = TINY.pretrain_steps, TINY.steps
    assert [s for s, _ in by_arm['host']['curve']] == list(range(N + K + 1))  # pretraining, then its continuation
    assert [s for s, _ in by_arm['scratch']['curve']] == list(range(N + K + 1))
    for arm in ('preserve', 'copy'):
        assert [s for s, _ in by_arm[arm]['curve']] == list(range(N, N + K + 1))
    at_conversion = dict(by_arm['host']['curve'])[N]
    assert abs(by_arm['preserve']['curve'][0][1] - at_conversion) <= 1e-5 * at_conversion  # the host's function
    assert abs(by_arm['copy']['curve'][0][1] - at_conversion) > 1e-3  # copies: each memory writes, the read adds
    assert all(r['host_as_one_memory'] and r['val_bytes'] > 0 for r in rows)

    monkeypatch.setattr(retrofit, 'run', lambda *a, **k: pytest.fail('a finished arm trained again'))
    assert retrofit.experiment(TINY, 0, 'cpu', str(results), checkpoints=str(tmp_path / 'ckpt')) == rows
    path = retrofit.plot(runs.read_rows(results), tmp_path / 'retrofit.png')
    assert path.read_bytes()[:4] == b'\x89PNG'


def test_unknown_host_is_refused_by_name(capsys):
    """A host without an fla model here is refused (it once became a GLA model without a word)."""
    with pytest.raises(SystemExit):
        retrofit.main(['--host', 'RWKV7', '--device', 'cpu'])
    assert "--host: expected one of ('GatedDeltaNet', 'GLA'), got 'RWKV7'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="host: fla's models here are"):
        retrofit.plain_model(RetrofitConfig(host='Mamba2', d_model=64, layers=1))
