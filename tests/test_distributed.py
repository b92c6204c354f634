"""DistributedDataParallel on the CPU: 2 gloo processes, one of which gets a batch of padding only.

DDP without ``find_unused_parameters`` needs every parameter's gradient on every rank and step, and warns
("Grad strides do not match bucket view strides") when a gradient's strides differ from its parameter's.
"""
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.test_layer import HIDDEN, close, wrap

WORLD = 2


def _layer_and_batch():
    """The same layer and batch on every rank (seeded): x [2, 9, HIDDEN]."""
    torch.manual_seed(0)
    mom = wrap(init='random', backend='torch', balance_loss_weight=0.01)
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    return mom, torch.randn(2, 9, HIDDEN)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        mom, x = _layer_and_batch()
        model = DistributedDataParallel(mom)
        mask = torch.full((2, 9), int(rank == 0))  # rank 1: every token is padding
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for _ in range(2):  # the second step checks the buckets DDP rebuilt after the first
                model.zero_grad()
                model(x, attention_mask=mask)[0].square().mean().backward()
        torch.save({'grads': {n: p.grad for n, p in mom.named_parameters()},
                    'warnings': [str(w.message) for w in caught]}, os.path.join(out_dir, f'{rank}.pt'))
        # no gloo work may be in flight when DDP's reducer and the group are destroyed: torch's teardown can
        # deadlock there (the gloo thread waits for the GIL that the destructor holds; seen once in CI)
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()


def test_ddp_with_an_all_padding_rank_matches_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(_worker, args=(os.path.join(tmp, 'init'), tmp), nprocs=WORLD, join=False,
                                   start_method='spawn')
        files = [os.path.join(tmp, f'{r}.pt') for r in range(WORLD)]
        deadline = time.monotonic() + 300
        while not procs.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                # every rank wrote its results: a hang in torch's process-group teardown is not ours to wait on
                for p in procs.processes:
                    p.kill()
                assert all(os.path.exists(f) for f in files), "a DDP worker hung before writing its results"
                break
        results = [torch.load(f) for f in files]
    mom, x = _layer_and_batch()
    mom(x)[0].square().mean().backward()
    for r, res in enumerate(results):
        assert not [w for w in res['warnings'] if 'stride' in w], res['warnings']
        for name, p in mom.named_parameters():
            # DDP averages: rank 0's gradient and rank 1's zeros
            close(res['grads'][name], p.grad / WORLD, tol=1e-5)
