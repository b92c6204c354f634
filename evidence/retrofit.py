"""Retrofit on real text: byte-level language modelling on the Python standard library's own source files (they ship
with every Python; no one here wrote them), held-out files for validation.

    python -m evidence.retrofit --host GatedDeltaNet --pretrain-steps 2000 --steps 1000 --seeds 0 1 2

A small fla model (``--layers`` 4, ``--d-model`` 256, heads of 64, vocabulary the 256 byte values) is pretrained for
N steps (one checkpoint per host and seed). From that checkpoint, for the same K steps on the same batches:

* ``host``: the host model trained on;
* ``preserve``: ``convert(model, init="preserve")`` (M = 4, top-2 + shared) trained on;
* ``copy``: ``convert(model, init="copy")`` trained on;

and ``scratch``: the MoM model trained from its random initialisation for N + K steps (one schedule). Each row holds
the validation bits per byte over its steps (the continuations' start at step N, where the converted models' loss is
measured before any step: ``preserve`` must equal the host there). Rows go to ``evidence/results/retrofit.jsonl``
(resumable, ``evidence.runs``); ``python -m evidence.retrofit --plot`` draws the curves.

On the CPU (the smoke test) fla's plain models cannot train, so the host trains as its one-memory copy
(``evidence.models.build``), and the conversions start from that copy's weights (``expand``): the same functions.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import statistics
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evidence import runs
from evidence.models import FLA_HOSTS, HEAD, _fla_model

ARMS = ('host', 'preserve', 'copy', 'scratch')
BYTES = 256
LN2 = math.log(2)


# the corpus --------------------------------------------------------------------------------------------------------

def stdlib_files(root: str | None = None) -> list[Path]:
    """The standard library's .py files (its test suites and site-packages left out), sorted."""
    root = Path(root or sysconfig.get_paths()['stdlib'])
    skip = {'site-packages', 'test', 'tests', 'idle_test', '__pycache__'}
    return sorted(p for p in root.rglob('*.py') if not skip & set(p.relative_to(root).parts))


def split(files: list[Path], root: Path, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The files' bytes, concatenated, as uint8 tensors (train, validation): a file goes to validation by a hash of
    its path relative to ``root`` (stable across Pythons and machines), so no file is in both."""
    parts = {'train': [], 'val': []}
    for path in files:
        h = int.from_bytes(hashlib.sha256(str(path.relative_to(root)).encode()).digest()[:8], 'little') / 2 ** 64
        parts['val' if h < val_fraction else 'train'].append(path.read_bytes())
    return tuple(torch.frombuffer(bytearray(b''.join(parts[k])), dtype=torch.uint8) for k in ('train', 'val'))


def windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length + 1`` bytes: [batch, length + 1] int64 (input and next-byte target)."""
    start = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return data[start[:, None] + torch.arange(length + 1)].long()


# models -------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetrofitConfig:
    host: str = 'GatedDeltaNet'
    d_model: int = 256
    layers: int = 4
    pretrain_steps: int = 2000
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 1e-3
    eval_every: int = 100
    eval_windows: int = 128
    num_memories: int = 4
    topk: int = 2

    def run_id(self, arm: str, seed: int) -> str:
        return (f"retrofit-{self.host}-d{self.d_model}-L{self.layers}-{arm}-N{self.pretrain_steps}-K{self.steps}"
                f"-b{self.batch_size}x{self.seq_len}-lr{self.lr:g}-s{seed}")


def plain_model(config: RetrofitConfig):
    return _fla_model(config.host, config.d_model, config.layers, BYTES, 1.0)


def converted(model, config: RetrofitConfig, init: str):
    from mom_wrap import convert
    return convert(model, num_memories=config.num_memories, topk=config.topk, shared_memory=True, init=init)


def one_memory(model):
    """The CPU's stand-in for a plain host: its one-memory copy (the same function, trainable on the PyTorch
    backend)."""
    from mom_wrap import convert
    return convert(model, num_memories=1, topk=1, shared_memory=False, init='copy', balance_loss_weight=0.0)


@torch.no_grad()
def expand(stand_in, config: RetrofitConfig, init: str):
    """The MoM model (``init`` 'preserve' or 'copy') of the host whose one-memory copy is ``stand_in``: what
    ``converted(host, config, init)`` makes of the host (every memory a copy of its write side; with 'preserve' the
    routed ones silenced; a fresh router), built from the copy's weights."""
    from mom_wrap import MixtureOfMemories
    model = converted(plain_model(config), config, init)
    own = stand_in.state_dict()
    for name, p in model.state_dict().items():
        if name in own and own[name].shape == p.shape:
            p.copy_(own[name])  # embeddings, norms, MLPs, the hosts' read sides
    for name, mom in model.named_modules():
        if isinstance(mom, MixtureOfMemories):
            bank = stand_in.get_submodule(name).memories
            for key, p in mom.memories.named_parameters():
                p.copy_(dict(bank.named_parameters())[key][:1].expand_as(p))
            if init == 'preserve':
                mom.memories.silence(mom._adapter.silent_projection, mom.num_memories)
    return model


# training ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def bits_per_byte(model, val: torch.Tensor, config: RetrofitConfig, device, autocast: bool) -> float:
    gen = torch.Generator().manual_seed(4321)  # the same validation windows for every run
    data = windows(val, config.eval_windows, config.seq_len, gen).to(device)
    model.eval()
    total = 0.0
    for chunk in data.split(16):
        with torch.autocast(chunk.device.type, torch.bfloat16, enabled=autocast):
            logits = model(chunk[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction='sum')
    model.train()
    return float(total) / data[:, 1:].numel() / LN2


def run(model, steps: int, first: int, data_seed: int, train: torch.Tensor, val: torch.Tensor,
        config: RetrofitConfig, device, autocast: bool) -> list[tuple[int, float]]:
    """Train ``model`` for ``steps`` steps (AdamW, warm-up over the first 5%, cosine decay) on batches drawn with
    ``data_seed``; the validation curve ``[(first + step, bits per byte)]``, from before the first step on."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(data_seed)
    curve = [(first, bits_per_byte(model, val, config, device, autocast))]
    for step in tqdm(range(steps), desc=f"steps {first}..{first + steps}", mininterval=30):
        batch = windows(train, config.batch_size, config.seq_len, gen).to(device)
        with torch.autocast(batch.device.type, torch.bfloat16, enabled=autocast):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            curve.append((first + step + 1, bits_per_byte(model, val, config, device, autocast)))
    return curve


def experiment(config: RetrofitConfig, seed: int, device: str = 'cpu', results: str | None = None,
               checkpoints: str = 'evidence/results/checkpoints', arms: tuple[str, ...] = ARMS) -> list[dict]:
    """The ``arms`` of one seed (those whose rows ``results`` lacks); returns their rows. Only 'scratch' does not
    need the pretrained checkpoint: run alone, it can go in a process of its own beside the others."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"arms: expected some of {ARMS}, got {sorted(unknown)}")
    have = {r['run_id']: r for r in runs.read_rows(results)} if results else {}
    todo = [arm for arm in ARMS if arm in arms and config.run_id(arm, seed) not in have]
    if not todo:
        return [have[config.run_id(arm, seed)] for arm in ARMS if arm in arms]
    cpu = torch.device(device).type == 'cpu'
    autocast = not cpu
    root = Path(sysconfig.get_paths()['stdlib'])
    train, val = split(stdlib_files(str(root)), root)
    env = runs.environment()

    def row(arm, curve, seconds, model):
        r = {'run_id': config.run_id(arm, seed), 'task': 'retrofit', 'arm': arm, 'seed': seed,
             **dataclasses.asdict(config), 'curve': [[s, v] for s, v in curve], 'final_bpb': curve[-1][1],
             'seconds': round(seconds, 1),
             'params': sum(p.numel() for p in model.parameters()), 'host_as_one_memory': cpu,
             'train_bytes': train.numel(), 'val_bytes': val.numel(), **env}
        if results:
            runs.append_row(results, r)
        have[r['run_id']] = r

    # pretraining: the host for N steps, kept as a checkpoint the continuations start from
    path = Path(checkpoints) / f"{config.run_id('pretrain', seed)}-{'cpu' if cpu else 'gpu'}.pt"
    torch.manual_seed(seed)
    base = plain_model(config)
    if cpu:
        base = one_memory(base)
    base.to(device)
    pre_curve = None
    if todo == ['scratch']:
        pass  # from scratch: no checkpoint needed
    elif path.exists():
        base.load_state_dict(torch.load(path, map_location=device))
    else:
        start = time.time()
        pre_curve = run(base, config.pretrain_steps, 0, seed * 1000 + 1, train, val, config, device, autocast)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), path)
        print(f"pretrained {config.host} seed {seed}: {pre_curve[-1][1]:.3f} bits per byte "
              f"({time.time() - start:.0f} s)", flush=True)
    for arm in todo:
        start = time.time()
        torch.manual_seed(seed * 1000 + ARMS.index(arm))
        if arm == 'scratch':
            model = converted(plain_model(config), config, 'random').to(device)
            curve = run(model, config.pretrain_steps + config.steps, 0, seed * 1000 + 1, train, val, config, device,
                        autocast)
        else:
            if arm == 'host':
                model = plain_model(config)
                model = one_memory(model) if cpu else model
                model.load_state_dict(base.state_dict())
            elif cpu:
                model = expand(base, config, arm)
            else:
                model = plain_model(config)
                model.load_state_dict(base.state_dict())
                converted(model, config, arm)
            model.to(device)
            # the continuation: its own data stream after the pretraining's, the same for every arm
            curve = run(model, config.steps, config.pretrain_steps, seed * 1000 + 2, train, val, config, device,
                        autocast)
            if arm == 'host' and pre_curve is not None:
                curve = pre_curve[:-1] + curve  # the host's row holds the whole pretraining curve too
        row(arm, curve, time.time() - start, model)
    return [have[config.run_id(arm, seed)] for arm in ARMS if arm in arms]


# figure ------------------------------------------------------------------------------------------------------------

def plot(rows: list[dict], path) -> Path:
    """Validation bits per byte over steps, a line per arm (mean over seeds, the seeds' range shaded), a panel per
    (host, model size)."""
    from matplotlib.figure import Figure
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get('task') == 'retrofit':
            key = (r['host'], r['d_model'], r['layers'], r['pretrain_steps'], r['steps'])
            groups.setdefault(key, {}).setdefault(r['arm'], []).append(r)
    if not groups:
        raise ValueError("rows: no retrofit rows")
    fig = Figure(figsize=(6 * len(groups), 4), layout='constrained')
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (key, arms) in zip(axes, sorted(groups.items())):
        for arm in ARMS:
            if arm not in arms:
                continue
            steps = [s for s, _ in arms[arm][0]['curve']]
            values = [[dict(r['curve']).get(s, math.nan) for r in arms[arm]] for s in steps]
            mean = [statistics.mean(v) for v in values]
            ax.plot(steps, mean, label=f"{arm} ({len(arms[arm])} seeds)")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.axvline(key[3], color='gray', linestyle=':', label='conversion')
        ax.set(title=f"{key[0]}, d_model {key[1]}, {key[2]} layers", xlabel='step',
               ylabel='validation bits per byte')
        ax.legend(fontsize='small')
    from evidence.plots import save_png
    return save_png(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m evidence.retrofit', description=__doc__.split('\n\n')[0])
    defaults = RetrofitConfig()
    for field in dataclasses.fields(RetrofitConfig):
        p.add_argument('--' + field.name.replace('_', '-'), type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name))
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS),
                   help="which arms to run ('scratch' alone needs no pretraining: a process of its own)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--results', default='evidence/results/retrofit.jsonl')
    p.add_argument('--first-config', action='store_true',
                   help="Triton kernels run their first config, no autotuning (evidence.runs.triton_setup)")
    p.add_argument('--plot', metavar='PNG', help='draw the rows of --results into PNG and stop')
    args = p.parse_args(argv)
    if torch.device(args.device).type == 'cpu':
        from mom_wrap import interpret_on_cpu
        interpret_on_cpu()  # fla's model norms and MLP are Triton kernels: the interpreter runs them (slowly)
    else:
        runs.triton_setup(args.first_config)
    if args.plot:
        print(plot(runs.read_rows(args.results), args.plot))
        return 0
    if args.host not in FLA_HOSTS:
        p.error(f"--host: expected one of {FLA_HOSTS}, got {args.host!r}")
    if args.d_model % HEAD:
        p.error(f"--d-model: must be a multiple of {HEAD}")
    config = RetrofitConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RetrofitConfig)})
    for seed in args.seeds:
        for r in experiment(config, seed, args.device, args.results, arms=tuple(args.arms)):
            print(f"{r['run_id']}: {r['final_bpb']:.4f} bits per byte")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
