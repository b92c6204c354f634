"""MQAR (multi-query associative recall) training and evaluation of the models of ``evidence.models``.

    python -m evidence.mqar train --host GatedDeltaNet --d-model 128 --variant mom --lr 1e-3 --seed 0
    python -m evidence.mqar sweep --hosts GatedDeltaNet GLA Mamba2 --d-models 64 128 256 --jobs 8
    python -m evidence.mqar plot   (see evidence.plots)

One run: a seeded model, AdamW (weight decay 0.1, betas 0.9 / 0.98) with a linear warm-up over the first tenth of
the steps and a cosine decay, batches of Zoology's training mix (``evidence.mqar_data.TRAIN_MIX``, one setting per
batch), the loss on the answer positions only, bf16 autocast on a GPU; then accuracy on fixed test sets
(``TEST_SETTINGS``, the same examples for every run). The row (``evidence.runs``) records the spec, parameter count
and state size, the optimisation settings, the accuracy per test setting, the loss curve, the accuracy along
training (``--eval-every``), and for MoM models the memory loads over training and which memory the keys, values,
queries and fillers of a test batch went to (``mom_wrap.stats``). A run whose ``run_id`` is in the results file already is skipped: a sweep resumes, and a later
sweep appends.

What is cut from Zoology's protocol (its 64 epochs of 100,000 examples per setting mix; learning rates swept over
1e-4 .. 1e-2): ``steps`` batches of ``batch_size`` (default 2000 x 64), three learning rates; README's "Does it
work?" says which were run.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from evidence import runs
from evidence.models import CONTROLS, HOSTS, VARIANTS, ModelSpec, build, describe
from evidence.mqar_data import (DEFAULT_VOCAB_SIZE, IGNORE_INDEX, TEST_SETTINGS, TRAIN_MIX, MQARBatch, MQARMixture,
                                MQARSetting, make_eval_sets)

EVAL_SEED = 1234  # the test sets: the same for every run


@dataclasses.dataclass
class TrainConfig:
    lr: float = 1e-3
    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    eval_examples: int = 1000
    eval_batch: int = 64
    snapshots: int = 10  # memory-load snapshots over training (MoM models)
    # > 0: mean accuracy on the first curve_examples of each test set every this many steps: the row's
    # accuracy_curve, whose last point is the final accuracy on all eval_examples
    eval_every: int = 0
    curve_examples: int = 128
    train_mix: tuple = TRAIN_MIX
    test_settings: tuple = TEST_SETTINGS
    assignment_setting: MQARSetting = MQARSetting(256, 64)  # a test batch's token -> memory assignment (MoM rows)
    assignment_examples: int = 32
    # seconds: training stops after the first step past it (a time-boxed machine), the row says so (``complete``
    # False, ``steps_done``) and a later sweep runs it again; not part of the run_id
    time_limit: float | None = None

    def run_id(self, spec: ModelSpec) -> str:
        data = ''
        if (self.train_mix, self.test_settings) != (TRAIN_MIX, TEST_SETTINGS):  # another protocol: its own runs
            text = repr([(s.seq_len, s.num_kv_pairs, s.power_a) for s in (*self.train_mix, None, *self.test_settings)
                         if s is not None] + [len(self.train_mix)])
            data = '-data' + hashlib.sha256(text.encode()).hexdigest()[:8]
        return f"{spec.name}-v{spec.vocab_size}-lr{self.lr:g}-s{self.seed}-n{self.steps}-b{self.batch_size}{data}"


def _logits(model, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).logits


def _schedule(step: int, steps: int) -> float:
    """The learning-rate factor: linear warm-up over the first tenth, then cosine decay to 0."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the answer positions (labels != -100), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def categories(batch: MQARBatch) -> dict[str, torch.Tensor]:
    """Each position's role in ``batch``, as masks [B, T]: 'key' and 'value' (the context's pairs), 'query' (a key
    asked again), 'filler' (the rest)."""
    B, T = batch.inputs.shape
    n = batch.setting.num_kv_pairs
    position = torch.arange(T, device=batch.inputs.device).expand(B, T)
    query = torch.zeros(B, T, dtype=torch.bool, device=batch.inputs.device)
    query.scatter_(1, batch.query_positions, True)
    context = position < 2 * n
    return {'key': context & (position % 2 == 0), 'value': context & (position % 2 == 1), 'query': query,
            'filler': ~context & ~query}


@torch.no_grad()
def evaluate(model, sets: dict[MQARSetting, MQARBatch], batch: int, autocast: bool) -> dict[str, float]:
    """Accuracy on each test set: ``{"<seq_len>x<pairs>": fraction of answers right}``."""
    model.eval()
    out = {}
    for setting, data in sets.items():
        right = total = 0
        for i in range(0, data.inputs.shape[0], batch):
            x, y = data.inputs[i:i + batch], data.labels[i:i + batch]
            with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
                pred = _logits(model, x).argmax(-1)
            mask = y != IGNORE_INDEX
            right += (pred[mask] == y[mask]).sum()
            total += mask.sum()
        out[f"{setting.seq_len}x{setting.num_kv_pairs}"] = float(right / total)
    model.train()
    return out


def train(spec: ModelSpec, config: TrainConfig, device: str = 'cpu', results: str | None = None,
          progress: bool = True) -> dict:
    """Train and evaluate one model; returns its row (and appends it to ``results`` if given, unless a row of
    the same run_id is there: then that row is returned and nothing runs). On the CPU the plain hosts run as
    their one-memory copies (``evidence.models.build``)."""
    from tqdm import tqdm

    from mom_wrap.stats import MemoryStats
    run_id = config.run_id(spec)
    if results is not None:
        for row in runs.read_rows(results):
            if row.get('run_id') == run_id and runs.complete(row):
                return row
    cpu = torch.device(device).type == 'cpu'
    torch.manual_seed(config.seed)
    model = build(spec, device, host_as_one_memory=cpu).train()
    row = {'run_id': run_id, 'task': 'mqar', **describe(spec, model), 'host_as_one_memory': cpu and
           spec.variant != 'mom' and spec.host not in CONTROLS, **{k: v for k, v in dataclasses.asdict(config).items()
                                     if k not in ('train_mix', 'test_settings', 'assignment_setting', 'time_limit')},
           'train_mix': [[s.seq_len, s.num_kv_pairs] for s in config.train_mix]}
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and 'embed' not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and 'embed' not in n)]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': rest, 'weight_decay': 0.0}],
                            lr=config.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config.steps))
    data = MQARMixture(config.train_mix, config.batch_size, vocab_size=spec.vocab_size, seed=config.seed,
                       device=device, num_batches=config.steps)
    stats = MemoryStats(model).attach() if spec.variant == 'mom' else None
    autocast = not cpu
    every = max(1, config.steps // max(1, config.snapshots))
    sets = make_eval_sets(config.test_settings, config.eval_examples, vocab_size=spec.vocab_size, seed=EVAL_SEED,
                          device=device)
    curve_sets = {k: v.head(config.curve_examples) for k, v in sets.items()}
    curve = []
    losses, start = [], time.time()  # (len(losses): the steps done)
    for step, batch in enumerate(tqdm(data, total=config.steps, desc=run_id, disable=not progress,
                                      mininterval=5)):
        with torch.autocast(batch.inputs.device.type, torch.bfloat16, enabled=autocast):
            loss = loss_fn(_logits(model, batch.inputs), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if stats is not None and (step + 1) % every == 0:
            stats.snapshot(step + 1)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            acc = evaluate(model, curve_sets, config.eval_batch, autocast)
            curve.append([step + 1, round(sum(acc.values()) / len(acc), 4)])
            if progress:
                tqdm.write(f"{run_id} step {step + 1}: loss {losses[-1].item():.3f}, accuracy {curve[-1][1]:.3f} "
                           f"({time.time() - start:.0f} s)")
        if config.time_limit is not None and time.time() - start > config.time_limit and step + 1 < config.steps:
            if progress:
                tqdm.write(f"{run_id}: time limit ({config.time_limit:g} s) at step {step + 1}: stopped")
            break
    train_seconds, steps_done = time.time() - start, len(losses)
    row['steps_done'], row['complete'] = steps_done, steps_done == config.steps
    row['loss'] = [float(x) for x in torch.stack(losses)[::every].cpu()]  # one host sync, at the end
    row['final_loss'] = float(torch.stack(losses[-max(1, len(losses) // 20):]).mean())
    row['train_seconds'] = round(train_seconds, 1)
    row['accuracy'] = evaluate(model, sets, config.eval_batch, autocast)
    row['mean_accuracy'] = sum(row['accuracy'].values()) / len(row['accuracy'])
    # [step, mean accuracy]; a run stopped at its time limit right after a curve point: the final one in its place
    row['accuracy_curve'] = [c for c in curve if c[0] < steps_done] + [[steps_done, round(row['mean_accuracy'], 4)]]
    if stats is not None:
        stats.detach()
        row['loads'] = {name: {'steps': h['steps'], 'load': h['load'].tolist(), 'entropy': h['entropy'].tolist()}
                        for name, h in stats.history().items()}
        row['assignment'] = _assignment(model, spec, config, device, autocast)
    row.update(runs.environment())
    if results is not None:
        runs.append_row(results, row)
    return row


@torch.no_grad()
def _assignment(model, spec: ModelSpec, config: TrainConfig, device, autocast: bool) -> dict:
    """Per layer, the share of each category's routed slots (key / value / query / filler) taken by each memory,
    on one test batch of ``config.assignment_setting``."""
    from mom_wrap.stats import MemoryStats
    setting = config.assignment_setting
    batch = make_eval_sets([setting], config.assignment_examples, vocab_size=spec.vocab_size, seed=EVAL_SEED,
                           device=device)[setting]
    model.eval()
    with MemoryStats(model) as rec:
        rec.capture_next()
        with torch.autocast(batch.inputs.device.type, torch.bfloat16, enabled=autocast):
            _logits(model, batch.inputs)
    model.train()
    masks = categories(batch)
    out = {}
    for name, assignment in rec.assignments().items():
        names, share = assignment.shares({k: v.cpu() for k, v in masks.items()})
        out[name] = {'categories': names, 'share': share.tolist(), 'setting': [setting.seq_len,
                                                                                 setting.num_kv_pairs]}
    return out


# command line ----------------------------------------------------------------------------------------------------

LRS = (3e-4, 1e-3, 3e-3)


def _settings(text: str) -> tuple[MQARSetting, ...]:
    """'64x4,128x8' -> the settings (seq_len x pairs)."""
    try:
        return tuple(MQARSetting(*map(int, item.split('x'))) for item in text.split(','))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"expected settings as SEQLENxPAIRS[,...], got {text!r}: {e}") from None


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--steps', type=int, default=TrainConfig.steps)
    p.add_argument('--train-mix', type=_settings, default=None, help='default: Zoology\'s mix, 64x4 .. 256x64')
    p.add_argument('--test-settings', type=_settings, default=None, help='default: 64x4 .. 1024x256')
    p.add_argument('--eval-batch', type=int, default=TrainConfig.eval_batch)
    p.add_argument('--batch-size', type=int, default=TrainConfig.batch_size)
    p.add_argument('--eval-examples', type=int, default=TrainConfig.eval_examples)
    p.add_argument('--eval-every', type=int, default=TrainConfig.eval_every,
                   help='steps between accuracy measurements on the first --curve-examples of each test set (0: none)')
    p.add_argument('--curve-examples', type=int, default=TrainConfig.curve_examples)
    p.add_argument('--vocab-size', type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument('--time-limit', type=float, default=None, metavar='SECONDS',
                   help='stop training a run after this long (its row says complete: false; a later sweep reruns it)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--results', default='evidence/results/mqar.jsonl', help='JSON lines, appended (resumable)')
    p.add_argument('--first-config', action='store_true',
                   help="Triton kernels run their first config, no autotuning (evidence.runs.triton_setup)")


def jobs(hosts, d_models, variants, lrs, seeds, balances) -> list[tuple[ModelSpec, float, int]]:
    """The sweep's grid: every (spec, lr, seed); the balancing-loss settings apply to MoM models only."""
    out = []
    for host, d, variant, lr, seed in itertools.product(hosts, d_models, variants, lrs, seeds):
        if host in CONTROLS and variant != 'host':  # (a control has no memories to vary)
            continue
        for balance in (balances if variant == 'mom' else (ModelSpec.balance,)):
            out.append((ModelSpec(host, d, variant, balance=balance), lr, seed))
    return out


def _config(args, **kw) -> TrainConfig:
    more = {}
    if args.train_mix:
        more['train_mix'] = args.train_mix
    if args.test_settings:
        more['test_settings'] = args.test_settings
        more['assignment_setting'] = max(args.test_settings, key=lambda s: (s.num_kv_pairs, s.seq_len))
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_examples=args.eval_examples,
                       eval_batch=args.eval_batch, eval_every=args.eval_every, curve_examples=args.curve_examples,
                       time_limit=args.time_limit, **more, **kw)


def train_command(args, spec: ModelSpec, lr: float, seed: int) -> list[str]:
    """The ``train`` command line of one sweep run: the sweep's arguments, this run's model, lr and seed."""
    cmd = [sys.executable, '-m', 'evidence.mqar', 'train', '--host', spec.host, '--d-model', str(spec.d_model),
           '--variant', spec.variant, '--balance', str(spec.balance), '--lr', str(lr), '--seed', str(seed),
           '--steps', str(args.steps), '--batch-size', str(args.batch_size), '--eval-examples',
           str(args.eval_examples), '--eval-batch', str(args.eval_batch), '--eval-every',
           str(args.eval_every), '--curve-examples', str(args.curve_examples), '--vocab-size',
           str(args.vocab_size), '--device', args.device, '--results', args.results]  # progress: the log
    if args.time_limit is not None:
        cmd += ['--time-limit', str(args.time_limit)]
    if args.first_config:  # (each process its own Triton setup: the flag goes with it)
        cmd.append('--first-config')
    for flag, settings in (('--train-mix', args.train_mix), ('--test-settings', args.test_settings)):
        if settings:
            cmd += [flag, ','.join(f"{x.seq_len}x{x.num_kv_pairs}" for x in settings)]
    return cmd


def _sweep(args) -> int:
    """Run the grid as ``--jobs`` processes at a time (small models leave a GPU mostly idle), skipping runs in the
    results file; returns the number of failed runs."""
    from tqdm import tqdm
    grid = jobs(args.hosts, args.d_models, args.variants, args.lrs, args.seeds, args.balances)
    have = set().union(*(runs.done(path) for path in [args.results, *args.done_in]))
    todo = [(s, lr, seed) for s, lr, seed in grid
            if _config(args, lr=lr, seed=seed).run_id(dataclasses.replace(s, vocab_size=args.vocab_size)) not in have]
    print(f"{len(grid)} runs, {len(grid) - len(todo)} done already, {len(todo)} to run", flush=True)
    running, failed, start = [], 0, time.time()
    bar = tqdm(total=len(todo), desc='sweep', mininterval=10)
    os.makedirs(args.logs, exist_ok=True)
    while todo or running:
        if args.deadline is not None and time.time() - start > args.deadline and todo:
            print(f"deadline: {len(todo)} runs not started (a later sweep resumes them)", flush=True)
            todo = []
        while todo and len(running) < args.jobs:
            spec, lr, seed = todo.pop(0)
            cmd = train_command(args, spec, lr, seed)
            log = open(os.path.join(args.logs, f"{spec.name}-lr{lr:g}-s{seed}.log"), 'w')
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, spec.name))
        time.sleep(1)
        for item in list(running):
            proc, log, name = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                bar.update(1)
                if proc.returncode:
                    failed += 1
                    print(f"failed: {name} (log {log.name})", flush=True)
    bar.close()
    return failed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m evidence.mqar', description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train and evaluate one model; append its row')
    t.add_argument('--host', choices=HOSTS + CONTROLS, required=True)
    t.add_argument('--d-model', type=int, required=True)
    t.add_argument('--variant', choices=VARIANTS, default='host')
    t.add_argument('--balance', type=float, default=ModelSpec.balance)
    t.add_argument('--lr', type=float, default=TrainConfig.lr)
    t.add_argument('--seed', type=int, default=0)
    t.add_argument('--quiet', action='store_true')
    _train_args(t)
    s = sub.add_parser('sweep', help='train a grid of models, several processes at a time')
    s.add_argument('--hosts', nargs='+', choices=HOSTS + CONTROLS, default=list(HOSTS))
    s.add_argument('--d-models', nargs='+', type=int, default=[64, 128, 256])
    s.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    s.add_argument('--lrs', nargs='+', type=float, default=list(LRS))
    s.add_argument('--seeds', nargs='+', type=int, default=[0])
    s.add_argument('--balances', nargs='+', type=float, default=[ModelSpec.balance])
    s.add_argument('--jobs', type=int, default=8)
    s.add_argument('--logs', default='evidence/results/logs')
    s.add_argument('--done-in', nargs='+', default=[], metavar='RESULTS',
                   help='more results files (committed rows, an earlier machine\'s): their complete runs are not run '
                        'again; new rows still go to --results')
    s.add_argument('--deadline', type=float, default=None,
                   help='seconds after which no new run starts (those running finish): for time-boxed machines')
    _train_args(s)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if torch.device(args.device).type == 'cpu':
        from mom_wrap import interpret_on_cpu
        interpret_on_cpu()  # fla's model norms and MLP are Triton kernels: the interpreter runs them (slowly)
    else:
        runs.triton_setup(args.first_config)
    if args.command == 'train':
        spec = ModelSpec(args.host, args.d_model, args.variant, vocab_size=args.vocab_size, balance=args.balance)
        config = _config(args, lr=args.lr, seed=args.seed)
        row = train(spec, config, args.device, args.results, progress=not args.quiet)
        state = 'a KV cache' if row['state_size'] is None else f"{row['state_size']:,}"
        print(f"{row['run_id']}: mean accuracy {row['mean_accuracy']:.3f}, {row['params']:,} parameters, state "
              f"{state}")
        return 0
    return 1 if _sweep(args) else 0


if __name__ == '__main__':
    sys.exit(main())
