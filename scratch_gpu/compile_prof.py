import time, torch
from torch.profiler import profile, ProfilerActivity
from fla.layers import GatedDeltaNet
from mom_wrap import MixtureOfMemories
torch.manual_seed(0)
mom = MixtureOfMemories(GatedDeltaNet(hidden_size=512, head_dim=256, num_heads=2, expand_v=1, layer_idx=0),
                        num_memories=4, topk=2, init='random').cuda().to(torch.bfloat16)
x = torch.randn(4, 1024, 512, device='cuda', dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn_like(x)
compiled = torch.compile(mom)
def step(layer):
    x.grad = None
    layer(x)[0].backward(dy)
for name, layer in (('eager', mom), ('compiled', compiled), ('eager', mom), ('compiled', compiled)):
    for _ in range(3): step(layer)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20): step(layer)
    torch.cuda.synchronize(); print(name, f"{(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
for name, layer in (('eager', mom), ('compiled', compiled)):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5): step(layer)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / 5e3
    print(f"== {name}: GPU {gpu:.3f} ms/iter")
    for e in sorted([e for e in ev if e.device_type != torch.autograd.DeviceType.CUDA], key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  self cpu {e.self_cpu_time_total/5e3:7.3f} ms x{e.count//5:<4d} {e.key[:90]}")
