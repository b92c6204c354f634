"""evidence.mqar_data: the MQAR generator's layout, gap law, fillers, seeding, devices, validation, accuracy."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from evidence.mqar_data import (
    IGNORE_INDEX, TEST_SETTINGS, TRAIN_MIX, MQARMixture, MQARSetting, make_eval_sets, make_mqar_batch,
    mqar_accuracy, mqar_accuracy_per_example,
)


def assert_layout(b, vocab_size, filler='non_key'):
    """Every invariant of the protocol, checked from the inputs/labels themselves (and against the batch's
    keys/values/query_positions)."""
    s = b.setting
    n, T, c = s.num_kv_pairs, s.seq_len, s.context_len
    x, y = b.inputs, b.labels
    B = x.shape[0]
    assert x.dtype == y.dtype == b.keys.dtype == b.values.dtype == b.query_positions.dtype == torch.long
    assert x.shape == y.shape == (B, T) and b.keys.shape == b.values.shape == b.query_positions.shape == (B, n)
    ck, cv = x[:, 0:c:2], x[:, 1:c:2]                       # the context's keys and values
    assert torch.equal(ck, b.keys) and torch.equal(cv, b.values)
    half = vocab_size // 2
    assert ((ck >= 1) & (ck <= half - 1)).all(), 'keys in 1 .. V//2-1'
    assert ((cv >= half) & (cv <= vocab_size - 1)).all(), 'values in V//2 .. V-1'
    assert (ck.sort(dim=1).values.diff(dim=1) > 0).all() and (cv.sort(dim=1).values.diff(dim=1) > 0).all(), 'distinct'
    labelled = y != IGNORE_INDEX
    assert not labelled[:, :c].any(), 'the context is not scored'
    assert (labelled.sum(dim=1) == n).all(), 'one label per key'
    assert not labelled[:, c + 1::2].any(), 'queries at even offsets after the context'
    expected_mask = torch.zeros_like(labelled).scatter_(1, b.query_positions, True)
    assert torch.equal(labelled, expected_mask)
    # each labelled position holds a key of its context, labelled with that key's value
    bi, ti = labelled.nonzero(as_tuple=True)
    match = ck[bi] == x[bi, ti][:, None]                    # [num_labelled, n]
    assert (match.sum(dim=1) == 1).all()
    assert torch.equal(y[bi, ti], cv[bi][match])
    # every key queried exactly once (the labelled tokens of a row are a permutation of its keys)
    assert torch.equal(x[labelled].view(B, n).sort(dim=1).values, ck.sort(dim=1).values)
    assert torch.equal(x.gather(1, b.query_positions), b.keys) and torch.equal(y.gather(1, b.query_positions), b.values)
    filler_mask = ~labelled
    filler_mask[:, :c] = False
    fillers = x[filler_mask]
    assert ((fillers >= 0) & (fillers < vocab_size)).all()
    if filler == 'non_key':
        # a key occurs after the context exactly once: at its query; no filler is a key of its example
        assert ((x[:, None, c:] == ck[:, :, None]).sum(dim=-1) == 1).all()
        is_key = (x[:, :, None] == ck[:, None, :]).any(dim=-1)
        assert not (is_key & filler_mask).any()
    elif filler == 'zero':
        assert (fillers == 0).all()


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize('setting', [MQARSetting(64, 4), MQARSetting(64, 16), MQARSetting(256, 64),
                                     MQARSetting(1024, 256), MQARSetting(20, 5, power_a=1.0)])
def test_layout(setting):
    b = make_mqar_batch(setting, 16, seed=0)
    assert b.setting == setting
    assert_layout(b, 8192)


def test_layout_across_key_draw_chunks():
    """Keys are drawn in chunks of 2^22 // 4095 = 1024 rows at V = 8192: a batch spanning two chunks."""
    b = make_mqar_batch(MQARSetting(64, 8), 1100, seed=0)
    assert_layout(b, 8192)
    assert not torch.equal(b.keys[:76], b.keys[1024:])


def test_layout_hand_checked_small():
    """A tiny example read by eye: T=12, n=2, so context 0..3 and query slots at 4, 6, 8, 10."""
    b = make_mqar_batch(MQARSetting(12, 2), 1, vocab_size=10, seed=3)
    x, y = b.inputs[0].tolist(), b.labels[0].tolist()
    k1, v1, k2, v2 = x[:4]
    assert {k1, k2} <= {1, 2, 3, 4} and {v1, v2} <= {5, 6, 7, 8, 9}
    q = [t for t in range(12) if y[t] != -100]
    assert len(q) == 2 and all(t in (4, 6, 8, 10) for t in q)
    assert {(x[t], y[t]) for t in q} == {(k1, v1), (k2, v2)}


@hsettings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), extra=st.integers(0, 6), spare_vocab=st.integers(0, 30),
       power_a=st.sampled_from([0.01, 0.3, 1.0, 3.0]), filler=st.sampled_from(['non_key', 'any', 'zero']),
       seed=st.integers(0, 2**31 - 1))
def test_layout_property(n, extra, spare_vocab, power_a, filler, seed):
    """Any valid setting, down to the smallest vocabulary (2n+2: every key token is a key) and odd vocabularies."""
    setting = MQARSetting(4 * n + 2 * extra, n, power_a=power_a)
    vocab = 2 * n + 2 + spare_vocab
    b = make_mqar_batch(setting, 3, vocab_size=vocab, seed=seed, filler=filler)
    assert_layout(b, vocab, filler)


# ---------------------------------------------------------------- gaps follow the power law

def _chi2_bound(df, z=5.0):
    """Wilson-Hilferty: the chi-square quantile at a z-sigma tail (z=5: p ~ 3e-7); the seeds are fixed, so a pass
    cannot flake, and the bound stays far from the expected value df."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _slot_counts(setting, batch, seed, j=0):
    b = make_mqar_batch(setting, batch, seed=seed, vocab_size=64)     # a small vocabulary: cheap key draws
    slots = (b.query_positions[:, j] - setting.context_len) // 2      # gap - 1
    return torch.bincount(slots, minlength=setting.num_query_slots).double()


def test_gaps_power_law_small_a():
    """One pair: its gap is one draw of p(g) ∝ g^(a-1); with a=0.01 small gaps dominate (p(1)/p(31) = 31^0.99)."""
    setting = MQARSetting(64, 1, power_a=0.01)                        # 31 slots
    counts = _slot_counts(setting, 40_000, seed=0)
    p = setting.gap_probabilities()
    assert _chi2(counts, p) < _chi2_bound(30)
    uniform = torch.full_like(p, 1 / len(p))
    assert _chi2(counts, uniform) > 100 * _chi2_bound(30)              # the check can tell the laws apart
    assert counts[0] > 10 * counts[-1]
    assert counts[:4].sum() > 0.4 * counts.sum()                      # p(1..4) ~ 0.51, uniform would give 0.13


def test_gaps_uniform_with_a_one():
    setting = MQARSetting(64, 1, power_a=1.0)
    counts = _slot_counts(setting, 40_000, seed=1)
    uniform = torch.full((31,), 1 / 31, dtype=torch.float64)
    assert torch.allclose(setting.gap_probabilities(), uniform)
    assert _chi2(counts, uniform) < _chi2_bound(30)
    assert counts.max() < 1.4 * counts.min()                          # ~1290 per slot, sd ~35


def test_gaps_large_a_favours_late_queries():
    counts = _slot_counts(MQARSetting(64, 1, power_a=3.0), 20_000, seed=2)
    assert counts[-1] > 10 * counts[0]


def test_gaps_match_sequential_sampling_without_replacement():
    """Several pairs: Zoology draws the slots with numpy's choice(replace=False, p=p) (sequential, renormalised) and
    gives key j the j-th drawn slot. The Gumbel-top-k draw must match it in distribution: per-slot inclusion
    frequencies and the mean slot of each key j, against numpy's sampler (same RandomState.choice as Zoology)."""
    setting = MQARSetting(64, 8, power_a=0.01)                        # 24 slots, 8 queries
    S, n, N = setting.num_query_slots, setting.num_kv_pairs, 20_000
    b = make_mqar_batch(setting, N, seed=5, vocab_size=64)
    ours = ((b.query_positions - setting.context_len) // 2).numpy()   # [N, n], key j -> column j
    p = setting.gap_probabilities().numpy()
    rs = np.random.RandomState(0)
    ref = np.stack([rs.choice(S, size=n, replace=False, p=p) for _ in range(N)])
    incl_ours = np.bincount(ours.ravel(), minlength=S) / N
    incl_ref = np.bincount(ref.ravel(), minlength=S) / N
    assert np.abs(incl_ours - incl_ref).max() < 0.03                 # se of a difference <= 0.005
    assert np.abs(ours.mean(0) - ref.mean(0)).max() < 0.5            # se of a difference ~0.07
    assert ours[:, 0].mean() < ours[:, -1].mean() - 2                 # the first keys take the earliest slots
    # key 0's slot is exactly one draw of p
    assert _chi2(torch.from_numpy(np.bincount(ours[:, 0], minlength=S)).double(), torch.from_numpy(p)) \
        < _chi2_bound(S - 1)


def test_all_slots_taken_when_tight():
    """seq_len = 4n: every slot holds a query, whatever the law."""
    b = make_mqar_batch(MQARSetting(32, 8, power_a=0.01), 8, seed=0)
    assert torch.equal(b.query_positions.sort(dim=1).values, torch.arange(16, 32, 2).expand(8, 8))


# ---------------------------------------------------------------- fillers

def _filler_mask(b):
    m = b.labels == IGNORE_INDEX
    m[:, :b.setting.context_len] = False
    return m


def test_non_key_fillers_uniform_over_non_keys():
    """Small vocabulary so that keys would often be hit: each filler is uniform over the V - n non-keys of its
    example (token 0 and the values included)."""
    V, setting, B = 16, MQARSetting(64, 2), 2000
    b = make_mqar_batch(setting, B, vocab_size=V, seed=0)
    assert_layout(b, V)
    fm = _filler_mask(b)
    per_row = fm.sum(dim=1)[0].item()
    assert (fm.sum(dim=1) == per_row).all() and per_row == 64 - 4 - 2
    observed = torch.bincount(b.inputs[fm], minlength=V).double()
    not_key = torch.ones(B, V, dtype=torch.bool).scatter_(1, b.keys, False)
    expected = not_key.double().sum(dim=0) * per_row / (V - 2)
    assert ((observed - expected).abs() < 0.1 * expected).all()       # ~8000 per token, sd ~90
    assert observed[0] > 0


def test_any_fillers_are_zoology_whole_vocabulary():
    V = 16
    b = make_mqar_batch(MQARSetting(64, 4), 500, vocab_size=V, seed=0, filler='any')
    assert_layout(b, V, filler='any')
    fm = _filler_mask(b)
    assert torch.bincount(b.inputs[fm], minlength=V).min() > 0
    is_key = (b.inputs[:, :, None] == b.keys[:, None, :]).any(dim=-1)
    assert (is_key & fm).any(), "Zoology's fillers can be keys of their example"


def test_zero_fillers():
    b = make_mqar_batch(MQARSetting(64, 4), 8, seed=0, filler='zero')
    assert_layout(b, 8192, filler='zero')
    assert (b.inputs[_filler_mask(b)] == 0).all()


# ---------------------------------------------------------------- seeding and devices

def test_reproducible_and_independent_of_global_rng():
    s = MQARSetting(128, 16)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = make_mqar_batch(s, 8, seed=7)
    assert torch.equal(torch.get_rng_state(), state), 'the global RNG is not advanced'
    torch.manual_seed(2)
    b = make_mqar_batch(s, 8, seed=7)
    for f in ('inputs', 'labels', 'keys', 'values', 'query_positions'):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = make_mqar_batch(s, 8, seed=8)
    assert not torch.equal(a.inputs, c.inputs) and not torch.equal(a.query_positions, c.query_positions)


def test_generator_argument():
    s = MQARSetting(64, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1, a2 = make_mqar_batch(s, 4, generator=g1), make_mqar_batch(s, 4, generator=g2)
    assert torch.equal(a1.inputs, a2.inputs)
    assert not torch.equal(make_mqar_batch(s, 4, generator=g1).inputs, a1.inputs), 'the generator advances'
    assert make_mqar_batch(s, 4, generator=torch.Generator().manual_seed(3), device='cpu').inputs.equal(a1.inputs)


def test_seed_none_is_fresh():
    s = MQARSetting(64, 8)
    assert not torch.equal(make_mqar_batch(s, 4).inputs, make_mqar_batch(s, 4).inputs)


def test_cpu_device_and_to():
    b = make_mqar_batch(MQARSetting(64, 4), 2, seed=0, device='cpu')
    assert b.inputs.device.type == 'cpu' and b.labels.device.type == 'cpu'
    m = b.to('meta')
    assert m.inputs.device.type == m.query_positions.device.type == 'meta' and m.setting == b.setting


@pytest.mark.gpu
def test_generates_on_cuda():
    s = MQARSetting(256, 64)
    b = make_mqar_batch(s, 32, seed=0, device='cuda')
    for t in (b.inputs, b.labels, b.keys, b.values, b.query_positions):
        assert t.is_cuda and t.dtype == torch.long
    assert_layout(b.to('cpu'), 8192)
    assert torch.equal(make_mqar_batch(s, 32, seed=0, device='cuda').inputs, b.inputs)
    g = torch.Generator(device='cuda').manual_seed(0)
    assert make_mqar_batch(s, 2, generator=g).inputs.is_cuda
    mix = MQARMixture(TRAIN_MIX, 4, seed=0, device='cuda', num_batches=3)
    assert all(x.inputs.is_cuda for x in mix)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize('args, kwargs, match', [
    ((63, 4), {}, 'seq_len'),
    ((0, 1), {}, 'seq_len'),
    ((64.0, 4), {}, 'seq_len'),
    ((True, 4), {}, 'seq_len'),
    ((64, 17), {}, 'num_kv_pairs'),
    ((64, 0), {}, 'num_kv_pairs'),
    ((64, 4), {'power_a': 0}, 'power_a'),
    ((64, 4), {'power_a': -1.0}, 'power_a'),
    ((64, 4), {'power_a': float('nan')}, 'power_a'),
    ((64, 4), {'power_a': float('inf')}, 'power_a'),
    ((64, 4), {'power_a': 'x'}, 'power_a'),
])
def test_setting_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARSetting(*args, **kwargs)


def test_setting_accepts_numpy_ints_and_exposes_sizes():
    s = MQARSetting(np.int64(64), np.int32(8), power_a=1)
    assert (s.seq_len, s.num_kv_pairs, s.power_a) == (64, 8, 1.0) and type(s.seq_len) is int
    assert (s.context_len, s.num_query_slots) == (16, 24)
    assert s.gap_probabilities().shape == (24,) and abs(float(s.gap_probabilities().sum()) - 1) < 1e-12


@pytest.mark.parametrize('kwargs, match', [
    ({'vocab_size': 16}, 'num_kv_pairs.*vocab_size'),                # 7 keys for 8 pairs
    ({'vocab_size': 3}, 'vocab_size'),
    ({'vocab_size': 17.5}, 'vocab_size'),
    ({'batch_size': 0}, 'batch_size'),
    ({'filler': 'random'}, 'filler'),
    ({'generator': torch.Generator(), 'seed': 1}, 'generator'),
    ({'generator': torch.Generator(), 'device': 'meta'}, 'device'),
    ({'seed': 1.5}, 'seed'),
])
def test_batch_validation(kwargs, match):
    kwargs = {'batch_size': 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_mqar_batch(MQARSetting(64, 8), **kwargs)
    with pytest.raises(ValueError, match='setting'):
        make_mqar_batch((64, 8), 2)


def test_smallest_vocab_accepted():
    assert_layout(make_mqar_batch(MQARSetting(64, 8), 4, vocab_size=18, seed=0), 18)


# ---------------------------------------------------------------- accuracy

def test_accuracy_hand_computed():
    labels = torch.tensor([[-100, 5, -100, 7], [-100, -100, 3, -100], [-100, -100, -100, -100]])
    preds = torch.tensor([[0, 5, 1, 6], [9, 9, 3, 0], [1, 2, 3, 4]])
    # row 0: 5 right, 7 wrong -> 1/2; row 1: 3 right -> 1/1; row 2: nothing labelled; overall 2/3
    per = mqar_accuracy_per_example(preds, labels)
    assert per.dtype == torch.float32 and per[:2].tolist() == [0.5, 1.0] and math.isnan(per[2])
    assert math.isclose(mqar_accuracy(preds, labels).item(), 2 / 3, rel_tol=1e-6)
    logits = 3.0 * torch.nn.functional.one_hot(preds, 10).float() + 0.1 * torch.rand(3, 4, 10)
    assert math.isclose(mqar_accuracy(logits, labels).item(), 2 / 3, rel_tol=1e-6)
    assert torch.equal(mqar_accuracy_per_example(logits, labels)[:2], per[:2])
    assert math.isnan(mqar_accuracy(preds[2:], labels[2:]).item())


def test_accuracy_on_a_batch():
    b = make_mqar_batch(MQARSetting(128, 16), 4, seed=0)
    assert mqar_accuracy(b.labels.clamp_min(0), b.labels).item() == 1.0
    assert mqar_accuracy(torch.zeros_like(b.labels), b.labels).item() == 0.0
    wrong_one = b.labels.clamp_min(0).clone()
    wrong_one[0, b.query_positions[0, 0]] = 0
    assert mqar_accuracy_per_example(wrong_one, b.labels).tolist() == [15 / 16, 1.0, 1.0, 1.0]
    assert math.isclose(mqar_accuracy(wrong_one, b.labels).item(), 63 / 64, rel_tol=1e-6)


def test_accuracy_rejects_bad_shapes():
    labels = torch.full((2, 4), -100)
    with pytest.raises(ValueError, match='logits_or_predictions'):
        mqar_accuracy(torch.zeros(2, 5, 3), labels)
    with pytest.raises(ValueError, match='integer'):
        mqar_accuracy(torch.zeros(2, 4), labels)


# ---------------------------------------------------------------- settings and mixtures

def test_train_mix_and_test_settings():
    assert [(s.seq_len, s.num_kv_pairs) for s in TRAIN_MIX] == [
        (64, 4), (64, 8), (64, 16), (128, 8), (128, 16), (128, 32), (256, 16), (256, 32), (256, 64)]
    pairs = {(s.seq_len, s.num_kv_pairs) for s in TEST_SETTINGS}
    assert {(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)} <= pairs
    assert len(pairs) == len(TEST_SETTINGS) == 25
    assert all(64 <= t <= 1024 and 4 <= n <= 256 and 4 * n <= t for t, n in pairs)
    assert all(s.power_a == 0.01 for s in TRAIN_MIX + TEST_SETTINGS)
    for s in TEST_SETTINGS:
        assert_layout(make_mqar_batch(s, 2, seed=0), 8192)


def test_mixture_batches_one_setting_each_and_reproducible():
    mix = MQARMixture(TRAIN_MIX, 4, seed=0, num_batches=40)
    assert len(mix) == 40
    batches = list(mix)
    assert len(batches) == 40
    seen = set()
    for b in batches:
        assert b.setting in TRAIN_MIX and b.inputs.shape == (4, b.setting.seq_len)
        seen.add(b.setting)
    assert len(seen) >= 7                                             # 40 uniform draws over 9 settings
    assert_layout(batches[0], 8192)
    again = list(mix)                                                 # iter() restarts from the seed
    assert all(torch.equal(a.inputs, b.inputs) and a.setting == b.setting for a, b in zip(batches, again))
    other = list(MQARMixture(TRAIN_MIX, 4, seed=1, num_batches=40))
    assert [b.setting for b in other] != [b.setting for b in batches]
    assert not torch.equal(batches[0].inputs, other[0].inputs) or batches[0].setting != other[0].setting


def test_mixture_weights_and_infinite():
    only_first = MQARMixture(TRAIN_MIX, 2, seed=0, num_batches=10, weights=[1] + [0] * 8)
    assert all(b.setting == TRAIN_MIX[0] for b in only_first)
    inf = MQARMixture(TRAIN_MIX[:2], 2, seed=0)
    assert len(list(itertools.islice(inf, 5))) == 5
    with pytest.raises(TypeError):
        len(inf)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(MQARMixture(TRAIN_MIX, 2, seed=0, num_batches=3))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('kwargs, match', [
    ({'settings': []}, 'settings'),
    ({'settings': [(64, 4)]}, 'settings'),
    ({'weights': [1, 2]}, 'weights'),
    ({'weights': [-1] + [1] * 8}, 'weights'),
    ({'weights': [0] * 9}, 'weights'),
    ({'vocab_size': 64}, 'num_kv_pairs'),
    ({'batch_size': 0}, 'batch_size'),
    ({'num_batches': -1}, 'num_batches'),
    ({'filler': 'x'}, 'filler'),
])
def test_mixture_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARMixture(**{'settings': TRAIN_MIX, **kwargs})


def test_eval_sets():
    a, b = MQARSetting(64, 4), MQARSetting(128, 32)
    sets = make_eval_sets([a, b], 16, seed=0)
    assert list(sets) == [a, b] and sets[b].inputs.shape == (16, 128)
    assert_layout(sets[b], 8192)
    assert torch.equal(make_eval_sets([b], 16, seed=0)[b].inputs, sets[b].inputs), 'independent of the other settings'
    assert torch.equal(make_eval_sets([a, b], 16, seed=0)[a].inputs, sets[a].inputs)
    assert not torch.equal(make_eval_sets([a], 16, seed=1)[a].inputs, sets[a].inputs)
