"""Retrofit a trained fla model with Mixture-of-Memories: convert, check nothing changed, fine-tune, save,
reload, generate.

    python examples/retrofit_finetune.py [--steps 100] [--pretrain-steps 300] [--out /tmp/mom-retrofit]

The task is synthetic copying: each sequence is a random first half followed by the same tokens again, and
the loss is taken on the second half (recalling what the state holds). On a GPU a small GatedDeltaNet model
is first trained on it (``--pretrain-steps``); on the CPU fla's training kernels do not run (its chunk kernels
need a GPU), so a freshly initialised model stands in for the trained one there and only the converted
model (whose MoM layers take the PyTorch path on the CPU) is trained: under 3 minutes for the 80 default
steps on 2 cores. That shows the workflow, not learning: from a fresh model 80 steps leave the copy loss near
chance (measured 4.19 -> 4.15; ln 64 = 4.16) and nothing recalled. Learning to copy takes the pretraining.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import mom_wrap

CUDA = torch.cuda.is_available()
if not CUDA:
    mom_wrap.interpret_on_cpu()  # fla's model norms and MLP are Triton kernels: the interpreter runs them

import torch.nn.functional as F  # noqa: E402
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from tqdm import trange  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

VOCAB, HALF = 64, 8


def batch(size: int, device) -> torch.Tensor:
    first = torch.randint(1, VOCAB, (size, HALF), device=device)
    return torch.cat([first, first], 1)


def copy_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting the second half (each token from everything before it)."""
    logits = model(ids).logits[:, HALF - 1:-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, HALF:].flatten())


def train(model, steps: int, lr: float, device, desc: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    bar = trange(steps, desc=desc)
    for _ in bar:
        loss = copy_loss(model, batch(16, device))  # MoM layers add their balancing loss in the backward
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f'{loss.item():.3f}', balance=f'{mom_wrap.load_balancing_loss(model) or 0:.3f}')
    model.eval()
    return loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=80, help='fine-tuning steps after the conversion')
    p.add_argument('--pretrain-steps', type=int, default=300, help='training steps before it (GPU only)')
    p.add_argument('--out', default=None, help='where to save the converted model (default: a temp dir)')
    args = p.parse_args()
    device = 'cuda' if CUDA else 'cpu'
    torch.manual_seed(0)

    cfg = GatedDeltaNetConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
                              intermediate_size=128, fuse_cross_entropy=False)
    model = GatedDeltaNetForCausalLM(cfg).to(device)
    if CUDA and args.pretrain_steps:
        train(model, args.pretrain_steps, 3e-3, device, 'pretrain (host model)')

    model.eval()  # (in training mode fla's layers take their chunk kernels, which need a GPU)
    probe = batch(4, device)
    with torch.no_grad():
        before = model(probe).logits
        mom_wrap.convert(model, num_memories=4, topk=2)  # init="preserve": the same function to start with
        after = model(probe).logits
    print(f"converted: {len(model.model.layers)} layers wrapped; logits changed by "
          f"{((after - before).abs().max() / before.abs().max()).item():.1e} (relative)")

    with torch.no_grad():
        start = copy_loss(model, batch(64, device)).item()
    train(model, args.steps, 1e-2, device, "fine-tune (MoM)")
    with torch.no_grad():
        end = copy_loss(model, batch(64, device)).item()
    print(f"copy loss on fresh batches: {start:.3f} -> {end:.3f}")

    out = args.out or tempfile.mkdtemp(prefix='mom-retrofit-')
    model.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    with torch.no_grad():
        same = torch.equal(loaded(probe).logits, model(probe).logits)
    print(f"saved to {out} and reloaded as {type(loaded).__name__}: identical logits: {same}")

    first = batch(1, device)[:, :HALF]
    prompt = torch.cat([first, first[:, :4]], 1)  # the first half and the start of its repetition
    loaded.generation_config.eos_token_id = None  # generate all the tokens asked for
    with torch.no_grad():
        gen = loaded.generate(input_ids=prompt, max_new_tokens=HALF - 4, do_sample=False, pad_token_id=0)
    recalled = (gen[0, prompt.shape[1]:] == first[0, 4:]).float().mean().item()
    print(f"generate(): {recalled:.0%} of the rest of the first half recalled")


if __name__ == '__main__':
    main()
