"""Wrap one fla GatedDeltaNet layer as a Mixture-of-Memories layer, train it a few steps, generate with a cache.

Runs on the CPU (torch backend) or a CUDA GPU (fla's Triton kernels):  python examples/wrap_one_layer.py
"""
import copy

import torch
from fla.layers import GatedDeltaNet
from fla.models.utils import Cache

from mom_wrap import MixtureOfMemories, load_balancing_loss


def main():
    torch.manual_seed(0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    host = GatedDeltaNet(hidden_size=128, head_dim=32, num_heads=2, expand_v=1, layer_idx=0).to(device)
    plain = copy.deepcopy(host)

    # one line: 4 memories, each token written to its top-2, plus a shared memory that sees every token;
    # the router's load-balancing loss (weight 0.01) comes with the backward of the layer's output
    mom = MixtureOfMemories(host, num_memories=4, topk=2, shared_memory=True, init='copy', balance_loss_weight=0.01)
    print(mom)

    if device == 'cuda':  # fla's own layer needs its GPU kernels; on the CPU the tests check this instead
        # init='copy' with a single memory reproduces the host layer
        x = torch.randn(2, 32, 128, device=device)
        one = MixtureOfMemories(copy.deepcopy(plain), num_memories=1, topk=1, shared_memory=False)
        with torch.no_grad():
            diff = (one(x)[0] - plain(x)[0]).abs().max().item()
        print(f"M=1 wrapper vs plain GatedDeltaNet: max |diff| = {diff:.2e}")

    # fit one fixed batch: the router, every memory and the host's read side learn together
    x = torch.randn(4, 48, 128, device=device)
    target = torch.randn(4, 48, 128, device=device)
    opt = torch.optim.AdamW(mom.parameters(), lr=1e-2)
    for step in range(40):
        o, _, _ = mom(x)
        task = (o - target).square().mean()
        opt.zero_grad()
        task.backward()
        opt.step()
        if step % 10 == 9:
            load = torch.bincount(mom.router_logits.topk(2, -1).indices.flatten(), minlength=4).float()
            print(f"step {step + 1:2d}  task loss {task.item():.4f}  balance {load_balancing_loss(mom).item():.3f}  "
                  f"memory load {[round(v, 2) for v in (load / load.sum()).tolist()]}")

    # generate with a cache: prefill 40 tokens, then decode 8 one at a time; equals the full forward
    mom.eval()
    with torch.no_grad():
        full = mom(x)[0]
        cache = Cache()
        steps = [mom(x[:, :40], past_key_values=cache, use_cache=True)[0]]
        for t in range(40, 48):
            steps.append(mom(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
    diff = (torch.cat(steps, 1) - full).abs().max().item()
    print(f"prefill + 8 decode steps vs full forward: max |diff| = {diff:.2e}, "
          f"cache holds {cache.get_seq_length(0)} tokens")


if __name__ == '__main__':
    main()
