"""PyTorch's distributed engines on the CPU: 2 gloo processes, spawned once for every check of this file.

DistributedDataParallel (without ``find_unused_parameters``), for every supported host (its ``example_host``,
M=4 top-2 + shared memory, torch backend): one DDP model, three steps (the later ones on the buckets DDP
rebuilt after the first):

1. memory 0 gets no token on rank 1 (the router is blind to one input direction, except memory 0's logit,
   which falls along it; rank 1's inputs lie far along it) and tokens on rank 0; no balancing loss: the
   gradients equal those of one single-process forward and backward over the concatenation of both ranks'
   batches, with the mean over all of it as the loss (the mean of the ranks' mean losses, as DDP averages);
2. the same with the balancing loss, which each forward attaches with its weight as it is (``mom_wrap.losses``):
   the single-process run takes the ranks' batches as two micro-batches at half the weight;
3. (hosts that take an attention mask) every token of rank 1 is padding: rank 0's gradients over 2.

DDP needs every parameter's gradient on every rank and step, and warns ("Grad strides do not match bucket view
strides", once per process) when a gradient's strides differ from its parameter's: the warning must not come,
and every gradient must have its parameter's strides (which names the parameter and the host).

FSDP2 (``fully_shard`` on each decoder layer, then on the model) of a converted 2-layer GatedDeltaNetForCausalLM
(fla's fused norms and MLP under Triton's interpreter; left padding on each rank): its losses over AdamW steps
equal the unsharded single-process run's (micro-batches as in 2); a sharded checkpoint of model and optimizer
(``torch.distributed.checkpoint`` with ``get_state_dict`` / ``set_state_dict``) saved after step FIRST and
loaded into a fresh sharded model and optimizer repeats the following steps with the same losses, bit for bit.

The workers run as on a CPU-only machine whatever this one has (Triton's interpreter, no CUDA device, one thread
each). The single-process references run in them too, after the distributed work (rank 1 the DDP ones, rank 0
FSDP2's), so that both cores work; each part is caught on its own, so that one failing leaves the others'
results (the ranks fail alike: same code, same data).
"""
import datetime
import os
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORKER_ENV = {'TRITON_INTERPRET': '1', 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'MOM_WRAP_TEST_WORKER': '1'}
if os.environ.get('MOM_WRAP_TEST_WORKER') == '1':  # a spawned worker (_worker) importing this module: before
    from mom_wrap import interpret_on_cpu  # fla and mamba-ssm are imported (HOSTS below), as tests/conftest.py
    interpret_on_cpu()  # does (the autotuner's first config; mamba-ssm without its CUDA extensions)
    if os.environ.get('MOM_WRAP_PERTURB_ROUTING', '0') != '0':  # tests/conftest.py's opt-in tool, here too
        from tests.routing_perturbation import install
        install()

from tests import hosts  # noqa: E402  (after the worker's interpreter setup: it imports fla)

WORLD = 2
ROWS, T = 2, 9  # DDP: rows per rank, tokens
BALANCE = 0.1
STARVED = 0  # the memory that gets no token on rank 1
STRIDE_WARNING = 'Grad strides do not match bucket view strides'
FSDP_ROWS, FSDP_T, FIRST, MORE = 2, 16, 2, 2  # FSDP2: rows per rank, tokens, steps before the checkpoint, after


def _adapters():
    """tests/hosts.py's names (fla's Mamba2 beside mamba-ssm's: 'fla.Mamba2') of the installed hosts."""
    return {name: a for name, a in hosts.ADAPTERS.items() if a.load_host_class() is not None}


HOSTS = list(_adapters())


def _takes_mask(host: str) -> bool:
    return _adapters()[host].convention.padding_mask  # (not mamba-ssm's Mamba2)


# DDP --------------------------------------------------------------------------------------------------------

def _layer_and_batch(host: str):
    """The host's example layer wrapped (seeded: the same in every process), its router set so that memory
    STARVED gets no token of rank 1's rows, and the global batch x [WORLD * ROWS, T, hidden] (rank r's rows:
    r * ROWS ...)."""
    from mom_wrap import MixtureOfMemories
    torch.manual_seed(0)
    mom = MixtureOfMemories(_adapters()[host].example_host(), num_memories=4, topk=2, init='random',
                            backend='torch', balance_loss_weight=0.0)
    u = torch.nn.functional.normalize(torch.randn(mom.hidden_size), dim=0)
    with torch.no_grad():
        w = torch.randn(4, mom.hidden_size) * 0.1
        w -= (w @ u)[:, None] * u  # every logit blind to u ...
        w[STARVED] -= 3 * u  # ... but memory STARVED's
        mom.router.weight.copy_(w)
    x = torch.randn(WORLD * ROWS, T, mom.hidden_size)
    x[ROWS:] += 4 * u  # rank 1: memory STARVED's logit about -12, the others' about N(0, 0.8)
    return mom, x


def _output(module, host: str, x, mask=None):
    """The layer's output tensor (fla's layers return a tuple, mamba-ssm's the tensor)."""
    kwargs = dict(_adapters()[host].example_inputs(x))
    if mask is not None:
        kwargs['attention_mask'] = mask
    out = module(x, **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _steps(host: str, rank: int):
    """This rank's attention mask (or None) and the balancing weight of each DDP step."""
    steps = [(None, 0.0), (None, BALANCE)]
    if _takes_mask(host):
        steps.append((torch.full((ROWS, T), int(rank == 0)), BALANCE))
    return steps


def _ddp(host: str, rank: int) -> dict:
    """The host's DDP steps on this rank: gradients, tokens per memory (valid ones), stride mismatches."""
    from torch.nn.parallel import DistributedDataParallel
    mom, x = _layer_and_batch(host)
    model = DistributedDataParallel(mom)
    mine = x[rank * ROWS:(rank + 1) * ROWS]
    out = {'grads': [], 'tokens': [], 'strides': []}
    for mask, weight in _steps(host, rank):
        mom.balance_loss_weight = weight
        model.zero_grad()
        o = _output(model, host, mine, mask)
        chosen = mom.router_logits.topk(mom.topk, dim=-1).indices  # the routed memories (softmax keeps order)
        if mask is not None:
            chosen = chosen[mask.bool()]
        out['tokens'].append(torch.bincount(chosen.reshape(-1), minlength=mom.num_memories))
        o.square().mean().backward()
        out['grads'].append({n: p.grad.clone() for n, p in mom.named_parameters()})
        out['strides'].append([n for n, p in mom.named_parameters() if p.grad.stride() != p.stride()])
    # no gloo work may be in flight when DDP's reducer and the group are destroyed: torch's teardown can
    # deadlock there (the gloo thread waits for the GIL that the destructor holds; seen once in CI)
    dist.barrier()
    del model
    return out


def _ddp_reference(host: str) -> list[dict]:
    """The single-process gradients of each DDP step (see the module docstring)."""
    from mom_wrap import set_balance_loss_weight
    mom, x = _layer_and_batch(host)
    refs = []
    _output(mom, host, x).square().mean().backward()  # 1: the concatenation, one forward
    refs.append({n: p.grad.clone() for n, p in mom.named_parameters()})
    mom.zero_grad()
    set_balance_loss_weight(mom, BALANCE / WORLD)  # 2: the ranks' batches as micro-batches
    (sum(_output(mom, host, part).square().mean() for part in x.split(ROWS)) / WORLD).backward()
    refs.append({n: p.grad.clone() for n, p in mom.named_parameters()})
    if _takes_mask(host):  # 3: rank 0's batch alone, over the world size
        mom.zero_grad()
        set_balance_loss_weight(mom, BALANCE)
        _output(mom, host, x[:ROWS], torch.ones(ROWS, T, dtype=torch.long)).square().mean().backward()
        refs.append({n: p.grad / WORLD for n, p in mom.named_parameters()})
    return refs


# FSDP2 ------------------------------------------------------------------------------------------------------

def _fsdp_model():
    """A converted 2-layer GatedDeltaNetForCausalLM (hidden 64, vocab 64), the same in every process."""
    import fla.models as models

    import mom_wrap
    config = models.GatedDeltaNetConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=2,
                                        head_dim=16, expand_v=1, intermediate_size=128, fuse_cross_entropy=False)
    torch.manual_seed(0)
    model = models.GatedDeltaNetForCausalLM(config)
    mom_wrap.convert(model, num_memories=4, topk=2, init='random', balance_loss_weight=BALANCE)
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.attn.router.weight, std=0.3)
    return model.train()


def _fsdp_batch():
    """The global batch of every step: ids [WORLD * FSDP_ROWS, FSDP_T], attention mask (each rank's second row
    left-padded) and labels (-100 on padding). The same every step, so that the steps visibly train."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (WORLD * FSDP_ROWS, FSDP_T), generator=g)
    mask = torch.ones_like(ids)
    mask[1::FSDP_ROWS, :5] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _loss(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_train(model, opt, steps, rank):
    """Steps on this rank's rows; the mean of the ranks' losses per step."""
    rows = slice(rank * FSDP_ROWS, (rank + 1) * FSDP_ROWS)
    mine = [t[rows] for t in _fsdp_batch()]
    losses = []
    for _ in range(steps):
        loss = _loss(model, *mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
    return losses


def _fsdp(rank: int, checkpoint: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    model = _shard(_fsdp_model())
    sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters()
                  if p.shape[0] >= WORLD)
    opt = _optimizer(model)
    losses = _fsdp_train(model, opt, FIRST, rank)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({'model': model_state, 'optim': optim_state}, checkpoint_id=checkpoint)
    losses += _fsdp_train(model, opt, MORE, rank)

    fresh = _shard(_fsdp_model())
    fresh_opt = _optimizer(fresh)
    rows = slice(rank * FSDP_ROWS, (rank + 1) * FSDP_ROWS)
    with torch.no_grad():  # what step FIRST + 1 would see without the checkpoint
        unloaded = _loss(fresh, *[t[rows] for t in _fsdp_batch()])
    dist.all_reduce(unloaded)
    model_state, optim_state = get_state_dict(fresh, fresh_opt)
    state = {'model': model_state, 'optim': optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_opt, model_state_dict=state['model'], optim_state_dict=state['optim'])
    resumed = _fsdp_train(fresh, fresh_opt, MORE, rank)
    return {'losses': losses, 'resumed': resumed, 'unloaded': unloaded.item() / WORLD, 'sharded': sharded}


def _fsdp_reference() -> dict:
    """The unsharded model in one process, the ranks' rows as micro-batches: {'losses': per step}."""
    from mom_wrap import set_balance_loss_weight
    model = _fsdp_model()
    set_balance_loss_weight(model, BALANCE / WORLD)
    opt = _optimizer(model)
    losses = []
    ids, mask, labels = _fsdp_batch()
    for _ in range(FIRST + MORE):
        parts = zip(ids.split(FSDP_ROWS), mask.split(FSDP_ROWS), labels.split(FSDP_ROWS))
        loss = sum(_loss(model, *part) for part in parts) / WORLD
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {'losses': losses}


# the workers ------------------------------------------------------------------------------------------------

def _attempt(results: dict, key: str, fn, *args) -> None:
    try:
        results[key] = fn(*args)
    except Exception:
        results[key] = {'error': traceback.format_exc()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore', message='.*Triton is not supported on current platform.*')
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a rank that failed alone: no long hang
    try:
        results = {'ddp': {}, 'ddp_reference': {}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for host in HOSTS:
                _attempt(results['ddp'], host, _ddp, host, rank)
        results['warnings'] = sorted({str(w.message) for w in caught})
        _attempt(results, 'fsdp', _fsdp, rank, os.path.join(out_dir, 'checkpoint'))
        if rank == 0:
            _attempt(results, 'fsdp_reference', _fsdp_reference)
        else:
            for host in HOSTS:
                _attempt(results['ddp_reference'], host, _ddp_reference, host)
        torch.save(results, os.path.join(out_dir, f'{rank}.pt'))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def results():
    """Each rank's results, both ranks' references merged into them (loaded once for every test)."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = {k: os.environ.get(k) for k in WORKER_ENV}
        os.environ.update(WORKER_ENV)  # the environment the workers start with
        try:
            procs = mp.start_processes(_worker, args=(os.path.join(tmp, 'init'), tmp), nprocs=WORLD, join=False,
                                       start_method='spawn')
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        files = [os.path.join(tmp, f'{r}.pt') for r in range(WORLD)]
        deadline = time.monotonic() + 300
        while not procs.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                # every rank wrote its results: a hang in torch's process-group teardown is not ours to wait on
                for p in procs.processes:
                    p.kill()
                assert all(os.path.exists(f) for f in files), "a worker hung before writing its results"
                break
        ranks = [torch.load(f, weights_only=False) for f in files]
    ranks[0]['ddp_reference'] = ranks[1]['ddp_reference']
    ranks[1]['fsdp_reference'] = ranks[0]['fsdp_reference']
    return ranks


def _ok(result) -> dict:
    if 'error' in result:
        pytest.fail(result['error'], pytrace=False)
    return result


def _close(a, b, tol=1e-5, what=''):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max abs err {err:.3e} (ref max {scale:.3e})"


@pytest.mark.parametrize('host', hosts.params())  # the workers ran the installed ones (HOSTS)
def test_ddp_memory_starved_on_one_rank_and_all_padding_rank_match_one_process(results, host):
    refs = _ok(results[1]['ddp_reference'].get(host, {'error': f'no reference for {host}'}))
    for rank, res in enumerate(results):
        got = _ok(res['ddp'].get(host, {'error': f'rank {rank} has no DDP result for {host}'}))
        assert len(got['grads']) == len(refs)
        tokens = got['tokens'][0]  # step 1's valid tokens per memory on this rank
        if rank == 1:
            assert tokens[STARVED] == 0, tokens
        else:
            assert tokens[STARVED] > 0, tokens
        for step, (grads, ref) in enumerate(zip(got['grads'], refs)):
            assert not got['strides'][step], f"rank {rank} step {step + 1}: grad strides differ: {got['strides'][step]}"
            assert grads.keys() == ref.keys()
            for name in ref:
                _close(grads[name], ref[name], what=f"rank {rank} step {step + 1} {name}")


def test_ddp_no_bucket_view_stride_warning(results):
    for res in results:
        assert not [w for w in res['warnings'] if STRIDE_WARNING in w], res['warnings']


def test_fsdp2_per_decoder_layer_matches_the_unsharded_run(results):
    want = _ok(results[0]['fsdp_reference'])['losses']
    for rank, res in enumerate(results):
        got = _ok(res['fsdp'])
        assert got['sharded'], "fully_shard left a parameter whole on this rank"
        assert len(got['losses']) == len(want) == FIRST + MORE
        assert want[-1] < want[0] - 0.1, want  # the steps train
        for step, (a, b) in enumerate(zip(got['losses'], want)):
            assert abs(a - b) <= 1e-5 * abs(b), (rank, step + 1, got['losses'], want)


def test_fsdp2_sharded_checkpoint_resumes_with_identical_losses(results):
    for rank, res in enumerate(results):
        got = _ok(res['fsdp'])
        assert got['resumed'] == got['losses'][FIRST:], (rank, got['resumed'], got['losses'])
        assert got['unloaded'] != got['resumed'][0], "the checkpoint changed nothing"
