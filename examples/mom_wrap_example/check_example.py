"""The example package end to end, as its user would run it once it is installed
(``pip install -e examples/mom_wrap_example``): one line per step, exit status 1 on any failure.

1. installed: the package and its ``mom_wrap.adapters`` and ``mom_wrap.models`` entry points;
2. entry point: a fresh process that imports only mom_wrap finds the adapter (``mom_wrap.supported_hosts()``, which
   loads the entry points) and, with it, the model family;
3. wrap: ``MixtureOfMemories(ToyGatedAttention(...), init='preserve')`` equals the layer; a backward reaches every
   parameter;
4. convert: ``mom_wrap.convert`` of a ``ToyForCausalLM`` with ``init='preserve'`` keeps its logits;
5. train and save: a few optimizer steps (the memories and routers move away from the layer), ``save_pretrained``;
6. load after ``import mom_wrap`` and ``import mom_example``, in a fresh process: the same logits;
7. load after ``import mom_wrap`` alone, in a fresh process (the ``mom_wrap.models`` entry point: the checkpoint's
   config imports mom_example): the same logits.

Runs on the CPU (mom_wrap's torch backend; the layer itself is plain PyTorch):
    python examples/mom_wrap_example/check_example.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HOST = 'mom_example.layer.ToyGatedAttention'
TOL = 1e-4  # fp32, relative: max |got - want| / max(max |want|, 1), as mom_wrap's parity suite


def rel_err(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()

# What a fresh process runs to load the converted model: IMPORTS, then from_pretrained; prints a JSON line
LOAD = textwrap.dedent('''
    import json, sys
    import torch
    import mom_wrap
    {imports}
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    expected = torch.load(path + '/expected.pt')
    with torch.no_grad():
        logits = model.eval()(expected['ids']).logits
    layers = [m for m in model.modules() if isinstance(m, mom_wrap.MixtureOfMemories)]
    print(json.dumps({{'class': type(model).__name__, 'loading_info': {{k: list(map(str, v)) for k, v in info.items()}},
                      'layers': [type(m.host).__name__ for m in layers],
                      'max_diff': (logits - expected['logits']).abs().max().item()}}))
''')


def fresh_process(code: str, *args: str) -> str:
    """Run ``code`` in a fresh Python (this one's interpreter, from a temporary directory: only installed packages
    import) and return its last line of stdout; raise with its stderr's tail if it fails."""
    with tempfile.TemporaryDirectory() as cwd:
        run = subprocess.run([sys.executable, '-c', code, *args], cwd=cwd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the fresh process failed (exit {run.returncode}): ...{run.stderr[-1500:]}")
    return run.stdout.strip().splitlines()[-1]


def installed() -> str:
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution('mom-wrap-example')
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("mom-wrap-example is not installed: pip install -e examples/mom_wrap_example") from None
    points = {ep.group: ep for ep in dist.entry_points}
    want = {'mom_wrap.adapters': 'mom_example.adapters', 'mom_wrap.models': 'mom_example.model:ToyConfig'}
    if {group: ep.value for group, ep in points.items()} != want:
        raise RuntimeError(f"expected the entry points {want}, got {points}")
    return f"mom-wrap-example {dist.version}, entry points " + ', '.join(f"{g}: {ep.name} = {ep.value}"
                                                                        for g, ep in points.items())


def entry_point() -> str:
    found = json.loads(fresh_process(textwrap.dedent('''
        import json, sys
        import mom_wrap
        before = 'mom_example' in sys.modules
        hosts = mom_wrap.supported_hosts()  # the first lookup of an adapter: the entry points load
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        print(json.dumps({'imported_at_import': before, 'hosts': hosts, 'family': 'mom_toy_gated' in CONFIG_MAPPING}))
    ''')))
    if found['imported_at_import']:
        raise RuntimeError("import mom_wrap imported mom_example (entry points should load on the first lookup)")
    if HOST not in found['hosts'] or not found['family']:
        raise RuntimeError(f"after mom_wrap.supported_hosts(): hosts {found['hosts']}, 'mom_toy_gated' "
                           f"registered: {found['family']}")
    return f"import mom_wrap + supported_hosts() lists {HOST}; 'mom_toy_gated' registered with AutoConfig"


def wrap() -> str:
    import torch

    from mom_example.layer import ToyGatedAttention
    from mom_wrap import MixtureOfMemories
    torch.manual_seed(0)
    layer = ToyGatedAttention(hidden_size=64, num_heads=2, layer_idx=0).eval()
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        want = layer(x)[0]
        mom = MixtureOfMemories(layer, num_memories=4, topk=2, shared_memory=True, init='preserve').eval()
        diff = rel_err(mom(x)[0], want)
    if not diff <= TOL:
        raise RuntimeError(f"init='preserve' differs from the layer by {diff:.2e} (relative)")
    mom.train()
    mom(x.requires_grad_())[0].square().mean().backward()
    missing = [n for n, p in mom.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    if missing:
        raise RuntimeError(f"no (finite) gradient for {missing}")
    return f"MixtureOfMemories(ToyGatedAttention, 4 memories, top-2 + shared, init='preserve') = the layer " \
           f"(rel. err {diff:.1e}); backward reaches all {sum(1 for _ in mom.parameters())} parameter tensors"


def convert(state: dict) -> str:
    import torch

    import mom_wrap
    from mom_example.model import ToyConfig, ToyForCausalLM
    torch.manual_seed(0)
    model = ToyForCausalLM(ToyConfig(num_hidden_layers=3)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        mom_wrap.convert(model, num_memories=4, topk=2, shared_memory=True, init='preserve')
        diff = rel_err(model(ids).logits, want)
    layers = [m for m in model.modules() if isinstance(m, mom_wrap.MixtureOfMemories)]
    if len(layers) != 3 or not diff <= TOL:
        raise RuntimeError(f"{len(layers)} of 3 layers converted; logits differ by {diff:.2e} (relative)")
    state.update(model=model, ids=ids)
    return f"ToyForCausalLM: {len(layers)} layers converted, init='preserve' keeps the logits (rel. err {diff:.1e})"


def train_and_save(state: dict, path: str) -> str:
    import torch
    model, ids = state['model'], state['ids']
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(path)
    torch.save({'ids': ids, 'logits': logits}, os.path.join(path, 'expected.pt'))
    model_type = json.loads(Path(path, 'config.json').read_text())['model_type']
    return f"5 AdamW steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}), saved with model_type {model_type!r}"


def load(path: str, imports: str) -> str:
    got = json.loads(fresh_process(LOAD.format(imports=imports), path))
    if got['class'] != 'MomToyForCausalLM' or got['layers'] != ['ToyGatedAttention'] * 3:
        raise RuntimeError(f"loaded {got['class']} with MoM layers of {got['layers']}")
    if any(got['loading_info'].values()):
        raise RuntimeError(f"loading info: {got['loading_info']}")
    if not got['max_diff'] <= 1e-6:
        raise RuntimeError(f"the loaded model's logits differ by {got['max_diff']:.2e}")
    return f"{got['class']}, 3 MoM layers, nothing missing or unexpected, same logits (max |diff| " \
           f"{got['max_diff']:.1e})"


def main() -> int:
    # this script's folder holds mom_example too: take it off the path, so that only the installed package imports
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
    state: dict = {}
    with tempfile.TemporaryDirectory() as path:
        steps = [('installed', installed),
                 ('entry point', entry_point),
                 ('wrap', wrap),
                 ('convert', lambda: convert(state)),
                 ('train and save', lambda: train_and_save(state, path)),
                 ('load after import mom_example', lambda: load(path, 'import mom_example')),
                 ('load after import mom_wrap alone', lambda: load(path, 'pass'))]
        passed = 0
        for i, (name, step) in enumerate(steps, 1):
            try:
                detail = step()
            except Exception as e:  # noqa: BLE001 (every failure is reported, then the run stops)
                print(f"FAIL {i}/{len(steps)} {name}: {type(e).__name__}: {e} (the steps after it not run)", flush=True)
                break
            passed += 1
            print(f"ok   {i}/{len(steps)} {name}: {detail}", flush=True)
    failed = len(steps) - passed
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
