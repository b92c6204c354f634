"""``mom_wrap.stats``: the recorder's numbers against hand computations from the layers' own routing (two hosts,
padding, packed input, several forwards, snapshots), its cost contract (no host sync, no graph, no double count
under activation checkpointing), its hooks, its plots and its errors."""
import math

import pytest
import torch
import torch.nn as nn
from fla.layers import GatedDeltaNet, GatedLinearAttention

from mom_wrap import MixtureOfMemories, convert
from mom_wrap import stats
from mom_wrap.stats import ROOT, Assignment, MemoryStats, plot_assignment, plot_loads, record
from mom_wrap.testing import wrap
from mom_wrap.testing import logit_rounding, routing_rounding

HIDDEN = 64
HOSTS = {
    'GatedDeltaNet': lambda: GatedDeltaNet(hidden_size=HIDDEN, head_dim=16, num_heads=2, expand_v=2, layer_idx=0),
    'GatedLinearAttention': lambda: GatedLinearAttention(hidden_size=HIDDEN, expand_k=0.5, expand_v=1.0,
                                                         num_heads=2, layer_idx=0),
}
PNG = b'\x89PNG\r\n\x1a\n'


def layer(host='GatedDeltaNet', num_memories=4, topk=2):
    return wrap(HOSTS[host](), num_memories=num_memories, topk=topk)


def hand_stats(mom, num_memories, topk):
    """load [M], mean entropy and mean max-probability of the layer's last forward, written out from its
    ``_routing`` (loops over memories; padding dropped by boolean indexing)."""
    probs, indices, valid = mom._routing
    if valid is not None:
        probs, indices = probs[valid], indices[valid]
    assert indices.shape[1] == topk
    load = torch.tensor([(indices == e).sum().item() for e in range(num_memories)], dtype=torch.float64)
    load /= indices.numel()
    p = probs.double()
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
    return load, entropy, p.max(-1).values.mean().item(), probs.shape[0]


def assert_layer_stats(summary, mom, M=4, k=2):
    load, entropy, max_prob, tokens = hand_stats(mom, M, k)
    assert summary['tokens'] == tokens
    torch.testing.assert_close(summary['load'], load, rtol=0, atol=1e-12)
    assert summary['load'].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert summary['entropy'] == pytest.approx(entropy, rel=1e-5)
    assert summary['max_prob'] == pytest.approx(max_prob, rel=1e-6)


def test_known_routing_gives_hand_computed_loads_and_entropy():
    """Router weight 10 x identity on the first 4 features, tokens 3 x a basis vector: each token's top-1 memory
    is its basis vector's, with logits 30 there and 0 elsewhere."""
    mom = layer(num_memories=4, topk=1)
    with torch.no_grad():
        mom.router.weight.zero_()
        mom.router.weight[:, :4] = 10 * torch.eye(4)
    target = torch.tensor([[0, 0, 1, 3, 0, 2], [1, 0, 0, 3, 3, 0]])
    x = 3 * torch.nn.functional.one_hot(target, HIDDEN).float()
    with record(mom) as rec:
        mom(x)
    s = rec.summary()[ROOT]
    torch.testing.assert_close(s['load'], torch.tensor([6, 2, 1, 3], dtype=torch.float64) / 12)
    z = math.exp(30) + 3  # softmax over logits (30, 0, 0, 0)
    p_top, p_other = math.exp(30) / z, 1 / z
    assert s['entropy'] == pytest.approx(-(p_top * math.log(p_top) + 3 * p_other * math.log(p_other)), rel=1e-4)
    assert s['max_prob'] == pytest.approx(p_top, rel=1e-6)
    assert s['tokens'] == 12 and s['forwards'] == 1 and s['layer_idx'] == 0


@pytest.mark.parametrize('host', sorted(HOSTS))
def test_loads_entropy_equal_the_layers_own_routing(host):
    mom = layer(host)
    with record(mom) as rec:
        mom(torch.randn(3, 17, HIDDEN))
    s = rec.summary()[ROOT]
    assert_layer_stats(s, mom)
    # the mean probabilities are the P_e of the layer's balancing loss: M * sum_e load_e P_e is that loss
    assert (4 * (s['load'] * s['mean_prob']).sum()).item() == pytest.approx(mom.balance_loss.item(), rel=1e-6)
    assert rec.loads()[ROOT].equal(s['load'])


@pytest.mark.parametrize('host', sorted(HOSTS))
def test_padding_is_excluded(host):
    mom = layer(host)
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    x[1, :5] = float('nan')  # padding content must not reach the numbers
    with record(mom) as rec:
        rec.capture_next()
        mom(x, attention_mask=mask)
    s = rec.summary()[ROOT]
    assert s['tokens'] == 19
    assert_layer_stats(s, mom)
    a = rec.assignments()[ROOT]
    assert a.valid.equal(mask.bool())
    assert (a.indices[~a.valid] == -1).all() and (a.weights[~a.valid] == 0).all()
    assert (a.indices[a.valid] >= 0).all()
    torch.testing.assert_close(a.weights[a.valid].sum(-1), torch.ones(19))
    # the same tokens without padding: the same numbers
    with record(mom) as alone:
        mom(x[:1])
        mom(x[1:, 5:])
    # loads: counts, exact; the fp32 probabilities of other row counts round apart (tests/routing_rounding.py):
    # each token's by at most routing_rounding over all M, the entropy relatively by 2 logit_rounding
    torch.testing.assert_close(alone.summary()[ROOT]['load'], s['load'])
    torch.testing.assert_close(alone.summary()[ROOT]['mean_prob'], s['mean_prob'], rtol=0,
                               atol=routing_rounding(mom, x, topk=4))
    assert alone.summary()[ROOT]['entropy'] == pytest.approx(s['entropy'], rel=1e-6 + 2 * logit_rounding(mom, x))


@pytest.mark.parametrize('host', sorted(HOSTS))
def test_packed_input(host):
    mom = layer(host)
    x = torch.randn(1, 20, HIDDEN)
    with record(mom) as rec:
        rec.capture_next()
        mom(x, cu_seqlens=torch.tensor([0, 7, 8, 20]))
    s = rec.summary()[ROOT]
    assert s['tokens'] == 20
    assert_layer_stats(s, mom)
    a = rec.assignments()[ROOT]
    assert a.indices.shape == (1, 20, 2) and a.valid.all()
    probs = mom._routing[0]
    want = probs.gather(1, mom._routing[1])
    torch.testing.assert_close(a.weights[0], want / want.sum(-1, keepdim=True))
    assert a.indices[0].equal(mom._routing[1])


def test_forwards_accumulate_and_snapshots_keep_deltas():
    mom = layer()
    batches = [torch.randn(2, 9, HIDDEN), torch.randn(1, 13, HIDDEN), torch.randn(3, 5, HIDDEN)]
    singles = []
    for xb in batches:
        with record(mom) as one:
            mom(xb)
        singles.append(one.summary()[ROOT])
    rec = MemoryStats(mom).attach()
    mom(batches[0])
    rec.snapshot(10)
    mom(batches[1])
    mom(batches[2])
    rec.snapshot(20)
    rec.snapshot(30)  # nothing ran since: no tokens
    rec.detach()

    def counts(*s):  # routed slots per memory
        return sum(x['load'] * x['tokens'] * 2 for x in s)
    total = rec.summary()[ROOT]
    assert total['forwards'] == 3 and total['tokens'] == 18 + 13 + 15
    torch.testing.assert_close(total['load'], counts(*singles) / (46 * 2))
    h = rec.history()[ROOT]
    assert h['steps'] == [10, 20, 30] and h['forwards'] == [1, 2, 0]
    assert h['tokens'].tolist() == [18, 28, 0]
    torch.testing.assert_close(h['load'][0], singles[0]['load'])
    torch.testing.assert_close(h['load'][1], counts(*singles[1:]) / (28 * 2))
    assert h['load'][2].isnan().all() and math.isnan(h['entropy'][2])
    assert h['entropy'][0].item() == pytest.approx(singles[0]['entropy'], rel=1e-9)
    rec.reset()
    assert rec.summary()[ROOT]['tokens'] == 0 and rec.history()[ROOT]['steps'] == []


def test_per_forward_path_does_not_sync(monkeypatch):
    """The hook reads nothing back from the device: every Tensor -> Python value raises while it runs
    (with padding and an armed capture, so that every branch of it runs)."""
    real = MemoryStats._on_forward
    calls = []

    def guarded(self, *args):
        def refuse(*a, **k):
            raise AssertionError("host sync in the recorder's per-forward path")
        with pytest.MonkeyPatch.context() as m:
            for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__'):
                m.setattr(torch.Tensor, name, refuse)
            real(self, *args)
        calls.append(1)
    monkeypatch.setattr(MemoryStats, '_on_forward', guarded)
    mom = layer()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with record(mom) as rec:
        rec.capture_next()
        mom(torch.randn(2, 8, HIDDEN), attention_mask=mask)
        mom(torch.randn(2, 8, HIDDEN))
        rec.snapshot(1)
    assert len(calls) == 2
    assert rec.summary()[ROOT]['tokens'] == 13 + 16


def test_no_graph_is_kept():
    mom = layer().train()
    x = torch.randn(2, 10, HIDDEN, requires_grad=True)
    with record(mom) as rec:
        rec.capture_next()
        mom(x)[0].sum().backward()
        rec.snapshot(0)
    inner = rec._layers[ROOT]
    stored = [inner.sums, inner.mark, *rec._snapshots[0][1][ROOT][:1], inner.assignment.indices,
              inner.assignment.weights]
    assert not any(t.requires_grad or t.grad_fn is not None for t in stored)
    s = rec.summary()[ROOT]
    assert not s['load'].requires_grad and not s['mean_prob'].requires_grad
    assert not rec.history()[ROOT]['load'].requires_grad


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_activation_checkpointing_counts_each_forward_once(use_reentrant):
    mom = layer().train()
    x = torch.randn(2, 10, HIDDEN)
    with record(mom) as plain:
        mom(x)
    runs = []
    counter = mom.register_forward_hook(lambda *a: runs.append(1))
    with record(mom) as rec:
        xi = x.clone().requires_grad_()  # a reentrant checkpoint passes gradients only to inputs that need them
        # the non-reentrant recompute stops by default once it has what the backward needs (before the hooks)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            y = torch.utils.checkpoint.checkpoint(lambda h: mom(h)[0], xi, use_reentrant=use_reentrant)
        y.sum().backward()
    counter.remove()
    assert len(runs) == 2  # the forward did run again in the backward
    got, want = rec.summary()[ROOT], plain.summary()[ROOT]
    assert got['forwards'] == 1 and got['tokens'] == want['tokens'] == 20
    torch.testing.assert_close(got['load'], want['load'])


def test_detach_removes_the_hooks():
    mom = layer()
    before = len(mom._forward_hooks)
    rec = MemoryStats(mom)
    assert not rec.attached
    rec.attach()
    assert rec.attached and len(mom._forward_hooks) == before + 1
    with pytest.raises(RuntimeError, match='already attached'):
        rec.attach()
    mom(torch.randn(1, 6, HIDDEN))
    rec.detach()
    assert not rec.attached and len(mom._forward_hooks) == before
    mom(torch.randn(1, 6, HIDDEN))
    assert rec.summary()[ROOT]['forwards'] == 1 and rec.summary()[ROOT]['tokens'] == 6
    with rec:  # a context manager: attached inside, detached after
        assert len(mom._forward_hooks) == before + 1
    assert len(mom._forward_hooks) == before


def test_converted_two_layer_model():
    from tests.test_models import host_model
    model = convert(host_model('GatedDeltaNet'), num_memories=4, topk=2)
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0
    with record(model) as rec:
        rec.capture_next()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        rec.snapshot(0)
        with torch.no_grad():
            model(input_ids=ids)
        rec.snapshot(1)
    assert rec.names == ['model.layers.0.attn', 'model.layers.1.attn']
    summary = rec.summary()
    for i, (name, s) in enumerate(summary.items()):
        assert s['layer_idx'] == i and s['forwards'] == 2 and s['tokens'] == 18 + 22
        assert s['load'].sum().item() == pytest.approx(1.0, abs=1e-12)
        assert 0 < s['entropy'] <= math.log(4) and 0.25 <= s['max_prob'] <= 1
    assert set(rec.assignments()) == set(summary)
    assert [h['tokens'].tolist() for h in rec.history().values()] == [[18, 22], [18, 22]]


def test_assignment_shares_by_hand():
    indices = torch.tensor([[[0, 1], [2, 1], [-1, -1], [0, 2]]])  # [1, 4, 2], token 2 is padding
    weights = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.0, 0.0], [1.0, 0.0]]])
    a = Assignment(indices, weights, indices[..., 0] >= 0, num_memories=3)
    names, share = a.shares({'key': torch.tensor([1, 0, 1, 0]), 'other': torch.tensor([0, 1, 1, 1])})
    assert names == ['key', 'other']  # the padding token counts in no category
    torch.testing.assert_close(share, torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64))
    _, weighted = a.shares(['q', 'k', None, 'k'], weighted=True)
    torch.testing.assert_close(weighted, torch.tensor([[0.75, 0.25, 0], [0.5, 0.25, 0.25]], dtype=torch.float64))
    names, share = a.shares(torch.tensor([[1, 1, 0, -1]]), names=['a', 'b'])
    assert names == ['a', 'b'] and share[0].isnan().all()  # 'a' has only the padding token
    torch.testing.assert_close(share[1], torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


def test_plots_write_pngs(tmp_path):
    from tests.test_models import host_model
    model = convert(host_model('GatedLinearAttention'), num_memories=3, topk=1)
    with record(model) as rec:
        for step in range(3):
            with torch.no_grad():
                model(input_ids=torch.randint(0, 64, (2, 8)))
            rec.snapshot(step * 100)
        rec.capture_next()
        with torch.no_grad():
            model(input_ids=torch.randint(0, 64, (2, 8)))
    paths = [plot_loads(rec.history(), tmp_path / 'loads.png'),
             plot_loads(rec, str(tmp_path / 'loads2.png')),
             plot_assignment(rec.assignments(), ['key', 'value'] * 3 + ['query', 'filler'], tmp_path / 'a.png'),
             plot_assignment(rec.assignments(), torch.tensor([0, 1, 1, 2, 2, 2, 0, 0]), tmp_path / 'b.png',
                             names=['x', 'y', 'z'], weighted=True),
             plot_assignment(next(iter(rec.assignments().values())), {'even': torch.arange(8) % 2 == 0},
                             tmp_path / 'c.png')]
    for path in paths:
        assert path.exists() and path.read_bytes()[:8] == PNG


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match='model: contains no MixtureOfMemories'):
        MemoryStats(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match='model'):
        record('model')
    mom = layer()
    rec = MemoryStats(mom)
    with pytest.raises(ValueError, match='history: no snapshots'):
        plot_loads(rec, tmp_path / 'x.png')
    with pytest.raises(ValueError, match='assignments'):
        plot_assignment(rec.assignments(), ['a'], tmp_path / 'x.png')
    with rec:
        rec.capture_next()
        mom(torch.randn(2, 5, HIDDEN))
    a = rec.assignments()[ROOT]
    with pytest.raises(ValueError, match=r'categories: shape \(4,\)'):
        a.shares(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="categories: mask 'k'"):
        a.shares({'k': torch.ones(2, 6)})
    with pytest.raises(TypeError, match='categories'):
        a.shares(torch.zeros(5))
    with pytest.raises(ValueError, match='names'):
        a.shares(torch.tensor([0, 1, 2, 0, 0]), names=['a'])
    with pytest.raises(ValueError, match='names: only for integer category codes'):
        a.shares(['a'] * 5, names=['a'])
    assert isinstance(stats.record(mom), MemoryStats)


def test_a_bare_layer_and_a_container_are_keyed_by_path():
    moms = nn.ModuleList([layer(), layer('GatedLinearAttention')])
    assert MemoryStats(moms).names == ['0', '1']
    assert MemoryStats(moms[0]).names == [ROOT]
    assert isinstance(moms[0], MixtureOfMemories)
