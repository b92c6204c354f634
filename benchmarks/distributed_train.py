"""A converted fla model trained under DistributedDataParallel and under FSDP2 (``fully_shard`` per decoder layer):
per-step losses against the one-GPU run over the same global batch.

    torchrun --nproc_per_node 2 benchmarks/distributed_train.py                      # 2 GPUs, NCCL
    torchrun --nproc_per_node 2 benchmarks/distributed_train.py --device cpu \\
        --hidden 64 --seq-len 16 --batch 4 --steps 3                                  # CPU, gloo (interpreter)

One fixed synthetic batch of token ids [--batch, --seq-len] (seeded) is split across the ranks by rows; every
step trains on it again. The model (``--family``, default GatedDeltaNet) is built with the same seed on every
rank and converted with ``mom_wrap.convert`` (``--init``, default ``random``: memories unlike each other). Runs:

* one GPU: rank 0 alone, a plain copy (no DDP, no sharding), the ranks' shares of the batch as micro-batches
  whose losses are averaged before one backward (what data parallelism computes). The balancing loss is attached
  per forward with its weight applied as it is (``mom_wrap.losses``), so this run takes weight / world size:
  DDP and FSDP average it over the ranks. ``--reference global`` runs the whole batch in one forward instead
  (needs ``--balance-loss-weight 0``: the balancing term of a batch is not the mean of its parts').
* DDP without ``find_unused_parameters``; DDP's "Grad strides do not match bucket view strides" warning is
  counted (it must not appear).
* FSDP2: ``fully_shard`` on each decoder layer, then on the model. With ``--resume`` (default on) it also
  saves a sharded checkpoint (model and optimizer, ``torch.distributed.checkpoint`` with ``get_state_dict``) at
  half the steps, continues, loads the checkpoint into a fresh sharded model and optimizer and repeats the
  second half: those losses must equal the continued run's (``--resume-tol``, 0 by default: bit for bit; on the
  GPU a kernel whose backward adds with atomics would differ in the last bits: the table shows by how much).

Rank 0 prints a table of the losses per step (the distributed runs' losses are the mean over ranks of their
local losses) and the largest relative difference to the one-GPU run; the exit status is 1 (on every rank) if
that exceeds ``--tol``, the resumed losses differ or DDP warned. Optimizer: AdamW, fp32 parameters; ``--amp bf16``
runs every forward under ``torch.autocast`` (all runs alike; CUDA only: fla's fused MLP backward fails under the
CPU's autocast).

On the CPU, fla's fused norms and MLP run through Triton's interpreter (``mom_wrap.interpret_on_cpu``, set
before fla is imported): keep the sizes tiny there. On CUDA, Triton's fp32 dot products run in IEEE fp32
(``TRITON_F32_DEFAULT=ieee`` unless set; ``--tf32`` leaves fla's TF32 default) and each kernel takes its first
autotune config (``--autotune`` to tune): both runs then use the same kernels on every rank, and only the
reduction order of the gradients differs between the one-GPU and the distributed runs.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

FAMILIES = {  # --family -> (fla config class, model class, options beyond the common ones, given hidden and heads)
    'GatedDeltaNet': ('GatedDeltaNetConfig', 'GatedDeltaNetForCausalLM',
                      lambda hidden, heads: dict(num_heads=heads, head_dim=hidden // heads, expand_v=1)),
    'GLA': ('GLAConfig', 'GLAForCausalLM', lambda hidden, heads: dict(num_heads=heads)),
    'DeltaNet': ('DeltaNetConfig', 'DeltaNetForCausalLM', lambda hidden, heads: dict(num_heads=heads)),
    'RWKV6': ('RWKV6Config', 'RWKV6ForCausalLM',
              lambda hidden, heads: dict(num_heads=heads, proj_low_rank_dim=8, gate_low_rank_dim=16)),
    'RWKV7': ('RWKV7Config', 'RWKV7ForCausalLM',
              lambda hidden, heads: dict(head_dim=hidden // heads, decay_low_rank_dim=16, gate_low_rank_dim=16,
                                         a_low_rank_dim=16, v_low_rank_dim=8)),
}
STRIDE_WARNING = 'Grad strides do not match bucket view strides'


def add_model_arguments(p, vocab: int, inits=('random', 'preserve', 'copy')) -> None:
    """--device and the arguments ``converted_model`` reads (but --seed), for this script and soak.py."""
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--family', choices=sorted(FAMILIES), default='GatedDeltaNet')
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--heads', type=int, default=2)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--vocab', type=int, default=vocab)
    p.add_argument('--num-memories', type=int, default=4)
    p.add_argument('--topk', type=int, default=2)
    p.add_argument('--init', choices=inits, default='random')
    p.add_argument('--balance-loss-weight', type=float, default=0.01)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, vocab=1024)
    p.add_argument('--batch', type=int, default=8, help='global batch (rows), split across the ranks')
    p.add_argument('--seq-len', type=int, default=512)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--amp', choices=('none', 'bf16'), default='none')
    p.add_argument('--reference', choices=('accumulate', 'global'), default='accumulate',
                   help="one-GPU run: the ranks' shares as micro-batches (default) or the whole batch in one forward")
    p.add_argument('--runs', default='ddp,fsdp', help='comma-separated: ddp, fsdp')
    p.add_argument('--resume', action=argparse.BooleanOptionalAction, default=True,
                   help='FSDP2: save a sharded checkpoint at half the steps, resume from it, compare')
    p.add_argument('--checkpoint-dir', default=None, help='default: a temporary directory (shared by the ranks: '
                                                          'one host)')
    p.add_argument('--tol', type=float, default=None,
                   help='largest relative loss difference to the one-GPU run (default 1e-4; 3e-2 with --amp bf16)')
    p.add_argument('--resume-tol', type=float, default=0.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tf32', action='store_true', help="CUDA: leave Triton's fp32 dots in TF32")
    p.add_argument('--autotune', action='store_true', help="CUDA: autotune Triton kernels (default: first config)")
    args = p.parse_args(argv)
    if args.tol is None:
        args.tol = 3e-2 if args.amp == 'bf16' else 1e-4
    args.runs = [r for r in args.runs.split(',') if r]
    if not set(args.runs) <= {'ddp', 'fsdp'}:
        p.error(f"--runs: expected ddp and/or fsdp, got {args.runs}")
    if args.reference == 'global' and args.balance_loss_weight:
        p.error("--reference global needs --balance-loss-weight 0 (the balancing term is per forward)")
    if args.amp == 'bf16' and args.device == 'cpu':
        # fla 0.6's fused SwiGLU backward (fla/modules/activations/ops.py) leaves CUDA's autocast and, on the CPU,
        # multiplies a bf16 gradient with the fp32 weight: "expected m1 and m2 to have the same dtype"
        p.error("--amp bf16 runs on CUDA only (fla's fused MLP backward fails under CPU autocast)")
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    return args


def setup(args):
    """Triton settings (before fla is imported), the process group and this rank's device."""
    if args.device == 'cpu':
        from mom_wrap import interpret_on_cpu
        interpret_on_cpu()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('WORLD_SIZE', 1))))
    else:
        if not args.tf32:
            os.environ.setdefault('TRITON_F32_DEFAULT', 'ieee')
        if not args.autotune:
            from mom_wrap.interpret import first_config_only
            first_config_only()
    warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform.*')
    if args.device == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return device


def converted_model(args, **convert_kwargs):
    """args.family's fla model (vocab, hidden, heads, layers from args), built on the CPU after seeding with
    args.seed and converted with args' num_memories, topk, init and balance_loss_weight (and convert_kwargs)."""
    import fla.models as models

    import mom_wrap
    config_cls, model_cls, extra = FAMILIES[args.family]
    config = getattr(models, config_cls)(vocab_size=args.vocab, hidden_size=args.hidden,
                                         num_hidden_layers=args.layers, fuse_cross_entropy=False,
                                         **extra(args.hidden, args.heads))
    torch.manual_seed(args.seed)
    model = getattr(models, model_cls)(config)
    return mom_wrap.convert(model, num_memories=args.num_memories, topk=args.topk, init=args.init,
                            balance_loss_weight=args.balance_loss_weight, **convert_kwargs)


def build_model(args, device):
    """The converted model, the same on every rank (seeded on the CPU, then moved)."""
    import mom_wrap
    model = converted_model(args)
    with torch.no_grad():  # routing away from uniform, the same on every rank
        g = torch.Generator().manual_seed(args.seed + 1)
        for m in model.modules():
            if isinstance(m, mom_wrap.MixtureOfMemories):
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * args.hidden ** -0.5 * 2)
    return model.to(device).train()


def batch(args, device):
    g = torch.Generator().manual_seed(args.seed + 2)
    return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)


def loss_of(model, ids, args):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16'):
        return model(input_ids=ids, labels=ids).loss


def optimizer(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def one_gpu_losses(model, ids, args, world):
    """The reference on this process alone: losses per step and seconds per step."""
    import mom_wrap
    model = copy.deepcopy(model)
    opt = optimizer(model, args)
    parts = ids.chunk(world) if args.reference == 'accumulate' else [ids]
    mom_wrap.set_balance_loss_weight(model, args.balance_loss_weight / len(parts))
    losses, times = [], []
    for _ in range(args.steps):
        sync(ids.device)
        t = time.perf_counter()
        loss = sum(loss_of(model, part, args) for part in parts) / len(parts)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    return losses, times


def mean_over_ranks(loss):
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return (loss / dist.get_world_size()).item()


def train(model, opt, ids, args, steps):
    """``steps`` steps on this rank's share ``ids``: (mean losses over ranks, seconds per step)."""
    losses, times = [], []
    for _ in range(steps):
        sync(ids.device)
        t = time.perf_counter()
        loss = loss_of(model, ids, args)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(ids.device)
        times.append(time.perf_counter() - t)
        losses.append(mean_over_ranks(loss))
    return losses, times


def ddp_losses(model, ids, args, device):
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(copy.deepcopy(model), device_ids=[device.index] if device.type == 'cuda' else None)
    opt = optimizer(ddp, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        losses, times = train(ddp, opt, ids, args, args.steps)
    strides = sum(STRIDE_WARNING in str(w.message) for w in caught)
    dist.barrier()  # nothing of DDP's in flight when its reducer goes
    del ddp
    return losses, times, strides


def shard(model, device):
    """``fully_shard`` on each decoder layer, then on the model, over all ranks of this device type."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_losses(model, ids, args, checkpoint_dir, device):
    """FSDP2 losses and seconds per step; with ``--resume`` also the resumed second half's losses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sharded = shard(copy.deepcopy(model), device)
    opt = optimizer(sharded, args)
    if not args.resume:
        return (*train(sharded, opt, ids, args, args.steps), None)
    half = args.steps // 2
    first, t1 = train(sharded, opt, ids, args, half)
    msd, osd = get_state_dict(sharded, opt)
    dcp.save({'model': msd, 'optim': osd}, checkpoint_id=checkpoint_dir)
    second, t2 = train(sharded, opt, ids, args, args.steps - half)

    fresh = shard(copy.deepcopy(model), device)  # the initial weights: the checkpoint must replace them all
    fresh_opt = optimizer(fresh, args)
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {'model': msd, 'optim': osd}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_state_dict(fresh, fresh_opt, model_state_dict=state['model'], optim_state_dict=state['optim'])
    resumed, _ = train(fresh, fresh_opt, ids, args, args.steps - half)
    return first + second, t1 + t2, resumed


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    model = build_model(args, device)
    ids = batch(args, device)
    mine = ids.chunk(world)[rank]
    results = {}
    if rank == 0:
        results['one GPU'] = one_gpu_losses(model, ids, args, world)
    dist.barrier()
    strides = 0
    if 'ddp' in args.runs:
        losses, times, strides = ddp_losses(model, mine, args, device)
        results['DDP'] = (losses, times)
    resumed = None
    if 'fsdp' in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            path = [args.checkpoint_dir or tmp]
            dist.broadcast_object_list(path)  # rank 0's directory for all (one host)
            losses, times, resumed = fsdp_losses(model, mine, args, path[0], device)
            dist.barrier()  # every rank done with the checkpoint before rank 0's directory goes
        results['FSDP2'] = (losses, times)
    strides_all = [None] * world
    dist.all_gather_object(strides_all, strides)

    failed = torch.zeros((), dtype=torch.int64, device=device)
    if rank == 0:
        failed += report(args, results, resumed, sum(strides_all), world, device)
    dist.broadcast(failed, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(failed.item())


def report(args, results, resumed, strides, world, device) -> bool:
    ref = results['one GPU'][0]
    names = list(results)
    print(f"{args.family}: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, global batch "
          f"{args.batch} x {args.seq_len} over {world} ranks "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), M={args.num_memories} "
          f"top-{args.topk} + shared, init {args.init}, balance weight {args.balance_loss_weight}, amp {args.amp}, "
          f"reference {args.reference}")
    head = f"{'step':>4}" + ''.join(f"{n:>16}" for n in names) + ''.join(f"{'rel diff ' + n:>20}" for n in names[1:])
    if resumed is not None:
        head += f"{'FSDP2 resumed':>16}"
    print(head)
    half = args.steps // 2
    for s in range(args.steps):
        row = f"{s + 1:>4}" + ''.join(f"{results[n][0][s]:>16.8f}" for n in names)
        row += ''.join(f"{rel(results[n][0][s], ref[s]):>20.2e}" for n in names[1:])
        if resumed is not None:
            row += f"{resumed[s - half]:>16.8f}" if s >= half else f"{'':>16}"
        print(row)
    failed = False
    for n in names[1:]:
        worst = max(rel(a, b) for a, b in zip(results[n][0], ref))
        ok = worst <= args.tol
        failed |= not ok
        print(f"{n}: max relative loss difference to one GPU {worst:.2e} (tolerance {args.tol:.0e}) "
              f"{'ok' if ok else 'FAIL'}")
    if resumed is not None:
        cont = results['FSDP2'][0][half:]
        worst = max(rel(a, b) for a, b in zip(resumed, cont))
        ok = worst <= args.resume_tol
        failed |= not ok
        print(f"FSDP2 resumed from the sharded checkpoint at step {half}: max relative difference to the "
              f"continued run {worst:.2e} (tolerance {args.resume_tol:.0e}) {'ok' if ok else 'FAIL'}")
    if 'DDP' in results:
        failed |= strides > 0
        print(f"DDP stride warnings: {strides} {'ok' if not strides else 'FAIL'}")
    for n in names:  # the first step includes compilation / autotuning
        times = results[n][1][1:] or results[n][1]
        print(f"{n}: {1e3 * sum(times) / len(times):.1f} ms per step (mean after the first)")
    print('FAIL' if failed else 'PASS')
    return failed


if __name__ == '__main__':
    sys.exit(main())
