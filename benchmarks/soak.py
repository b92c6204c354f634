"""Soak (issue 12): a converted small fla model trained for many steps on batches of random shape, then many
rounds of greedy generation of random size; no NaN/Inf, no growth of allocated memory and no Triton
recompilation after warm-up.

    python benchmarks/soak.py                                        # one GPU: 2000 train steps, 1000 rounds
    python benchmarks/soak.py --family RWKV7 --json soak.json        # another host, figures as JSON rows
    python benchmarks/soak.py --device cpu --train-steps 6 --gen-steps 4 --hidden 64   # smoke (interpreter)

The model: an fla ``--family`` model (default GatedDeltaNetForCausalLM; hidden 256, 2 layers, vocab 256)
converted with ``mom_wrap.convert`` (``--init`` random or preserve; M=4, top-2 + shared memory), AdamW with
gradient clipping (``--clip``; the clipped norm is the gradient check).

Training (``--train-steps``): every step draws, from ``--seed``, a mode out of ``--modes`` and a shape:

* ``dense``: [B, T], every row T tokens;
* ``padded``: [B, T], rows of random lengths left-padded through ``attention_mask`` (at least 2 rows where
  ``--max-batch`` allows);
* ``packed``: N sequences of random lengths flattened into [1, sum], with ``cu_seqlens`` [N+1] passed to the
  model: fla's model and block forwards hand their extra keyword arguments to the attention layer (and the
  RWKV blocks' token-shift FFNs), so the MoM layers run their packed path; fla's MLP and norms ignore it.

B (or N) is drawn from 1..``--max-batch``, lengths from ``--min-len``..``--max-len``. Labels are the inputs;
every sequence's first token (and padding) is ignored, so no loss term crosses a sequence boundary. The first
warm-up steps are the extremes of every mode (largest and smallest batches), so that the warm-up's memory
high-water mark covers every shape-dependent buffer; the rest of the warm-up is drawn like the steps after it.

Generation (``--gen-steps`` rounds): each round ``model.generate`` (greedy, no end token) on B prompts of
random lengths 1..``--max-prompt`` (left padding) for 1..``--max-new-tokens`` new tokens, B in
1..``--gen-max-batch``, with fla's ``Cache``. With ``--dtype bf16`` the model is cast to bf16 for this phase
(inference weights); training runs under ``torch.autocast`` (bf16) with fp32 parameters and optimizer states.

Checks (the exit status is 1 if any fails, or if a phase raised):

* non-finite values: losses and clipped gradient norms per step (a NaN or Inf in any gradient makes the
  norm non-finite), every element of the training logits and of the generated tokens' logits, the parameters
  after training; all counted on the device and read at the end (and at ``--log-every``);
* memory: ``torch.cuda.memory_allocated`` after every step (its tensors freed, optimizer state kept): the
  largest value after warm-up minus the largest during warm-up, at most ``--max-growth-mib``. RSS
  (/proc/self/statm) the same way, reported only: it includes the allocators' and Python's caches. On the CPU
  only RSS exists: reported, not checked;
* Triton: every JIT cache miss (a kernel specialisation compiled, or loaded from Triton's disk cache) is
  counted through ``triton.knobs.runtime.jit_post_compile_hook`` (``JITFunction._do_compile`` where Triton
  has no knobs), per phase and by origin; after warm-up at most ``--max-recompiles`` (default 0) of
  mom_wrap's own kernels, and the kernels that compiled late are named. The host library's kernels are
  counted and named, not checked: fla's RMSNorm backward (``fla.modules.norm.layernorm.layer_norm_bwd_kernel``
  and its row variant, the model's norms) takes ``BS = ceil(rows / SMs)`` as a constexpr, so the plain fla
  model compiles it again for every new row count just the same. Kernels take their first autotune config
  (``--autotune`` to tune: then a new autotune key compiles every config). Under the CPU's interpreter nothing
  compiles: n/a.

Speed: steps (rounds) per second after warm-up, tokens per second. ``--json PATH`` writes one row per phase
(``benchmarks/record.py``'s format, ``benchmark`` ``"soak"``; the figures under ``"soak"``).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import resource
import sys
import time
import warnings

import torch
from distributed_train import add_model_arguments, converted_model  # benchmarks/ is on sys.path (the script's)
from record import Recorder, write_rows

MODES = ('dense', 'padded', 'packed')
HOSTS = {'GatedDeltaNet': 'GatedDeltaNet', 'GLA': 'GatedLinearAttention', 'DeltaNet': 'DeltaNet',
         'RWKV6': 'RWKV6Attention', 'RWKV7': 'RWKV7Attention'}
CUDA_SIZES = dict(max_batch=8, max_len=512, gen_max_batch=8, max_prompt=128, max_new_tokens=16, log_every=200)
CPU_SIZES = dict(max_batch=3, max_len=24, gen_max_batch=3, max_prompt=8, max_new_tokens=4, log_every=0)
MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, vocab=256, inits=('random', 'preserve'))
    p.add_argument('--backend', choices=('auto', 'triton', 'torch'), default=None,
                   help='the MoM layers\' backend (default: auto on CUDA, torch on the CPU)')
    p.add_argument('--dtype', choices=('bf16', 'fp32'), default=None,
                   help='bf16: training under autocast, generation with bf16 weights (default on CUDA); fp32 '
                        '(the CPU\'s only one)')
    p.add_argument('--train-steps', type=int, default=2000)
    p.add_argument('--gen-steps', type=int, default=1000, help='generation rounds (model.generate calls)')
    p.add_argument('--warmup', type=int, default=None, help='training warm-up steps (default a tenth)')
    p.add_argument('--gen-warmup', type=int, default=None, help='generation warm-up rounds (default a tenth)')
    p.add_argument('--modes', default=','.join(MODES), help=f'training batch kinds, comma-separated: {MODES}')
    p.add_argument('--max-batch', type=int, default=None, help='training rows / packed sequences (CUDA 8, CPU 3)')
    p.add_argument('--min-len', type=int, default=2, help='shortest training sequence (2: one target at least)')
    p.add_argument('--max-len', type=int, default=None, help='longest training sequence (CUDA 512, CPU 24)')
    p.add_argument('--gen-max-batch', type=int, default=None, help='generation batch (CUDA 8, CPU 3)')
    p.add_argument('--max-prompt', type=int, default=None, help='longest prompt (CUDA 128, CPU 8)')
    p.add_argument('--max-new-tokens', type=int, default=None, help='most new tokens per round (CUDA 16, CPU 4)')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--clip', type=float, default=1.0, help='gradient norm clipping')
    p.add_argument('--max-growth-mib', type=float, default=1.0,
                   help='CUDA: allowed growth of allocated memory after warm-up, MiB')
    p.add_argument('--max-recompiles', type=int, default=0,
                   help="compilations of mom_wrap's Triton kernels allowed after warm-up")
    p.add_argument('--autotune', action='store_true', help="CUDA: autotune Triton kernels (default: first config)")
    p.add_argument('--log-every', type=int, default=None, help='progress line every N steps (CUDA 200; 0: none)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', metavar='PATH', help='write one row per phase as JSON (benchmarks/record.py)')
    args = p.parse_args(argv)
    for key, value in (CUDA_SIZES if args.device == 'cuda' else CPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backend = args.backend or ('auto' if args.device == 'cuda' else 'torch')
    args.dtype = args.dtype or ('bf16' if args.device == 'cuda' else 'fp32')
    if args.device == 'cpu' and args.dtype == 'bf16':
        # fla 0.6's fused SwiGLU backward multiplies a bf16 gradient with the fp32 weight under CPU autocast
        p.error("--dtype bf16 runs on CUDA only (fla's fused MLP backward fails under CPU autocast)")
    args.modes = [m for m in args.modes.split(',') if m]
    if not args.modes or not set(args.modes) <= set(MODES):
        p.error(f"--modes: expected some of {MODES}, got {args.modes}")
    if args.min_len < 2 or args.max_len < args.min_len:
        p.error("--min-len must be at least 2 (a sequence of one token has no target) and at most --max-len")
    for key in ('max_batch', 'gen_max_batch', 'max_prompt', 'max_new_tokens'):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.train_steps < 0 or args.gen_steps < 0:
        p.error("--train-steps and --gen-steps must not be negative")
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    args.warmup = warmup_steps(args.warmup, args.train_steps)
    args.gen_warmup = warmup_steps(args.gen_warmup, args.gen_steps)
    return args


def warmup_steps(asked, steps):
    """A tenth of the steps by default, at least one, and at least one step left after it where there are two."""
    n = max(1, steps // 10) if asked is None else asked
    return max(0, min(n, steps - 1 if steps > 1 else steps))


# the run's environment ------------------------------------------------------------------------------------------

def setup(args):
    """Triton settings (before fla is imported) and the device."""
    if args.device == 'cpu':
        from mom_wrap import interpret_on_cpu
        interpret_on_cpu()
        device = torch.device('cpu')
    else:
        if not torch.cuda.is_available():
            raise SystemExit('--device cuda: no CUDA device (use --device cpu for the smoke run)')
        if not args.autotune:
            from mom_wrap.interpret import first_config_only
            first_config_only()
        device = torch.device('cuda', torch.cuda.current_device())
    warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform.*')
    return device


def is_ours(kernel: str) -> bool:
    """Whether a counted kernel (``module.name``) is one of mom_wrap's."""
    return kernel.startswith('mom_wrap.')


class CompileCounter:
    """Counts Triton JIT compilations (cache misses of a kernel's in-memory specialisation cache: compiled, or
    loaded from Triton's disk cache) by phase. Triton 3.4+ calls ``knobs.runtime.jit_post_compile_hook`` after
    each (chained here to any hook already set); older Tritons get ``JITFunction._do_compile`` wrapped. Under
    the interpreter (``TRITON_INTERPRET=1``) kernels are interpreted, never compiled: ``how`` is None."""

    def __init__(self):
        self.phase = 'setup'
        self.events: list[tuple[str, str]] = []  # (phase, kernel)
        self.how = None

    def install(self):
        if os.environ.get('TRITON_INTERPRET') == '1':
            return self
        try:
            from triton import knobs
            runtime = knobs.runtime
            runtime.jit_post_compile_hook  # noqa: B018 (AttributeError: a Triton without this knob)
        except (ImportError, AttributeError):
            runtime = None
        if runtime is not None:
            previous = runtime.jit_post_compile_hook

            def hook(**kwargs):
                fn = kwargs.get('fn')
                self.events.append((self.phase, f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', fn)}"))
                return previous(**kwargs) if previous is not None else None

            runtime.jit_post_compile_hook = hook
            self.how = 'triton.knobs.runtime.jit_post_compile_hook'
            return self
        from triton.runtime.jit import JITFunction
        compile_ = JITFunction._do_compile

        def _do_compile(jit, *args, **kwargs):
            kernel = compile_(jit, *args, **kwargs)
            if kernel is not None:
                self.events.append((self.phase, f'{jit.fn.__module__}.{jit.fn.__qualname__}'))
            return kernel

        JITFunction._do_compile = _do_compile
        self.how = 'triton.runtime.jit.JITFunction._do_compile'
        return self

    def count(self, phase):
        return None if self.how is None else sum(p == phase for p, _ in self.events)

    def ours(self, phase):
        """Compilations of mom_wrap's own kernels in ``phase`` (None under the interpreter)."""
        return None if self.how is None else sum(p == phase and is_ours(k) for p, k in self.events)

    def kernels(self, phase):
        """The kernels compiled in ``phase``, most first: [(name, count)]."""
        counts: dict[str, int] = {}
        for p, name in self.events:
            if p == phase:
                counts[name] = counts.get(name, 0) + 1
        return sorted(counts.items(), key=lambda kv: -kv[1])


def rss_mib():
    """Resident set size of this process, MiB (/proc/self/statm; else the peak from getrusage)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / MIB
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    """Peak allocated memory since ``reset_peak``, MiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == 'cuda' else None


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Memory:
    """Allocated device memory (CUDA) and RSS after each step, split at the end of warm-up."""

    def __init__(self, device):
        self.device = device
        self.warm = {'alloc': [], 'rss': []}
        self.after = {'alloc': [], 'rss': []}

    def record(self, warm: bool):
        into = self.warm if warm else self.after
        if self.device.type == 'cuda':
            into['alloc'].append(torch.cuda.memory_allocated(self.device) / MIB)
        into['rss'].append(rss_mib())

    def growth(self, key):
        """Largest value after warm-up minus the largest during it (None: nothing to compare)."""
        if not self.warm[key] or not self.after[key]:
            return None
        return max(self.after[key]) - max(self.warm[key])

    def drift(self, key):
        """Last value minus the first after warm-up."""
        return self.after[key][-1] - self.after[key][0] if len(self.after[key]) > 1 else None


# the model and the batches --------------------------------------------------------------------------------------

def build_model(args, device):
    model = converted_model(args, backend=args.backend)
    model.generation_config.eos_token_id = None  # greedy rounds run their full length
    model.generation_config.pad_token_id = 0
    return model.to(device)


def train_shapes(rng, args):
    """(mode, sequence lengths) for every training step: the extremes first (within the warm-up), then drawn."""
    big, small, B = args.max_len, args.min_len, args.max_batch
    extremes = {'dense': [[big] * B, [small]], 'padded': [[big] + [small] * (B - 1), [small] * min(2, B)],
                'packed': [[big] * B, [small]]}
    first = [(m, lengths) for i in range(2) for m in args.modes for lengths in extremes[m][i:i + 1]]
    shapes = first[:args.warmup]
    while len(shapes) < args.train_steps:
        mode = rng.choice(args.modes)
        if mode == 'dense':
            lengths = [rng.randint(small, big)] * rng.randint(1, B)
        else:
            n = rng.randint(min(2, B) if mode == 'padded' else 1, B)
            lengths = [rng.randint(small, big) for _ in range(n)]
        shapes.append((mode, lengths))
    return shapes[:args.train_steps]


def train_batch(mode, lengths, vocab, gen, device):
    """Model inputs for one step: input_ids, labels and attention_mask or cu_seqlens. Labels ignore padding and
    every sequence's first token (the model shifts them: nothing is predicted across a boundary)."""
    if mode == 'packed':
        ids = torch.randint(1, vocab, (1, sum(lengths)), generator=gen)
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        labels = ids.clone()
        labels[0, cu[:-1].long()] = -100
        return dict(input_ids=ids.to(device), labels=labels.to(device), cu_seqlens=cu.to(device))
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100
    if mode == 'dense':
        return dict(input_ids=ids.to(device), labels=labels.to(device))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        labels[b, :T - n + 1] = -100
    ids = ids * mask
    return dict(input_ids=ids.to(device), labels=labels.to(device), attention_mask=mask.to(device))


def gen_shapes(rng, args):
    """(prompt lengths, new tokens) for every round: the extremes first (within the warm-up), then drawn."""
    B, P, N = args.gen_max_batch, args.max_prompt, args.max_new_tokens
    shapes = [([P] * B, N), ([1], 1), ([P] + [1] * (B - 1), N)][:args.gen_warmup]
    while len(shapes) < args.gen_steps:
        shapes.append(([rng.randint(1, P) for _ in range(rng.randint(1, B))], rng.randint(1, N)))
    return shapes[:args.gen_steps]


def prompts(lengths, vocab, gen, device):
    T = max(lengths)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    ids = torch.randint(1, vocab, mask.shape, generator=gen) * mask
    return ids.to(device), mask.to(device)


# the phases -----------------------------------------------------------------------------------------------------

def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == 'bf16')


def train_step(model, opt, params, batch, args, device, losses, norms, bad, i):
    """One step; its values stay on the device (losses[i], norms[i], bad[0] += non-finite logits)."""
    with autocast(args, device):
        out = model(**batch)
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses[i] = out.loss.detach().float()
    norms[i] = norm.detach().float()
    bad[0] += (~torch.isfinite(out.logits.detach())).sum()


def train(model, args, device, counter):
    result = dict(steps=0, warmup=args.warmup, modes={}, tokens=0, error=None)
    memory = Memory(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    shapes = train_shapes(random.Random(args.seed), args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = torch.full((args.train_steps,), float('nan'), device=device)
    norms = torch.full((args.train_steps,), float('nan'), device=device)
    bad = torch.zeros(1, dtype=torch.int64, device=device)
    counter.phase = 'train warm-up'
    reset_peak(device)
    start = after = time.perf_counter()
    tokens_after = 0
    try:
        for i, (mode, lengths) in enumerate(shapes):
            if i == args.warmup:
                sync(device)
                counter.phase, after = 'train', time.perf_counter()
            batch = train_batch(mode, lengths, args.vocab, gen, device)
            train_step(model, opt, params, batch, args, device, losses, norms, bad, i)
            del batch
            result['steps'] = i + 1
            result['modes'][mode] = result['modes'].get(mode, 0) + 1
            result['tokens'] += sum(lengths)
            tokens_after += sum(lengths) if i >= args.warmup else 0
            memory.record(warm=i < args.warmup)
            if args.log_every and (i + 1) % args.log_every == 0:
                progress('train', i + 1, args.train_steps, losses[i].item(), start, memory, counter)
    except Exception as e:  # a soak reports a crash as its finding
        result['error'] = describe(e)
    sync(device)
    end = time.perf_counter()
    n = result['steps']
    done = losses[:n].cpu()
    k = max(1, min(10, n // 2))  # the loss is averaged over the first and the last k steps
    result.update(
        losses_nonfinite=int((~torch.isfinite(done)).sum()),
        norms_nonfinite=int((~torch.isfinite(norms[:n].cpu())).sum()),
        logits_nonfinite=int(bad.item()),
        params_nonfinite=sum(int((~torch.isfinite(p.detach())).sum()) for p in params),
        loss_first=mean(done[:k]), loss_last=mean(done[-k:]), loss_window=k,
        seconds=end - start, seconds_after=end - after if n > args.warmup else None,
        steps_after=max(0, n - args.warmup), tokens_after=tokens_after, peak_mib=peak(device))
    opt.zero_grad(set_to_none=True)
    del opt, params
    return result, memory


def generate(model, args, device, counter):
    result = dict(steps=0, warmup=args.gen_warmup, tokens=0, tokens_after=0, error=None)
    memory = Memory(device)
    model.eval()
    shapes = gen_shapes(random.Random(args.seed + 2), args)
    gen = torch.Generator().manual_seed(args.seed + 3)
    bad = torch.zeros(1, dtype=torch.int64, device=device)
    short_rounds = 0  # rounds that returned another number of tokens than asked
    counter.phase = 'generate warm-up'
    sync(device)
    reset_peak(device)
    start = after = time.perf_counter()
    try:
        if args.dtype == 'bf16':
            model.to(torch.bfloat16)
        with torch.no_grad():
            for i, (lengths, new) in enumerate(shapes):
                if i == args.gen_warmup:
                    sync(device)
                    counter.phase, after = 'generate', time.perf_counter()
                ids, mask = prompts(lengths, args.vocab, gen, device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
                bad[0] += sum((~torch.isfinite(x)).sum() for x in out.logits)
                short_rounds += out.sequences.shape[1] != ids.shape[1] + new
                del out, ids, mask
                result['steps'] = i + 1
                result['tokens'] += len(lengths) * new
                result['tokens_after'] += len(lengths) * new if i >= args.gen_warmup else 0
                memory.record(warm=i < args.gen_warmup)
                if args.log_every and (i + 1) % args.log_every == 0:
                    progress('generate', i + 1, args.gen_steps, None, start, memory, counter)
    except Exception as e:
        result['error'] = describe(e)
    sync(device)
    end = time.perf_counter()
    n = result['steps']
    result.update(logits_nonfinite=int(bad.item()), short_rounds=int(short_rounds), seconds=end - start,
                  seconds_after=end - after if n > args.gen_warmup else None,
                  steps_after=max(0, n - args.gen_warmup), peak_mib=peak(device))
    return result, memory


def describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def mean(t):
    return float(t.mean()) if t.numel() else None


def progress(phase, i, total, loss, start, memory, counter):
    alloc = (memory.after['alloc'] or memory.warm['alloc'] or [None])[-1]
    late = counter.count(phase)  # the phase's count after warm-up (0 while in it)
    print(f"{phase} {i}/{total}: " + (f"loss {loss:.4f}, " if loss is not None else '')
          + f"{i / (time.perf_counter() - start):.1f} steps/s"
          + (f", allocated {alloc:.1f} MiB" if alloc is not None else f", RSS {rss_mib():.0f} MiB")
          + (f", compilations after warm-up {late}" if late is not None else ''), flush=True)


# the report -----------------------------------------------------------------------------------------------------

def checks(args, device, counter, phases):
    """[(check, {phase: shown value}, {phase: ok} or None for a figure reported only, limit)] and the figures
    for the JSON."""
    rows, figures = [], {}
    cuda = device.type == 'cuda'
    for name, (res, mem) in phases.items():
        key = 'train' if name == 'train' else 'generate'
        warm, late = counter.count(f'{key} warm-up'), counter.count(key)
        figures[name] = {k: v for k, v in res.items()}
        figures[name].update(
            alloc_growth_mib=mem.growth('alloc'), alloc_drift_mib=mem.drift('alloc'),
            alloc_warmup_max_mib=max(mem.warm['alloc'], default=None),
            alloc_after_max_mib=max(mem.after['alloc'], default=None),
            rss_growth_mib=mem.growth('rss'), rss_drift_mib=mem.drift('rss'),
            compilations_warmup=warm, compilations_after=late, compilations_after_ours=counter.ours(key),
            late_kernels=counter.kernels(key) if late else [])

    def per_phase(show, ok=None, only=None):
        """A row's shown values and, for a check, its verdicts, for every phase (or those of ``only``) that ran."""
        names = [n for n in figures if (only is None or n == only)]
        shown = {n: show(figures[n]) if figures[n]['steps'] else '-' for n in names}
        return shown, None if ok is None else {n: bool(ok(figures[n])) for n in names if figures[n]['steps']}

    def fmt_mib(v):
        return 'n/a' if v is None else f'{v:+.2f} MiB'

    def add(check, limit, show, ok=None, only=None):
        if only is None or only in figures:
            rows.append((check, *per_phase(show, ok, only), limit))

    # a phase that raised counts even where it ran no step
    rows.append(('phase raised', {n: short(f['error']) if f['error'] else 'no' for n, f in figures.items()},
                 {n: f['error'] is None for n, f in figures.items()}, 'no'))
    add('non-finite losses', '0', lambda f: f"{f['losses_nonfinite']} of {f['steps']}",
        lambda f: f['losses_nonfinite'] == 0, only='train')
    add('non-finite grad norms', '0', lambda f: f"{f['norms_nonfinite']} of {f['steps']}",
        lambda f: f['norms_nonfinite'] == 0, only='train')
    add('non-finite parameters', '0', lambda f: str(f['params_nonfinite']), lambda f: f['params_nonfinite'] == 0,
        only='train')
    add('non-finite logits (elements)', '0', lambda f: str(f['logits_nonfinite']), lambda f: f['logits_nonfinite'] == 0)
    add('rounds short of tokens', '0', lambda f: str(f['short_rounds']), lambda f: f['short_rounds'] == 0,
        only='generate')
    if cuda:
        add('allocated growth after warm-up', f'{args.max_growth_mib:g} MiB', lambda f: fmt_mib(f['alloc_growth_mib']),
            lambda f: f['alloc_growth_mib'] is None or f['alloc_growth_mib'] <= args.max_growth_mib)
        add('allocated at step ends: max warm-up / after', '',
            lambda f: f"{mib(f['alloc_warmup_max_mib'])} / {mib(f['alloc_after_max_mib'])} MiB")
        add('peak allocated', '', lambda f: f"{mib(f['peak_mib'])} MiB")
    add('RSS growth after warm-up', 'reported', lambda f: fmt_mib(f['rss_growth_mib']))
    if counter.how is None:
        add('Triton compilations warm-up / after', '', lambda f: 'n/a (interpreter)')
    else:
        add('Triton compilations warm-up / after', 'reported',
            lambda f: f"{f['compilations_warmup']} / {f['compilations_after']}")
        add("  of mom_wrap's kernels after warm-up", f'{args.max_recompiles}',
            lambda f: str(f['compilations_after_ours']),
            lambda f: f['compilations_after_ours'] <= args.max_recompiles)
    add('steps/s after warm-up', '', lambda f: rate(f['steps_after'], f['seconds_after']))
    add('tokens/s after warm-up', '', lambda f: rate(f['tokens_after'], f['seconds_after']))
    return rows, figures


def mib(v):
    return 'n/a' if v is None else f'{v:.1f}'


def short(text, n=40):
    return text if len(text) <= n else text[:n - 3] + '...'


def rate(n, seconds):
    return 'n/a' if not seconds or not n else f'{n / seconds:.1f}'


def report(args, device, counter, phases):
    rows, figures = checks(args, device, counter, phases)
    names = list(phases)
    tr, ge = figures.get('train', {}), figures.get('generate', {})
    dev = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f"\nsoak: {args.family} (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}) converted with "
          f"M={args.num_memories} top-{args.topk} + shared, init {args.init}, backend {args.backend}, {args.dtype}, "
          f"{dev}, seed {args.seed}")
    if tr.get('steps'):
        modes = ', '.join(f'{m} {n}' for m, n in sorted(tr['modes'].items()))
        loss = ', '.join(f'{v:.4f}' if v is not None else 'n/a' for v in (tr['loss_first'], tr['loss_last']))
        print(f"train: {tr['steps']} steps ({args.warmup} warm-up; {modes}), {tr['tokens']} tokens, batch up to "
              f"{args.max_batch} x {args.min_len}..{args.max_len}; loss, mean of the first / last "
              f"{tr['loss_window']} steps: {loss}; "
              f"{tr['seconds']:.1f} s")
    if ge.get('steps'):
        print(f"generate: {ge['steps']} rounds ({args.gen_warmup} warm-up), {ge['tokens']} new tokens, batch up to "
              f"{args.gen_max_batch}, prompts 1..{args.max_prompt}, 1..{args.max_new_tokens} new tokens; "
              f"{ge['seconds']:.1f} s")
    print(f"Triton compilations counted by: {counter.how or 'n/a (interpreter: nothing compiles)'}")
    width = max(len(r[0]) for r in rows)
    cols = [max(14, *(len(r[1].get(n, '-')) for r in rows)) for n in names]
    print(f"{'check':<{width}}  " + '  '.join(f'{n:<{c}}' for n, c in zip(names, cols)) + f"  {'limit':<10}  result")
    failed = False
    for check, values, ok, limit in rows:
        bad = ok is not None and not all(ok.values())
        failed |= bad
        result = '' if ok is None else ('FAIL' if bad else 'ok')
        print(f"{check:<{width}}  " + '  '.join(f"{values.get(n, '-'):<{c}}" for n, c in zip(names, cols))
              + f"  {limit:<10}  {result}")
    for name in names:
        if figures[name]['error']:
            print(f"{name} raised: {figures[name]['error']}")
        late = figures[name]['late_kernels']
        for whose, kernels in (('mom_wrap', [kn for kn in late if is_ours(kn[0])]),
                               ('host library (reported)', [kn for kn in late if not is_ours(kn[0])])):
            if kernels:
                print(f"{name}: {whose} kernels compiled after warm-up: "
                      + ', '.join(f'{k} x{n}' for k, n in kernels[:10]) + (' ...' if len(kernels) > 10 else ''))
    print('FAIL' if failed else 'PASS')
    return failed, rows, figures


def write_json(args, path, rows, figures):
    host = HOSTS[args.family]
    case = {k: getattr(args, k) for k in ('family', 'hidden', 'heads', 'layers', 'vocab', 'num_memories', 'topk',
                                          'init', 'backend', 'dtype', 'seed', 'autotune')}
    rec = Recorder(None, 'soak')
    for name, f in figures.items():
        extra = (dict(steps=args.train_steps, warmup=args.warmup, modes=args.modes, max_batch=args.max_batch,
                      min_len=args.min_len, max_len=args.max_len, mode='train') if name == 'train' else
                 dict(steps=args.gen_steps, warmup=args.gen_warmup, max_batch=args.gen_max_batch,
                      max_prompt=args.max_prompt, max_new_tokens=args.max_new_tokens, mode='generate'))
        ms = 1e3 * f['seconds_after'] / f['steps_after'] if f.get('seconds_after') and f['steps_after'] else None
        bad = [check for check, _, ok, _ in rows if ok is not None and ok.get(name) is False]
        status = 'ok' if not bad else 'failed: ' + '; '.join(bad)
        row = rec.add(f'soak {name}', 'mom_wrap', host, {**case, **extra}, ms=ms,
                      peak_mib=f.get('peak_mib'), status=status)
        row['soak'] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in f.items()}
    write_rows(path, rec.rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup(args)
    counter = CompileCounter().install()
    model = build_model(args, device)
    phases = {}
    phases['train'] = train(model, args, device, counter)
    if args.json:  # what training measured survives a generation phase cut short
        write_json(args, args.json, *checks(args, device, counter, phases))
    phases['generate'] = generate(model, args, device, counter)
    failed, rows, figures = report(args, device, counter, phases)
    if args.json:
        write_json(args, args.json, rows, figures)
        print(f'wrote {args.json}')
    return int(failed)


if __name__ == '__main__':
    sys.exit(main())
