"""Multi-query associative recall (MQAR) data, after Zoology (Arora et al. 2023, "Zoology: Measuring and
improving recall in efficient language models"), written here from the protocol, vectorised in torch.

The protocol (one example; ``V`` = vocab_size, ``n`` = num_kv_pairs, ``T`` = seq_len, even)::

    position   0   1   2   3  ...  2n-2 2n-1 | 2n ............................................ T-1
    inputs     k1  v1  k2  v2 ...  kn   vn   | f  f  k2 f  f  f  k1 f  ...  f  kn f ...
    labels     -100 everywhere ...           | .  .  v2 .  .  .  v1 .  ...  .  vn . ...   (. = -100)

* Keys are ``n`` distinct tokens of ``1 .. V//2 - 1`` (token 0 is never a key), values ``n`` distinct tokens of
  ``V//2 .. V-1``, both drawn uniformly; pair ``j`` is ``(keys[j], values[j])`` and the context ``k1 v1 k2 v2 ...``
  fills the first ``2n`` positions.
* The rest, ``T - 2n`` tokens, holds ``S = (T - 2n) / 2`` query slots at the even offsets ``2n, 2n+2, ..., T-2``.
  Slot ``g`` (the "gap", ``g = 1 .. S``, counted from the end of the context, not from the key's own position)
  sits at position ``2n + 2(g-1)``. The ``n`` slots are drawn without replacement from the power law
  ``p(g) ∝ a * g^(a-1)`` (``a`` = power_a; Zoology's default 0.01 puts most queries right after the context;
  ``a = 1`` is uniform; ``a > 1`` favours late queries), one per key: every key is queried exactly once.
* Labels are next-token shifted as in Zoology: the label at a query position (which holds the key) is that key's
  value (the model must output the value when it reads the key); every other label is -100 (ignored; the context
  is not scored either). The value does not follow the query key in the inputs.
* Every other position of the query region holds a random filler token (Zoology's ``random_non_queries=True``).

Where this differs from Zoology's ``zoology/data/multiquery_ar.py``:

* Fillers. Zoology draws them uniformly from the whole vocabulary, so a filler can equal a key of its own
  example: an unlabelled extra query (a fraction n/V of the fillers; with V = 8192 about 0.5 per sequence at
  (256, 64), 8 at (1024, 256)). Here the default ``filler='non_key'`` draws them uniformly from the vocabulary
  minus that example's keys (values and token 0 included), so each key occurs exactly twice: in the context and
  at its one query.
  ``filler='any'`` is Zoology's behaviour, ``filler='zero'`` is its ``random_non_queries=False`` (fillers 0).
* Sampling. Zoology calls numpy's ``choice`` per example (``replace=False``, with ``p``: sequential draws,
  renormalising after each) and places the j-th key at the j-th drawn slot. Here the slots come from the
  Gumbel-top-k trick (``log p(g)`` + Gumbel noise, top n in decreasing order), which has the same distribution
  as that sequential draw, order included, for the whole batch at once; key j again takes the j-th drawn slot,
  so the pairing of context order and query slot (the first keys tend to get the earliest, most probable slots)
  is Zoology's. Streams are not Zoology's (torch, not numpy's global seed), only the distribution.
* Randomness comes from a ``torch.Generator`` (seeded; the global RNG is neither used nor advanced), on the
  device the data is made on (so a seed gives different data on CPU and CUDA, each reproducible).
* Batches. Zoology concatenates all settings' examples into one shuffled data set; here a batch holds examples
  of one setting (one seq_len), and :class:`MQARMixture` mixes settings batch by batch, so no padding is needed.
* Only one pass over the pairs (Zoology's ``num_passes=1``); no ``vocab_size > seq_len`` requirement (only
  enough keys and values for the pairs).
"""
from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

__all__ = [
    'DEFAULT_POWER_A', 'DEFAULT_VOCAB_SIZE', 'IGNORE_INDEX', 'TEST_SETTINGS', 'TRAIN_MIX', 'MQARBatch',
    'MQARMixture', 'MQARSetting', 'make_eval_sets', 'make_mqar_batch', 'mqar_accuracy', 'mqar_accuracy_per_example',
]

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_POWER_A = 0.01
IGNORE_INDEX = -100
Filler = Literal['non_key', 'any', 'zero']
_FILLERS = ('non_key', 'any', 'zero')


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f'{name} must be an integer, got {value!r}')
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f'{name} must be an integer, got {value!r}') from None


@dataclass(frozen=True)
class MQARSetting:
    """One MQAR task size: ``seq_len`` tokens (even), ``num_kv_pairs`` pairs, gaps drawn with ``power_a``.

    Needs ``seq_len >= 4 * num_kv_pairs``: the context takes ``2n`` tokens and the ``n`` queries need ``n`` of the
    ``(seq_len - 2n) / 2`` query slots. The vocabulary is checked per batch (:meth:`check_vocab`).
    Raises ``ValueError`` naming the argument at fault.
    """
    seq_len: int
    num_kv_pairs: int
    power_a: float = DEFAULT_POWER_A

    def __post_init__(self):
        seq_len = _as_int('seq_len', self.seq_len)
        n = _as_int('num_kv_pairs', self.num_kv_pairs)
        if seq_len <= 0 or seq_len % 2:
            raise ValueError(f'seq_len must be a positive even integer (key-value pairs and query slots are 2 tokens '
                             f'wide), got {seq_len}')
        if n < 1:
            raise ValueError(f'num_kv_pairs must be >= 1, got {n}')
        if 4 * n > seq_len:
            raise ValueError(f'num_kv_pairs={n} does not fit seq_len={seq_len}: the context takes 2*num_kv_pairs '
                             f'tokens and the queries num_kv_pairs slots of 2 tokens, so seq_len must be >= '
                             f'4*num_kv_pairs = {4 * n}')
        try:
            a = float(self.power_a)
        except (TypeError, ValueError):
            raise ValueError(f'power_a must be a number, got {self.power_a!r}') from None
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f'power_a must be finite and > 0 (p(g) ∝ a*g^(a-1)), got {self.power_a!r}')
        object.__setattr__(self, 'seq_len', seq_len)
        object.__setattr__(self, 'num_kv_pairs', n)
        object.__setattr__(self, 'power_a', a)

    @property
    def context_len(self) -> int:
        """``2 * num_kv_pairs``: the key-value pairs at the start."""
        return 2 * self.num_kv_pairs

    @property
    def num_query_slots(self) -> int:
        """``S = (seq_len - context_len) / 2``: candidate query positions ``context_len + 2(g-1)``, ``g = 1..S``."""
        return (self.seq_len - self.context_len) // 2

    def gap_probabilities(self) -> torch.Tensor:
        """The power law over gaps, float64 ``[S]``: entry ``g-1`` is ``p(g) = g^(a-1) / sum_h h^(a-1)``, the
        distribution of the first drawn slot (key 0's); later draws renormalise it over the slots left."""
        g = torch.arange(1, self.num_query_slots + 1, dtype=torch.float64)
        w = self.power_a * g ** (self.power_a - 1)
        return w / w.sum()

    def check_vocab(self, vocab_size: int) -> int:
        """Raise ``ValueError`` unless ``vocab_size`` has ``num_kv_pairs`` keys (``1 .. V//2-1``) and values
        (``V//2 .. V-1``); return it as an int."""
        v = _as_int('vocab_size', vocab_size)
        if v < 4:
            raise ValueError(f'vocab_size must be >= 4 (token 0, at least one key, values), got {v}')
        if self.num_kv_pairs > v // 2 - 1:
            raise ValueError(f'num_kv_pairs={self.num_kv_pairs} exceeds the {v // 2 - 1} keys of vocab_size={v} '
                             f'(keys are 1 .. vocab_size//2 - 1): vocab_size must be >= '
                             f'{2 * self.num_kv_pairs + 2}')
        return v


@dataclass
class MQARBatch:
    """One batch of one setting; B = batch size, T = seq_len, n = num_kv_pairs, all int64 on one device.

    inputs:  ``[B, T]`` token ids.
    labels:  ``[B, T]``: ``values[b, j]`` at ``query_positions[b, j]``, -100 elsewhere.
    keys:    ``[B, n]`` in context order (``inputs[:, 0:2n:2]``).
    values:  ``[B, n]`` (``inputs[:, 1:2n:2]``).
    query_positions: ``[B, n]``: where key j is queried (even, ``2n .. T-2``); gap = ``(pos - 2n) / 2 + 1``.
    """
    inputs: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_positions: torch.Tensor
    setting: MQARSetting

    def head(self, n: int) -> MQARBatch:
        """The first ``n`` examples."""
        return MQARBatch(self.inputs[:n], self.labels[:n], self.keys[:n], self.values[:n], self.query_positions[:n],
                         self.setting)

    def to(self, device) -> MQARBatch:
        return MQARBatch(self.inputs.to(device), self.labels.to(device), self.keys.to(device),
                         self.values.to(device), self.query_positions.to(device), self.setting)


def _resolve_generator(generator: torch.Generator | None, seed: int | None, device) -> torch.Generator:
    if generator is not None:
        if seed is not None:
            raise ValueError('pass either generator or seed, not both')
        if device is not None:
            want = torch.device(device)
            have = generator.device
            if want.type != have.type or (want.index is not None and have.index is not None
                                          and want.index != have.index):
                raise ValueError(f'device={want} does not match the generator, which is on {have}: torch draws on '
                                 f'the generator\'s device (make it with torch.Generator(device=...))')
        return generator
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', torch.cuda.current_device())
    gen = torch.Generator(device=dev)
    if seed is None:
        gen.seed()  # nondeterministic
    else:
        gen.manual_seed(_as_int('seed', seed))
    return gen


def _random_subset(batch: int, pool: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    """``[batch, k]`` int64: per row, k distinct indices of ``0 .. pool-1``, a uniformly random ordered subset
    (top k of uniform scores). Rows are drawn in chunks of about 2^22 scores, so a big batch does not hold
    ``batch * pool`` floats at once."""
    rows = max(1, (1 << 22) // pool)
    return torch.cat([torch.rand(min(rows, batch - i), pool, generator=gen, device=device).topk(k, dim=1).indices
                      for i in range(0, batch, rows)])


def _non_key_fillers(keys: torch.Tensor, shape: tuple[int, int], vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, T]`` int64: uniform over ``0 .. V-1`` minus the row's keys ``[B, n]`` (distinct). Draw rank r uniformly
    in ``0 .. V-n-1`` and map it to the r-th token not among the keys: with the keys sorted ``s_0 < s_1 < ...``, that
    token is ``r + #{j : s_j - j <= r}``."""
    n = keys.shape[1]
    r = torch.randint(0, vocab_size - n, shape, generator=gen, device=keys.device)
    shifted = keys.sort(dim=1).values - torch.arange(n, device=keys.device)
    return r + torch.searchsorted(shifted, r, right=True)


def make_mqar_batch(setting: MQARSetting, batch_size: int, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    generator: torch.Generator | None = None, seed: int | None = None, device=None,
                    filler: Filler = 'non_key') -> MQARBatch:
    """A batch of ``batch_size`` MQAR examples of one setting (all ``[B, seq_len]``, int64), made on ``device``.

    Randomness: ``generator`` (its device is where the data is made; ``device``, if given, must match it), else a
    fresh generator on ``device`` (default CPU) seeded with ``seed`` (``None``: a nondeterministic seed). The global
    RNG is not touched. ``filler``: ``'non_key'`` (default; never a key of the example), ``'any'`` (Zoology: whole
    vocabulary), ``'zero'`` (token 0). See the module docstring for the layout.
    """
    if not isinstance(setting, MQARSetting):
        raise ValueError(f'setting must be an MQARSetting, got {type(setting).__name__}')
    b = _as_int('batch_size', batch_size)
    if b < 1:
        raise ValueError(f'batch_size must be >= 1, got {b}')
    v = setting.check_vocab(vocab_size)
    if filler not in _FILLERS:
        raise ValueError(f'filler must be one of {_FILLERS}, got {filler!r}')
    gen = _resolve_generator(generator, seed, device)
    dev = gen.device
    n, t, s = setting.num_kv_pairs, setting.seq_len, setting.num_query_slots
    half = v // 2

    keys = _random_subset(b, half - 1, n, gen, dev) + 1            # [B, n] in 1 .. V//2-1
    values = _random_subset(b, v - half, n, gen, dev) + half       # [B, n] in V//2 .. V-1

    # Gumbel-top-k: the slots in decreasing score order are a sequential draw without replacement from p(g).
    log_p = (setting.power_a - 1.0) * torch.arange(1, s + 1, dtype=torch.float64, device=dev).log()
    u = torch.rand(b, s, generator=gen, device=dev, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    slots = (log_p + gumbel).topk(n, dim=1, sorted=True).indices   # [B, n], key j -> j-th drawn slot (0-based)
    query_positions = setting.context_len + 2 * slots

    if filler == 'non_key':
        inputs = _non_key_fillers(keys, (b, t), v, gen)
    elif filler == 'any':
        inputs = torch.randint(0, v, (b, t), generator=gen, device=dev)
    else:
        inputs = torch.zeros(b, t, dtype=torch.long, device=dev)
    inputs[:, 0:setting.context_len:2] = keys
    inputs[:, 1:setting.context_len:2] = values
    inputs.scatter_(1, query_positions, keys)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long, device=dev)
    labels.scatter_(1, query_positions, values)
    return MQARBatch(inputs, labels, keys, values, query_positions, setting)


# Training mix (Zoology-style sizes: 64..256 tokens, 4..64 pairs) and the test grid (64..1024 tokens, 4..256 pairs,
# every combination of powers of two with 4*pairs <= seq_len), all with power_a = 0.01.
TRAIN_MIX: tuple[MQARSetting, ...] = tuple(MQARSetting(t, n) for t, n in (
    (64, 4), (64, 8), (64, 16), (128, 8), (128, 16), (128, 32), (256, 16), (256, 32), (256, 64)))
TEST_SETTINGS: tuple[MQARSetting, ...] = tuple(
    MQARSetting(t, n) for t in (64, 128, 256, 512, 1024) for n in (4, 8, 16, 32, 64, 128, 256) if 4 * n <= t)


def _derived_seed(*parts) -> int:
    """A stable 63-bit seed from ``parts`` (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), 'little') >> 1


def make_eval_sets(settings: Sequence[MQARSetting] = TEST_SETTINGS, num_examples: int = 1000, *,
                   vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, device=None,
                   filler: Filler = 'non_key') -> dict[MQARSetting, MQARBatch]:
    """Fixed evaluation sets: ``{setting: MQARBatch of num_examples}``. Each setting's data depends only on
    (seed, setting, vocab_size, filler, device type), not on which other settings are listed."""
    s = _as_int('seed', seed)
    dev_type = torch.device(device).type if device is not None else 'cpu'
    return {st: make_mqar_batch(st, num_examples, vocab_size=vocab_size, device=device, filler=filler,
                                seed=_derived_seed('mqar-eval', s, st.seq_len, st.num_kv_pairs, st.power_a,
                                                   vocab_size, filler, dev_type))
            for st in settings}


class MQARMixture:
    """An iterable of :class:`MQARBatch` mixing ``settings``, one setting per batch (so a batch shares one
    seq_len; lengths differ between batches), the setting of each batch drawn with probabilities ∝ ``weights``
    (default uniform).

    Every ``iter()`` restarts the same stream from ``seed``: with ``num_batches`` set it is a fixed data set of
    ``num_batches * batch_size`` examples, regenerated on the fly (like an epoch of Zoology's fixed training set);
    ``num_batches=None`` iterates forever. The schedule is drawn on the CPU, the data on ``device``.
    """

    def __init__(self, settings: Sequence[MQARSetting] = TRAIN_MIX, batch_size: int = 64, *,
                 vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, device=None,
                 weights: Sequence[float] | None = None, num_batches: int | None = None,
                 filler: Filler = 'non_key'):
        self.settings = tuple(settings)
        if not self.settings:
            raise ValueError('settings must not be empty')
        for st in self.settings:
            if not isinstance(st, MQARSetting):
                raise ValueError(f'settings must hold MQARSetting, got {type(st).__name__}')
            st.check_vocab(vocab_size)
        self.batch_size = _as_int('batch_size', batch_size)
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
        if weights is None:
            w = torch.ones(len(self.settings), dtype=torch.float64)
        else:
            w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
            if w.shape != (len(self.settings),):
                raise ValueError(f'weights must have one entry per setting ({len(self.settings)}), got {len(w)}')
            if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise ValueError(f'weights must be finite, >= 0 and not all 0, got {list(weights)}')
        self.weights = w / w.sum()
        if num_batches is not None:
            num_batches = _as_int('num_batches', num_batches)
            if num_batches < 0:
                raise ValueError(f'num_batches must be >= 0 or None, got {num_batches}')
        if filler not in _FILLERS:
            raise ValueError(f'filler must be one of {_FILLERS}, got {filler!r}')
        self.num_batches, self.vocab_size, self.filler = num_batches, vocab_size, filler
        self.seed = _as_int('seed', seed)
        self.device = device

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError('an MQARMixture with num_batches=None is infinite')
        return self.num_batches

    def __iter__(self) -> Iterator[MQARBatch]:
        schedule = torch.Generator().manual_seed(_derived_seed('mqar-schedule', self.seed))
        data = _resolve_generator(None, self.seed, self.device)
        i = 0
        while self.num_batches is None or i < self.num_batches:
            k = int(torch.multinomial(self.weights, 1, generator=schedule))
            yield make_mqar_batch(self.settings[k], self.batch_size, vocab_size=self.vocab_size, generator=data,
                                  filler=self.filler)
            i += 1


def _predictions(logits_or_predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = logits_or_predictions
    if x.dim() == labels.dim() + 1 and x.shape[:-1] == labels.shape:
        return x.argmax(dim=-1)
    if x.shape == labels.shape:
        if x.is_floating_point() or x.is_complex():
            raise ValueError('predictions shaped like labels must be integer token ids (pass logits as [B, T, V])')
        return x
    raise ValueError(f'logits_or_predictions must be [B, T, V] logits or [B, T] token ids for labels of shape '
                     f'{tuple(labels.shape)}, got {tuple(x.shape)}')


def mqar_accuracy_per_example(logits_or_predictions: torch.Tensor, labels: torch.Tensor, *,
                              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """float32 ``[B]``: per example, the fraction of labelled positions (``labels != ignore_index``) whose
    prediction (argmax of ``[B, T, V]`` logits, or ``[B, T]`` token ids) equals the label; NaN for a row without
    labels."""
    pred = _predictions(logits_or_predictions, labels)
    mask = labels != ignore_index
    correct = ((pred == labels) & mask).sum(dim=-1).float()
    return correct / mask.sum(dim=-1).float()


def mqar_accuracy(logits_or_predictions: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """0-dim float32: the fraction of all labelled positions in the batch predicted exactly (argmax of
    ``[B, T, V]`` logits, or ``[B, T]`` token ids); NaN if nothing is labelled. Zoology's MQAR accuracy."""
    pred = _predictions(logits_or_predictions, labels)
    mask = labels != ignore_index
    return ((pred == labels) & mask).sum().float() / mask.sum().float()
