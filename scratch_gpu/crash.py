"""Which step crashes: python scratch_gpu/crash.py host|mom|compiled [head_dim] [hidden]"""
import sys, torch
from fla.layers import GatedDeltaNet
from mom_wrap import MixtureOfMemories
what = sys.argv[1]; hd = int(sys.argv[2]) if len(sys.argv) > 2 else 16; hidden = int(sys.argv[3]) if len(sys.argv) > 3 else 64
torch.manual_seed(0)
host = GatedDeltaNet(hidden_size=hidden, head_dim=hd, num_heads=2, expand_v=2, layer_idx=0)
layer = host if what == 'host' else MixtureOfMemories(host, num_memories=4, topk=2, init='random')
layer = layer.cuda().to(torch.bfloat16)
if what == 'compiled':
    layer = torch.compile(layer)
x = torch.randn(4, 1024, hidden, device='cuda', dtype=torch.bfloat16, requires_grad=True)
for i in range(2):
    layer(x)[0].backward(torch.randn_like(x))
    torch.cuda.synchronize()
print(what, hd, hidden, 'OK', x.grad.float().norm().item())
