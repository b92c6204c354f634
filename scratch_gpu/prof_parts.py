import sys, time, torch
sys.path.insert(0, 'benchmarks')
from bench_layer import layers, output
from torch.profiler import profile, ProfilerActivity
B, T = int(sys.argv[1]), int(sys.argv[2])
made = layers(1024, 4, 256, 4, 2, torch.bfloat16, parts=(1, 2, 3))
torch.manual_seed(0)
x = torch.randn(B, T, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn_like(x)
for name, layer in made.items():
    if 'MoM' not in name: continue
    def step():
        x.grad = None
        output(layer(x)).backward(dy)
    for _ in range(3): step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10): step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3): step()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    tot = sum(e.self_device_time_total for e in ev) / 3e3
    print(f"\n== {name}: wall {wall:.2f} ms/iter, GPU kernel time {tot:.2f} ms/iter")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total/3e3:7.3f} ms  x{e.count//3:<3d} {e.key[:90]}")
    cpu = sorted([e for e in prof.key_averages() if e.device_type != torch.autograd.DeviceType.CUDA], key=lambda e: -e.cpu_time_total)[:8]
    for e in cpu:
        print(f"  cpu {e.cpu_time_total/3e3:7.3f} ms  x{e.count//3:<3d} {e.key[:80]}")
