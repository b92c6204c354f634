"""Forward+backward time and peak memory: a host layer vs its MixtureOfMemories wrapper (vs fla MomAttention
for GatedDeltaNet).

The paper's 340M layer size (hidden 1024, 4 heads; GatedDeltaNet: 4 x 256, expand_v 1; the other hosts
their default head sizes), M=4, top-2, shared memory, bf16, all layers measured in one run on one GPU;
ratios are against the plain host layer. Each time is the median of --repeats (5) repetitions of --iters steps in
which the layers take turns (host, ours, ..., host, ours, ...): one process's times swing with the GPU's clocks and
the host's load, and taking turns exposes every layer to the same swing. --prefill times a forward without autograd
(eval mode) instead of a training step.

    python benchmarks/bench_layer.py [--host GatedDeltaNet|GatedLinearAttention|DeltaNet|RWKV6Attention|
                                             RWKV7Attention|Mamba2|LinearAttention|GatedSlotAttention|
                                             HGRN2Attention|MultiScaleRetention|KimiDeltaAttention|
                                             fla.Mamba2|Mamba3|fla.Mamba3]
                                     [--batch 8 --seq-len 2048 --iters 20 --repeats 5] [--prefill]
                                     [--profile] [--memory]
                                     [--json rows.json]

Sequence-length sweep (time and peak memory vs length; --plot needs matplotlib: pip install "mom_wrap[plot]"):

    python benchmarks/bench_layer.py --plot seq_len.png [--seq-lens 2048 8192 16384 65536] [--tokens 65536]
                                     [--json rows.json]

Every point of a sweep has the same number of tokens, B = tokens // T (at least 1; --tokens 0 for B = 1 at
every length): a layer whose cost is linear in length draws flat lines. A case that runs out of memory (or
fails) is recorded as missing and the sweep goes on. ``benchmarks/plot.py rows.json -o seq_len.png`` draws
the same plot from the JSON, without a GPU.

Beside each measured time the table prints the layer's floor on the card (``benchmarks/floor.py``: max(FLOPs / peak
FLOP/s, bytes / peak bandwidth) of the host's projections and recurrence over its slots, (topk + shared) x N for
MoM, counted from the layers' shapes) and how far the time is from it; the rows get floor_ms, floor_flops,
floor_bytes, floor_card and floor_bound. On a card floor.py has no peaks for (anything but an H100 SXM or an H200)
there is no floor, and the table says so. ``--no-floor`` leaves it out.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics

import torch
import floor
from record import Recorder, plot_seq_len, require_matplotlib, write_rows  # benchmarks/ is the script's directory

from mom_wrap import MixtureOfMemories


HEAD_DIM_HOSTS = ('GatedDeltaNet', 'KimiDeltaAttention')  # the hosts built with --head-dim


def host_factory(host, hidden, heads, head_dim):
    """A function making the plain host layer (layer_idx 0)."""
    if host == 'Mamba2':  # mamba-ssm's defaults at this width: 32 heads x 64, d_state 128 (no fused path:
        # it needs the causal-conv1d CUDA package, and the wrapper computes the layer itself either way)
        from mamba_ssm.modules.mamba2 import Mamba2
        return lambda: Mamba2(d_model=hidden, layer_idx=0, use_mem_eff_path=False)
    if host == 'Mamba3':  # mamba-ssm's defaults at this width (SISO): 32 heads x 64, d_state 128, 32 rotary angles
        from mamba_ssm.modules.mamba3 import Mamba3
        return lambda: Mamba3(d_model=hidden, layer_idx=0)
    if host == 'fla.Mamba3':  # fla's port (SISO), its defaults at this width: 32 heads x 64, state 128
        from fla.layers.mamba3 import Mamba3 as FlaMamba3
        return lambda: FlaMamba3(hidden_size=hidden, layer_idx=0)
    if host == 'fla.Mamba2':  # fla's port, its defaults at this width: 32 heads x 64, state 128
        from fla.layers.mamba2 import Mamba2
        return lambda: Mamba2(hidden_size=hidden, num_heads=2 * hidden // 64, head_dim=64, layer_idx=0)
    import fla.layers as L
    if host == 'RWKV7Attention':  # layer 1 of 2: like most layers of a model, it takes v_first (head_dim 64)
        return lambda: L.RWKV7Attention(hidden_size=hidden, layer_idx=1, num_hidden_layers=2)
    if host in HEAD_DIM_HOSTS:  # the paper's head size (K = V = head_dim)
        return lambda: getattr(L, host)(hidden_size=hidden, head_dim=head_dim, num_heads=heads, expand_v=1,
                                        layer_idx=0)
    if host == 'LinearAttention':  # an elementwise feature map: the default squares the key dim (256 -> 65536)
        return lambda: L.LinearAttention(hidden_size=hidden, num_heads=heads, feature_map='elu', layer_idx=0)
    if host == 'GatedSlotAttention':  # fla's GSAConfig: 64 slots
        return lambda: L.GatedSlotAttention(hidden_size=hidden, num_heads=heads, num_slots=64, layer_idx=0)
    if host == 'HGRN2Attention':  # layer 1: it applies the model's lower bound (host_kwargs)
        return lambda: L.HGRN2Attention(hidden_size=hidden, num_heads=heads, layer_idx=1)
    if host in ('GatedLinearAttention', 'DeltaNet', 'RWKV6Attention', 'MultiScaleRetention'):
        return lambda: getattr(L, host)(hidden_size=hidden, num_heads=heads, layer_idx=0)
    raise SystemExit(f"--host: unknown host {host!r}")


def output(result):
    """The output tensor of a host's return value: fla's layers return a tuple, mamba-ssm's the tensor."""
    return result if isinstance(result, torch.Tensor) else result[0]


def host_kwargs(host, x):
    """The host forward's own arguments besides x: RWKV7's layer 1 takes v_first [B, T, hidden]; HGRN2's layer 1 a
    lower bound [forget_dim] in (0, 1), as fla's model passes it."""
    if host == 'RWKV7Attention':
        return {'v_first': torch.randn_like(x).detach()}
    if host == 'HGRN2Attention':
        return {'lower_bound': torch.rand(x.shape[-1], device=x.device, dtype=x.dtype)}
    return {}


def layers(hidden, heads, head_dim, memories, topk, dtype, host='GatedDeltaNet', parts=(None,), time_parts=(),
           recompute_projections=False):
    """The host, ours (one layer per ``recurrence_parts`` value in ``parts``, None: the default; the first is
    named ``mom_wrap MoM(host)``, the others get `` parts=N``; one per value in ``time_parts`` with the parts
    over time even where the adapter has a backward in groups, `` parts=N time``; with ``recompute_projections``
    one that computes its write projection's output again in the backward instead of keeping it, `` recompute``)
    and, for GatedDeltaNet, fla's MomAttention."""
    make = host_factory(host, hidden, heads, head_dim)
    made = {f'{host} (host)': make()}
    for i, n in enumerate(parts):
        kw = {} if n is None else {'recurrence_parts': n}
        made[f'mom_wrap MoM({host})' + (f' parts={n}' if i else '')] = MixtureOfMemories(
            make(), num_memories=memories, topk=topk, shared_memory=True, **kw)
    for n in time_parts:
        mom = MixtureOfMemories(make(), num_memories=memories, topk=topk, shared_memory=True, recurrence_parts=n)
        mom._adapter.recurrence_in_groups = lambda *a, **k: None  # (mom_wrap.recurrence: then over time)
        made[f'mom_wrap MoM({host}) parts={n} time'] = mom
    if recompute_projections:
        mom = MixtureOfMemories(make(), num_memories=memories, topk=topk, shared_memory=True)
        mom.memories.recompute = True
        made[f'mom_wrap MoM({host}) recompute'] = mom
    if host == 'GatedDeltaNet':
        from fla.layers.mom import MomAttention
        made['fla MomAttention'] = MomAttention(hidden_size=hidden, head_dim=head_dim, num_heads=heads, expand_v=1,
                                                layer_idx=0, num_memories=memories, topk=topk, shared_mem=True)
    made = {name: m.to('cuda', dtype).train() for name, m in made.items()}
    if host == 'fla.Mamba2' and importlib.util.find_spec('causal_conv1d') is None:
        # fla's Mamba2 trains through mamba-ssm's fused mamba_split_conv1d_scan_combined, which calls the causal-conv1d
        # CUDA package; without it only its eval path runs (fla's Triton conv, then mamba_chunk_scan_combined, with
        # gradients): the host is timed on that path, and the run says so
        print(f"{host} (host): timed in eval mode: its training path needs the causal-conv1d package, not installed")
        made[f'{host} (host)'].eval()
    return made


def fwd_bwd(layer, x, dy, **kwargs):
    """One training step of the layer: forward on x (its gradient cleared first), backward of dy."""
    x.grad = None
    output(layer(x, **kwargs)).backward(dy)


def step_of(layer, x, dy, prefill: bool, **kwargs):
    """The timed step: a training step (``fwd_bwd``), or with ``prefill`` a forward without autograd (the layer in
    eval mode: a prompt's prefill)."""
    if not prefill:
        return lambda: fwd_bwd(layer, x, dy, **kwargs)

    def forward():
        with torch.no_grad():
            layer(x, **kwargs)
    return forward


def timed(step, iters):
    """One repetition: mean milliseconds per step over ``iters`` steps and the peak memory above what was allocated
    before them (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**20


def interleaved(steps: dict, iters: int, repeats: int, warmup: int = 3) -> dict:
    """name -> (median ms, peak MiB, every repetition's ms) of each of ``steps`` (name -> a step function):
    ``warmup`` steps each, then ``repeats`` rounds in which the layers take turns (host, ours, ..., host, ours, ...), so
    that every layer sees the same drift of the GPU's clocks and the host's load. A layer that runs out of memory or
    fails gets ``(None, None, status)`` and leaves the rounds."""
    out, live = {}, {}
    for name, step in steps.items():
        try:
            for _ in range(warmup):
                step()
            live[name] = []
        except torch.cuda.OutOfMemoryError:
            out[name] = (None, None, 'oom')
        except Exception as e:  # report it, measure the others
            out[name] = (None, None, f"failed: {type(e).__name__}: {str(e)[:200]}")
        gc.collect()
        torch.cuda.empty_cache()
    peaks = dict.fromkeys(live, 0.0)
    for _ in range(repeats):
        for name in list(live):
            try:
                ms, mem = timed(steps[name], iters)
                live[name].append(ms)
                peaks[name] = max(peaks[name], mem)
            except torch.cuda.OutOfMemoryError:
                out[name] = (None, None, 'oom')
                del live[name]
    for name, times in live.items():
        out[name] = (statistics.median_high(times), peaks[name], times)
    return {name: out[name] for name in steps}


def host_time(layer, x, dy, iters, **kwargs):
    """Median milliseconds of host (CPU) time to issue one fwd+bwd, each step started from an idle GPU (a
    synchronize before it, none after): where the GPU keeps up, the step's wall time is this; the one sync of
    our forward (the plan's counts) waits for the GPU work queued before it, so that is in it too."""
    import time
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fwd_bwd(layer, x, dy, **kwargs)
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e3 * sorted(times)[len(times) // 2]


def profile(layer, x, dy, rows=25, **kwargs):
    """The CUDA kernels of 3 fwd+bwd steps, most time first; then the operators that launched them, by input
    shapes (which tensor an elementwise kernel or a gather works on), by their own CUDA time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            output(layer(x, **kwargs)).backward(dy)
        torch.cuda.synchronize()
    events = prof.key_averages()
    try:  # the kernels alone (the operators' rows would sort among them by their inclusive time)
        from torch.autograd import DeviceType
        from torch.autograd.profiler_util import EventList
        events = EventList([e for e in events if e.device_type == DeviceType.CUDA], use_device='cuda')
    except Exception:  # (profiler internals of another torch version): every row
        pass
    print(events.table(sort_by='cuda_time_total', row_limit=rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by='self_cuda_time_total', row_limit=40,
                                                             max_name_column_width=40, max_shapes_column_width=70))


def memory_report(layer, x, dy, rows=14, **kwargs):
    """Where the peak memory goes: allocated after the forward (what autograd keeps) and the peaks of forward
    and backward, above the inputs; then the tensors saved for the backward (parameters and inputs left out;
    each storage counted once, at its full size), grouped by shape and dtype, largest first."""
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in saved:
            saved[ptr] = (tuple(t.shape), str(t.dtype).replace('torch.', ''), t.untyped_storage().nbytes())
        return t
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = output(layer(x, **kwargs))
    torch.cuda.synchronize()
    kept, peak_fwd = (torch.cuda.memory_allocated() - base) / 2**20, (torch.cuda.max_memory_allocated() - base) / 2**20
    nodes, hooks = _backward_peaks(y, base)
    y.backward(dy)
    for hook in hooks:  # the leaves' AccumulateGrad nodes outlive the graph: x's would reset later peaks
        hook.remove()
    del y
    torch.cuda.synchronize()
    peak = max([peak_fwd] + [p for _, p in nodes])
    groups = {}
    for shape, dtype, nbytes in saved.values():
        count, total = groups.get((shape, dtype), (0, 0))
        groups[(shape, dtype)] = (count + 1, total + nbytes)
    print(f"kept after forward {kept:.0f} MiB, peak forward {peak_fwd:.0f} MiB, peak fwd+bwd {peak:.0f} MiB; "
          f"saved for backward {sum(n for *_, n in saved.values()) / 2**20:.0f} MiB in {len(saved)} storages:")
    for (shape, dtype), (count, total) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"  {str(list(shape)):<28}{dtype:<10}x{count:<4}{total / 2**20:>9.1f} MiB")
    print("backward steps with the highest peaks (MiB above the inputs):")
    for name, mib in sorted(nodes, key=lambda n: -n[1])[:6]:
        print(f"  {name:<50}{mib:>9.0f}")


def _backward_peaks(y, base):
    """Hooks on every node of y's autograd graph: the peak allocated memory (MiB above ``base``) while each
    node's backward runs, [(name, MiB)] filled in by the backward, and the hooks' handles (remove them after)."""
    nodes, seen, todo, peaks = [], set(), [y.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo.extend(f for f, _ in node.next_functions)

    def before(grad_outputs):
        torch.cuda.reset_peak_memory_stats()  # the peak restarts from what is allocated now

    def after(node):
        return lambda grad_inputs, grad_outputs: peaks.append(
            (node.name(), (torch.cuda.max_memory_allocated() - base) / 2**20))
    hooks = []
    for node in nodes:
        hooks += [node.register_prehook(before), node.register_hook(after(node))]
    return peaks, hooks


def role(name):
    """A layer's role in the rows: the plain host, ours, or fla's MomAttention."""
    return 'host' if name.endswith('(host)') else 'mom_wrap' if name.startswith('mom_wrap') else 'fla_mom'


def case_floors(args, batch, seq_len):
    """role -> the floor (``floor.Floor``) of B x T = ``batch`` x ``seq_len`` for this run's layers: the host's, and
    the MoM one that ours and fla's MomAttention (the same memories, routing and slots) share; {} with
    ``--no-floor`` or where it cannot be counted (said why)."""
    if args.no_floor:
        return {}
    try:
        host = floor.build(host_factory(args.host, args.hidden, args.heads, args.head_dim))
        mom = floor.count(host, batch, seq_len, args.memories, args.topk, shared=True)
        return {'host': floor.count(host, batch, seq_len), 'mom_wrap': mom, 'fla_mom': mom}
    except Exception as e:  # the measurements do not depend on it
        print(f"no floor: {type(e).__name__}: {e}")
        return {}


def run_case(made, args, batch, seq_len, rec):
    """Measure every layer on B x T = ``batch`` x ``seq_len``, print the table and record the rows. A layer
    that runs out of memory (or fails) gets a row without numbers; the others are still measured."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    results, repeats, x = {}, {}, None
    try:
        x = torch.randn(batch, seq_len, args.hidden, device='cuda', dtype=dtype, requires_grad=not args.prefill)
        dy = torch.randn_like(x)
        kwargs = host_kwargs(args.host, x)
    except torch.cuda.OutOfMemoryError:
        results = {name: (None, None, 'oom') for name in made}
    if x is not None:
        prefill = args.prefill
        if prefill:
            for layer in made.values():
                layer.eval()
        steps = {name: step_of(layer, x, dy, prefill, **kwargs) for name, layer in made.items()}
        timings = interleaved(steps, args.iters, args.repeats)
        for name, layer in made.items():
            ms, mem, spread = timings[name]
            results[name] = (ms, mem, 'ok' if ms is not None else spread)
            repeats[name] = spread if ms is not None else None
            if ms is None or prefill:
                continue
            try:
                if args.host_time:
                    print(f"{name}: host time to issue fwd+bwd from an idle GPU "
                          f"{host_time(layer, x, dy, args.iters, **kwargs):.2f} ms")
                if args.memory and role(name) != 'host':
                    print(f"\n{name}:")
                    memory_report(layer, x, dy, **kwargs)
                if args.profile and role(name) == 'mom_wrap':
                    profile(layer, x, dy, **kwargs)
            except Exception as e:  # the numbers above stand
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            x.grad = None
            for prm in layer.parameters():
                prm.grad = None
    del x
    gc.collect()
    torch.cuda.empty_cache()

    host_ms, host_mem, _ = results[f'{args.host} (host)']
    mode = 'prefill' if args.prefill else 'fwd+bwd'
    case = {'batch': batch, 'seq_len': seq_len, 'tokens': batch * seq_len, 'mode': mode, 'dtype': 'bf16',
            'hidden': args.hidden, 'heads': args.heads, 'memories': args.memories, 'topk': args.topk,
            'shared_memory': True, 'iters': args.iters, 'repeats': args.repeats, 'interleaved': True}
    if args.host == 'GatedDeltaNet':
        case['head_dim'] = args.head_dim
    ref = {'ms': host_ms, 'peak_mib': host_mem}
    print(f"\n{torch.cuda.get_device_name()}  bf16  B x T = {batch} x {seq_len}  hidden {args.hidden}  "
          f"{args.heads} heads  M={args.memories} top-{args.topk} + shared")
    floors, card = case_floors(args, batch, seq_len), floor.card_for(torch.cuda.get_device_name())
    if floors and card is None:
        print(f"no floor: floor.py has no peaks for {torch.cuda.get_device_name()!r} (it knows "
              f"{', '.join(c.name for c in floor.CARDS.values())}); the rows get its FLOPs and bytes only")
    print(f"{'layer':<36}{mode + ' ms':>12}{'x host':>9}{'peak MiB':>11}{'x host':>9}{'floor ms':>10}{'x floor':>9}"
          f"  (median of {args.repeats} interleaved repetitions of {args.iters} steps)")
    floor_mode = 'fwd' if args.prefill else 'fwd+bwd'
    for name, (ms, mem, status) in results.items():
        row = rec.add(name, role(name), args.host, case, ms, mem, status, ref=ref)
        row['ms_repeats'] = [round(t, 4) for t in repeats[name]] if repeats.get(name) else None
        fl = floors.get(role(name))
        if fl is not None or row['ms_repeats']:  # (the recorder wrote the row already: again with the extras)
            row.update(fl.record(card, floor_mode) if fl is not None else {})
            if rec.path:
                write_rows(rec.path, rec.rows)
        floor_ms = None if fl is None or card is None else row['floor_ms']
        floor_cells = (f"{floor_ms:>10.3f}" if floor_ms is not None else f"{'-':>10}",
                       f"{ms / floor_ms:>9.1f}" if floor_ms and ms is not None else f"{'-':>9}")
        if ms is None:
            print(f"{name:<36}{'-':>12}{'-':>9}{'-':>11}{'-':>9}{floor_cells[0]}{'-':>9}  {status}")
            continue
        cells = [f"{row['ratio']:>9.2f}" if row['ratio'] is not None else f"{'-':>9}",
                 f"{row['peak_ratio']:>9.2f}" if row['peak_ratio'] is not None else f"{'-':>9}"]
        print(f"{name:<36}{ms:>12.2f}{cells[0]}{mem:>11.0f}{cells[1]}{floor_cells[0]}{floor_cells[1]}")
    if floors and card is not None:
        host_fl, mom_fl = floors['host'], floors['mom_wrap']
        print(f"floor: max(FLOPs / {card.flops / 1e12:.0f} TFLOP/s, bytes / {card.bandwidth / 1e12:.2f} TB/s) on "
              f"{card.name}, {floor_mode}; host {host_fl.flops(floor_mode) / 1e9:.0f} GFLOP "
              f"{host_fl.bytes(floor_mode) / 1e9:.2f} GB, MoM {mom_fl.flops(floor_mode) / 1e9:.0f} GFLOP "
              f"{mom_fl.bytes(floor_mode) / 1e9:.2f} GB (benchmarks/floor.py)")
    fla_mom = results.get('fla MomAttention', (None,))[0]
    for name, (ours, _, _) in results.items():
        if role(name) == 'mom_wrap' and ours is not None and fla_mom is not None:
            print(f"{name} vs fla MomAttention: {fla_mom / ours:.2f}x faster")


def layer_args(p: argparse.ArgumentParser) -> None:
    """The layer and case options this benchmark and floor.py share: the paper's layer, M=4 top-2, 8 x 2048."""
    p.add_argument('--host', default='GatedDeltaNet')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--hidden', type=int, default=1024)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--head-dim', type=int, default=256)
    p.add_argument('--memories', type=int, default=4)
    p.add_argument('--topk', type=int, default=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_args(p)
    p.add_argument('--iters', type=int, default=20, help='steps per repetition')
    p.add_argument('--repeats', type=int, default=5,
                   help='repetitions, the layers taking turns (host, ours, ..., host, ours, ...): each number is '
                        'the median (default 5)')
    p.add_argument('--prefill', action='store_true',
                   help='time a forward without autograd (eval mode: a prompt\'s prefill) instead of fwd+bwd')
    p.add_argument('--profile', action='store_true', help='print the CUDA kernel table of the MoM layer')
    p.add_argument('--host-time', action='store_true',
                   help='also print each layer\'s host (CPU) time to issue one fwd+bwd from an idle GPU')
    p.add_argument('--memory', action='store_true',
                   help='print where the peak memory of the MoM layers goes (what autograd saves, by shape)')
    p.add_argument('--recurrence-parts', type=int, nargs='+', metavar='N',
                   help="one MoM layer per value of MixtureOfMemories' recurrence_parts (default: its default)")
    p.add_argument('--time-parts', type=int, nargs='+', metavar='N', default=(),
                   help="one MoM layer per value with recurrence_parts=N over time (not the adapter's backward in "
                        "groups of segments)")
    p.add_argument('--recompute-projections', action='store_true',
                   help='one more MoM layer that computes its write projection\'s output again in the backward '
                        'instead of keeping it (MemoryBank.recompute): what that saves and costs')
    p.add_argument('--json', metavar='PATH', help='write the rows as JSON (rewritten after every row)')
    p.add_argument('--no-floor', action='store_true',
                   help='leave out the floor (benchmarks/floor.py) beside each time')
    p.add_argument('--seq-lens', type=int, nargs='+', metavar='T',
                   help='sweep these lengths at --tokens tokens each (default with --plot: 2048 8192 16384 65536)')
    p.add_argument('--tokens', type=int, default=65536,
                   help='tokens per point of a sweep: B = tokens // T, at least 1 (default 65536)')
    p.add_argument('--plot', metavar='PNG', help='sweep the lengths and plot time and peak memory against them')
    args = p.parse_args()
    if args.plot:
        require_matplotlib()  # before any GPU time is spent
        args.seq_lens = args.seq_lens or [2048, 8192, 16384, 65536]
    if not torch.cuda.is_available():
        raise SystemExit('bench_layer.py needs a CUDA GPU')

    torch.manual_seed(0)
    rec = Recorder(args.json, 'bench_layer')
    made = layers(args.hidden, args.heads, args.head_dim, args.memories, args.topk, torch.bfloat16, args.host,
                  args.recurrence_parts or (None,), args.time_parts, args.recompute_projections)
    cases = ([(max(1, args.tokens // T), T) for T in args.seq_lens] if args.seq_lens
             else [(args.batch, args.seq_len)])
    for batch, seq_len in cases:
        run_case(made, args, batch, seq_len, rec)
    if args.plot:
        print(plot_seq_len(rec.rows, args.plot))
    if args.json:
        print(args.json)


if __name__ == '__main__':
    main()
