"""MixtureOfMemories(mamba-ssm's Mamba3): mamba-ssm 2.3.2's ``mamba_ssm.modules.mamba3.Mamba3`` (SISO) as host, and
what of it and of fla 0.6.0's ``fla.layers.mamba3.Mamba3`` runs on the CPU. The adapter: mom_wrap/adapters/mamba3.py.

Oracles: an independent step reference of the recurrence (``step_reference``, below), held to the host's own chunked
kernel; the real layer (its kernels under the interpreter, see below) over its options, with one memory; the naive
per-memory loop written here from that step reference; the host's own final states after a prefill. The checks every
host passes alike (cached generation, padding, packing, causality, gradients against finite differences):
tests/test_every_host.py.

What runs on the CPU (Triton's interpreter, tests/conftest.py):
* Neither layer's kernels as shipped: mamba-ssm's Triton Mamba3 kernels call PTX ``cos.approx`` / ``sin.approx`` /
  ``tanh.approx`` through ``tl.inline_asm_elementwise``, which the interpreter refuses
  (``test_layer_forward_on_cpu_needs_the_ptx_swap``). ``mom_wrap.interpret_on_cpu`` swaps those four functions
  for Triton's exact ones in the kernel modules, and takes q, k, v, trap and angles to the kernels in their own dtype
  instead of bf16 (the interpreter computes bf16 dots wrongly: ``test_interpreter_bf16_dot_is_wrong``); nothing
  else changed (``mom_wrap.kernels.mamba3_interpreter``). Then the chunked forward runs: batched, varlen (cu_seqlens)
  and with per-sequence initial states (all four), and equals the step reference below in fp32.
* Its backward does not: ``compute_dzdo`` asserts CUDA tensors. Gradients of the kernels: GPU tests only.
* Neither layer's decode: mamba-ssm's ``step`` and fla's need ``mamba3_step_fn`` (CuTe DSL, nvidia-cutlass-dsl +
  quack-kernels; not installed, CUDA only). The Triton rotary step (``apply_rotary_qk_inference_fwd``) runs and
  equals its own ``apply_rotary_qk_inference_reference``.
* fla's layer has no PyTorch path: its ``forward`` raises NotImplementedError off CUDA, and it calls mamba-ssm's
  kernels (without mamba-ssm it has none). Its ``cuda_kernels_forward`` runs on the CPU (the swap) and equals
  mamba-ssm's layer with the same weights.
* Host defects seen: mamba-ssm's ``step`` broadcasts B and C from ngroups to nheads with ``expand``, which fails
  for 1 < ngroups < nheads (fla's step repeats them); mamba-ssm's ``forward`` takes ``seq_idx`` and ignores it.

The adapter's design: each memory keeps its own clock and trapezoid (write side: x, B, dt, A, trap and the angles);
the four states packed into one per segment; on the triton backend ``mamba3_siso_combined`` over every segment with
cu_seqlens and per-segment input states (decode too: the host's own step needs CuTe); on the torch backend
``mamba3_reference``, the trapezoid as one scalar-decay scan. A calling convention of its own
(``mom_wrap.calls.Mamba3Convention``): the host's second positional argument is ``seq_idx``, not ``seqlen``.
"""
import copy
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.mamba_ssm  # skipped without mamba-ssm (tests/conftest.py)
try:
    from mamba_ssm.modules.mamba3 import Mamba3
except ImportError:  # collected all the same, and skipped
    Mamba3 = None

interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1', reason='needs TRITON_INTERPRET=1')


import triton  # noqa: E402  (Triton: a dependency of mamba-ssm's kernels and of mom_wrap's)
import triton.language as tl  # noqa: E402  (visible to the jit function below: module level)


@pytest.fixture
def ptx_approximations(monkeypatch):
    """mamba-ssm's Mamba3 kernels as shipped: the swap that ``mom_wrap.interpret_on_cpu`` (conftest) made undone
    for the test (``mom_wrap.kernels.mamba3_interpreter``)."""
    import importlib

    from mom_wrap.kernels.mamba3_interpreter import ORIGINALS
    for (module, name), original in ORIGINALS.items():
        monkeypatch.setattr(importlib.import_module(module), name, original)


@interpreter
def test_interpreter_bf16_dot_is_wrong():
    """The smallest reproduction of why the layers' bf16 kernels give garbage on the CPU (Triton 3.9's interpreter):
    tl.dot of two bf16 16 x 16 blocks. Fails once the interpreter gets it right: then drop
    ``mom_wrap.kernels.mamba3_interpreter.combined_in_input_dtypes``."""
    @triton.jit
    def dot(X, Y, O, N: tl.constexpr):
        r = tl.arange(0, N)
        tile = r[:, None] * N + r[None, :]
        tl.store(O + tile, tl.dot(tl.load(X + tile), tl.load(Y + tile)))
    x, y, o = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16(), torch.empty(16, 16)
    dot[(1,)](x, y, o, 16)
    assert (o - x.float() @ y.float()).abs().max() > 1.0


def rotate(x, theta):
    """x [..., N] with pairs (2i, 2i+1), i < A, rotated by theta [..., A]; the rest as it is."""
    A = theta.shape[-1]
    pairs = x[..., :2 * A].unflatten(-1, (A, 2))
    c, s = theta.cos(), theta.sin()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.cat([torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2), x[..., 2 * A:]], -1)


def step_reference(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D=None, z=None, states=None):
    """The SISO recurrence token by token, in the inputs' precision (the module docstring's equations).

    q, k [B, T, G, N] (before bias and rotation); v [B, T, H, P]; adt, dt, trap [B, H, T] (a * dt, dt, the raw
    trap logit); q_bias, k_bias [H, N]; angles [B, T, H, A] (raw); D [H] or None; z [B, T, H, P] or None;
    states: (theta [B, H, A], S [B, H, P, N], k~ [B, H, N], v [B, H, P]) or None (zeros).
    Returns y [B, T, H, P] and the final (theta, S, k~, v).
    """
    Bn, T, G, N = q.shape
    H, P = v.shape[2:]
    q = q.repeat_interleave(H // G, 2) + q_bias
    k = k.repeat_interleave(H // G, 2) + k_bias
    lam = torch.sigmoid(trap)
    if states is None:
        theta = q.new_zeros(Bn, H, angles.shape[-1])
        S, k_prev, v_prev = q.new_zeros(Bn, H, P, N), q.new_zeros(Bn, H, N), q.new_zeros(Bn, H, P)
    else:
        theta, S, k_prev, v_prev = (s.to(q.dtype) for s in states)
    ys = []
    for t in range(T):
        theta = theta + math.pi * torch.tanh(angles[:, t]) * dt[:, :, t, None]
        qt, kt, vt = rotate(q[:, t], theta), rotate(k[:, t], theta), v[:, t]
        beta = (dt[:, :, t] * (1 - lam[:, :, t]))[..., None, None]
        gamma = (dt[:, :, t] * lam[:, :, t])[..., None, None]
        S = adt[:, :, t].exp()[..., None, None] * (S + beta * v_prev[..., None] * k_prev[..., None, :]) \
            + gamma * vt[..., None] * kt[..., None, :]
        y = torch.einsum('bhpn,bhn->bhp', S, qt)
        if D is not None:
            y = y + D[:, None] * vt
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
        k_prev, v_prev = kt, vt
    return torch.stack(ys, 1), (theta, S, k_prev, v_prev)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def layer_reference(layer, u):
    """mamba-ssm's Mamba3 (SISO) forward from its parameters, through ``step_reference``, in fp32. u [B, T, d_model]."""
    H, P, N, G = layer.nheads, layer.headdim, layer.d_state, layer.num_bc_heads
    z, x, B, C, dd_dt, dd_A, trap, angles = layer.in_proj(u).float().split(
        [layer.d_inner, layer.d_inner, N * G, N * G, H, H, H, layer.num_rope_angles], -1)
    B = rms(B.unflatten(-1, (G, N)), layer.B_norm.weight.float(), layer.B_norm.eps)
    C = rms(C.unflatten(-1, (G, N)), layer.C_norm.weight.float(), layer.C_norm.eps)
    dt = F.softplus(dd_dt + layer.dt_bias).transpose(1, 2)
    adt = (-F.softplus(dd_A)).clamp(max=-layer.A_floor).transpose(1, 2) * dt
    angles = angles[:, :, None].expand(-1, -1, H, -1)
    x, z = x.unflatten(-1, (H, P)), z.unflatten(-1, (H, P))
    gate = None if layer.is_outproj_norm else z
    y, _ = step_reference(C, B, x, adt, dt, trap.transpose(1, 2), layer.C_bias[:, 0], layer.B_bias[:, 0], angles,
                          layer.D, gate)
    y = y.flatten(2)
    if layer.is_outproj_norm:
        n = layer.norm
        y = (rms(y.unflatten(-1, (H, P)), 1.0, n.eps).flatten(2) * n.weight) * F.silu(z.flatten(2))
    return layer.out_proj(y.to(u.dtype))


def kernel_inputs(Bn=2, T=12, G=1, H=2, P=16, N=16, A=4, seed=0):
    """Random inputs of the kernels (``step_reference``'s arguments, without states), fp32."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt = F.softplus(r(Bn, H, T) - 1)
    return dict(q=r(Bn, T, G, N), k=r(Bn, T, G, N), v=r(Bn, T, H, P), adt=-F.softplus(r(Bn, H, T)) * dt, dt=dt,
                trap=r(Bn, H, T), q_bias=r(H, N), k_bias=r(H, N), angles=r(Bn, T, H, A), D=r(H), z=r(Bn, T, H, P))


SHARED, TIME_SECOND = ('q_bias', 'k_bias', 'D'), ('q', 'k', 'v', 'z', 'angles')  # kernel_inputs' layouts


def run_kernel(inp, states=None, cu_seqlens=None, chunk_size=8):
    """mamba-ssm's chunked kernel (its autograd function: the wrapper ``mamba3_siso_combined`` would cast q, k, v, z
    to bf16) on ``kernel_inputs``, with final states: (y, theta, S, k~, v)."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import _Mamba3Function
    i = inp
    return _Mamba3Function.apply(i['q'], i['k'], i['v'], i['adt'], i['dt'], i['trap'], i['q_bias'], i['k_bias'],
                                 i['angles'], i['D'], i['z'], *(states or (None,) * 4), cu_seqlens, chunk_size, True)


def close_states(got, want, tol=2e-5):
    """The four states; the angle compared through cos and sin (the kernels keep it mod 2 pi)."""
    (ta, *rest_a), (tb, *rest_b) = got, want
    for a, b in [(ta.cos(), tb.cos()), (ta.sin(), tb.sin()), *zip(rest_a, rest_b)]:
        close(a.reshape(b.shape), b, tol)


def close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (ref max {scale:.3e})"


@interpreter
def test_layer_forward_on_cpu_needs_the_ptx_swap(ptx_approximations):
    """The smallest reproduction: the real layer's forward on the CPU stops at the PTX inline asm."""
    from triton.runtime.errors import InterpreterError
    layer = Mamba3(d_model=32, d_state=16, headdim=16, chunk_size=16, layer_idx=0)
    with pytest.raises(InterpreterError, match='inline_asm'), torch.no_grad():
        layer(torch.randn(1, 8, 32))


@interpreter
@pytest.mark.parametrize('G,H,A', [(1, 2, 4), (2, 4, 4), (1, 2, 8)], ids=['default', 'groups', 'full_rope'])
def test_host_kernel_equals_step_reference_in_fp32(G, H, A):
    """Two chunks and a ragged end; the four final states too."""
    inp = kernel_inputs(G=G, H=H, A=A)
    y, *states = run_kernel(inp)
    want, want_states = step_reference(**inp)
    close(y, want)
    close_states(states, want_states)


@interpreter
def test_host_kernel_continues_per_sequence_states_and_packed_sequences():
    """Initial states per packed sequence (cu_seqlens): the step reference from the same states, sequence by
    sequence; the reference itself splits exactly (its chunks continue through its states)."""
    inp = kernel_inputs(Bn=2, T=12)
    full, _ = step_reference(**inp)
    cut = lambda d, lo, hi: {n: t if n in SHARED else t[:, lo:hi] if n in TIME_SECOND else t[..., lo:hi]  # noqa: E731
                             for n, t in d.items()}
    first, states = step_reference(**cut(inp, 0, 5))
    second, _ = step_reference(**cut(inp, 5, 12), states=states)
    close(torch.cat([first, second], 1), full)
    # pack row 0's tokens 5..9 and row 1's tokens 5..11 as two sequences, each from its own states
    lengths = (5, 7)
    pieces = [cut({n: t if n in SHARED else t[b:b + 1] for n, t in inp.items()}, 5, 5 + n)
              for b, n in enumerate(lengths)]
    packed = {n: inp[n] if n in SHARED else torch.cat([p[n] for p in pieces], 1 if n in TIME_SECOND else -1)
              .contiguous() for n in inp}
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    y, *final = run_kernel(packed, states=[s.contiguous() for s in states], cu_seqlens=cu)
    for b, n in enumerate(lengths):
        want, want_states = step_reference(**pieces[b], states=[s[b:b + 1] for s in states])
        close(y[:, cu[b]:cu[b + 1]], want)
        close_states([s[b:b + 1] for s in final], want_states)


HOST_VARIANTS = [{}, dict(ngroups=2), dict(is_outproj_norm=True), dict(rope_fraction=1.0), dict(d_state=32)]


def make_host(**kw):
    cfg = dict(d_model=32, d_state=16, headdim=16, chunk_size=16, layer_idx=0)
    cfg.update(kw)
    torch.manual_seed(0)
    host = Mamba3(**cfg)
    with torch.no_grad():  # the parameters that start at a constant: make them count
        for p in (host.D, host.B_bias, host.C_bias, host.B_norm.weight, host.C_norm.weight):
            p.add_(0.3 * torch.randn_like(p))
        if host.is_outproj_norm:
            host.norm.weight.add_(0.3 * torch.randn_like(host.norm.weight))
    return host.eval()


@interpreter
@pytest.mark.parametrize('kw', HOST_VARIANTS, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'default')
def test_real_layer_equals_layer_reference(kw):
    """The real layer (its kernels in fp32 on the CPU: ``mom_wrap.kernels.mamba3_interpreter``) = the reference
    from its parameters."""
    host = make_host(**kw)
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        close(host(u), layer_reference(host, u), tol=1e-4)


@interpreter
def test_fla_layer_runs_mamba_ssm_kernels_and_refuses_the_cpu():
    """fla's layer with mamba-ssm's layer's weights: its kernel path (called past the CUDA check) = mamba-ssm's
    layer; its forward refuses the CPU."""
    from fla.layers.mamba3 import Mamba3 as FlaMamba3
    ref = make_host()
    fla = FlaMamba3(hidden_size=32, state_size=16, head_dim=16, chunk_size=16, layer_idx=0).eval()
    fla.load_state_dict(ref.state_dict())
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        close(fla.cuda_kernels_forward(u)[0], ref(u), tol=1e-5)
        with pytest.raises(NotImplementedError, match='CUDA'):
            fla(u)


@interpreter
def test_decode_steps_need_cuda_and_the_rotary_step_runs():
    """Both layers' decode needs the CuTe step kernel; the Triton rotary step runs and equals its reference."""
    from mamba_ssm.ops.triton.mamba3 import mamba3_mimo_rotary_step as rs
    host = make_host()
    states = host.allocate_inference_cache(2, 4)
    with pytest.raises(AssertionError, match='Cute'), torch.no_grad():
        host.step(torch.randn(2, 32), *states)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 16, generator=g), torch.randn(2, 1, 2, 16, generator=g)
    args = (torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g), torch.rand(2, 2, generator=g))
    bias = (torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, 16, generator=g))
    got = rs.apply_rotary_qk_inference_fwd(q, k, *args, bias_q=bias[0], bias_k=bias[1])
    want = rs.apply_rotary_qk_inference_reference(q, k, *args, bias_q=bias[0], bias_k=bias[1])
    for a, b in zip(got, want):
        close(a, b, 1e-6)


@pytest.mark.gpu
def test_gpu_kernel_gradients_equal_step_reference():
    """On CUDA (PTX approximations as shipped): ``mamba3_siso_combined``, the entry the host layer and the adapter
    call, which casts q, k, v, z, trap and angles to bf16 (its backward keeps its chunk states in bf16 and takes no fp32
    output gradient: ``_Mamba3Function`` on fp32 q, k, v fails to compile there), from initial states: its forward and
    every input's gradient = the fp64 step reference's (autograd) on the same bf16-rounded inputs, to the kernel's
    bf16 states and approximations."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    inp = {n: t.cuda() for n, t in kernel_inputs(T=100, H=4, P=64, N=128, A=32).items()}
    for n in ('q', 'k', 'v', 'z', 'trap', 'angles'):  # what the entry casts: the reference sees the same values
        inp[n] = inp[n].to(torch.bfloat16).float()
    states = [torch.randn(2, 4, 32, device='cuda'), 0.1 * torch.randn(2, 4, 64, 128, device='cuda'),
              torch.randn(2, 4, 128, device='cuda'), torch.randn(2, 4, 64, device='cuda')]
    leaves = {n: t.clone().requires_grad_() for n, t in inp.items()}
    i = leaves
    y = mamba3_siso_combined(i['q'], i['k'], i['v'], i['adt'], i['dt'], i['trap'], i['q_bias'], i['k_bias'],
                             i['angles'], D=i['D'], Z=i['z'], Input_States=tuple(states), chunk_size=64)
    y = y[0] if isinstance(y, tuple) else y
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_leaves = {n: t.double().requires_grad_() for n, t in inp.items()}
    want, _ = step_reference(**ref_leaves, states=[s.double() for s in states])
    want.backward(grad.double())
    close(y.double(), want, 2e-2)
    for n in inp:
        close(leaves[n].grad.double(), ref_leaves[n].grad, 3e-2)


@pytest.mark.gpu
def test_gpu_real_layer_generation_equals_full_forward():
    """On CUDA: mamba-ssm's layer through its InferenceParams (prefill, then its CuTe decode steps) = its full
    forward (bf16 kernels); and the full forward = the fp32 layer reference."""
    from mamba_ssm.utils.generation import InferenceParams
    host = make_host().cuda()
    u = torch.randn(2, 24, 32, device='cuda')
    with torch.no_grad():
        full = host(u)
        close(full, layer_reference(host, u), tol=2e-2)
        if importlib.import_module('mamba_ssm.modules.mamba3').mamba3_step_fn is None:
            pytest.skip("mamba-ssm's Mamba3 decode needs its CuTe step (nvidia-cutlass-dsl, quack-kernels), not "
                        "installed here: only the full forward was checked")
        params = InferenceParams(max_seqlen=24, max_batch_size=2)
        outs = [host(u[:, :16], inference_params=params)]
        params.seqlen_offset += 16
        for t in range(16, 24):
            outs.append(host(u[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
        close(torch.cat(outs, 1), full, tol=2e-2)


# ---- the adapter: one memory against the real layer ---------------------------------------------------------

def copies(host, backend):
    from mom_wrap import MixtureOfMemories
    return MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                             backend=backend).eval()


@interpreter
@pytest.mark.parametrize('kw', HOST_VARIANTS, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'default')
def test_one_memory_equals_real_host(kw):
    """M=1 copies, both backends, = the real layer (its kernels in fp32 on the CPU); and packed sequences
    (cu_seqlens, the host's way to pack)."""
    host = make_host(**kw)
    u = torch.randn(2, 20, 32)
    packed, cu = u[:, :13].reshape(1, 26, 32), torch.tensor([0, 9, 26], dtype=torch.int32)
    with torch.no_grad():
        want, want_packed = host(u), host(packed, cu_seqlens=cu)
        for backend in ('torch', 'triton'):
            mom = copies(host, backend)
            close(mom(u), want, tol=1e-5)
            close(mom(packed, cu_seqlens=cu), want_packed, tol=1e-5)


@interpreter
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_prefill_states_are_the_hosts(backend):
    """A prompt through InferenceParams: the M=1 wrapper's packed states [B, 1, H, P * N + N + P + A] unpack to the
    host's four (its SSM state, last rotated key, last value, angle: the kernel's, mod 2 pi)."""
    from mamba_ssm.utils.generation import InferenceParams

    from mom_wrap.adapters.mamba3 import unpack_states
    host = make_host(ngroups=2)
    u = torch.randn(2, 19, 32)
    with torch.no_grad():
        params = InferenceParams(max_seqlen=32, max_batch_size=2)
        host(u, inference_params=params)
        mom = copies(host, backend)
        mine = InferenceParams(max_seqlen=32, max_batch_size=2)
        mom(u, inference_params=mine)
    angle, ssm, k, v = params.key_value_memory_dict[0]
    packed = mine.key_value_memory_dict[0]['recurrent']
    assert packed.shape == (2, 1, host.nheads, 16 * 16 + 16 + 16 + 4)
    S, k_mine, v_mine, theta = unpack_states(packed[:, 0], 16, 16)
    for a, b in [(S, ssm), (k_mine, k[:, 0]), (v_mine, v), (theta.cos(), angle.cos()), (theta.sin(), angle.sin())]:
        close(a, b, tol=1e-5)


# ---- routed memories against the naive loop -----------------------------------------------------------------

def memory_output(host, w, C):
    """One memory over its tokens: w its write side (name -> [T, out], ``mom_wrap.testing.memory_write``), C [T, G, N]
    the tokens' normed C -> [T, H, P], through ``step_reference`` in fp64."""
    T = C.shape[0]
    H, P, N, G = host.nheads, host.headdim, host.d_state, host.num_bc_heads
    B = rms(w['B'].double().unflatten(-1, (G, N)), host.B_norm.weight.double(), host.B_norm.eps)
    dt = F.softplus(w['dt'].double() + host.dt_bias.double())
    adt = (-F.softplus(w['A'].double())).clamp(max=-host.A_floor) * dt
    angles = w['angles'].double()[:, None].expand(T, H, -1)
    y, _ = step_reference(C[None], B[None], w['x'].double().view(1, T, H, P), adt.T[None], dt.T[None],
                          w['trap'].double().T[None], host.C_bias[:, 0].double(), host.B_bias[:, 0].double(),
                          angles[None], host.D.double())
    return y[0]


def naive_mom(mom, x):
    """MoM over x [B, T, hidden], one batch row and one memory at a time, routing written out; fp64 from the
    projections on."""
    from mom_wrap.testing import memory_write, routed
    host, M = mom.host, mom.num_memories
    H, P, N, G = host.nheads, host.headdim, host.d_state, host.num_bc_heads
    out = []
    for xb in x:
        T = xb.shape[0]
        top_p, top_i = routed(F.linear(xb.float(), mom.router.weight.float()).softmax(-1), mom.topk)
        z, C = F.linear(xb, host.mom_read_proj.weight).double().split([host.d_inner, G * N], -1)
        C = rms(C.unflatten(-1, (G, N)), host.C_norm.weight.double(), host.C_norm.eps)
        o = torch.zeros(T, H, P, dtype=torch.float64)
        for e in range(M + int(mom.shared_memory)):
            if e < M:
                sel = (top_i == e).any(-1).nonzero().squeeze(1)
                weight = (top_p * (top_i == e)).sum(-1)[sel].double()
            else:
                sel, weight = torch.arange(T), torch.ones(T, dtype=torch.float64)
            if sel.numel():
                y = memory_output(host, memory_write(mom, {'x': xb[sel]}, e), C[sel])
                o = o.index_add(0, sel, weight[:, None, None] * y)
        if host.is_outproj_norm:
            y = rms(o, 1.0, host.norm.eps).flatten(1) * host.norm.weight.double() * F.silu(z)
        else:
            y = o.flatten(1) * F.silu(z)
        out.append(F.linear(y.to(x.dtype), host.out_proj.weight))
    return torch.stack(out)


def mom_mamba3(shared=True, **kw):
    from mom_wrap.testing import wrap
    return wrap(make_host(**kw), shared=shared).eval()


@pytest.mark.parametrize('kw,shared', [({}, True), ({}, False), (dict(ngroups=2), True),
                                       (dict(is_outproj_norm=True), True), (dict(rope_fraction=1.0), False)],
                         ids=['default', 'no_shared', 'ngroups2', 'outproj_norm', 'full_rope'])
def test_matches_naive_per_memory_loop(kw, shared):
    mom = mom_mamba3(shared=shared, **kw)
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        close(mom(x), naive_mom(mom, x))


@interpreter
def test_triton_backend_matches_naive_per_memory_loop():
    """The host's kernel over the routed segments (forward: its backward needs CUDA)."""
    mom = mom_mamba3(ngroups=2)
    mom.backend = 'triton'
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        close(mom(x), naive_mom(mom, x))


def test_torch_backend_is_exact_in_fp64():
    mom = mom_mamba3(is_outproj_norm=True, ngroups=2).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        close(mom(x), naive_mom(mom, x), tol=1e-12)


def test_every_parameter_gets_the_naive_loops_gradient():
    from tests.test_layer import assert_gradients_of_naive_loop
    mom = mom_mamba3(is_outproj_norm=True).train()
    x = torch.randn(2, 9, 32)
    assert_gradients_of_naive_loop(mom, lambda m: m(x), lambda m: naive_mom(m, x))


def test_reference_equals_step_reference_over_packed_segments_from_states():
    """``mamba3_reference`` (the trapezoid as one scalar-decay scan) = the step loop, segment by segment, each from
    its own four states, in fp64; its final states the loop's (angle mod 2 pi)."""
    from mom_wrap.adapters.mamba3 import mamba3_reference, pack_states, unpack_states
    inp = {n: t.double() for n, t in kernel_inputs(Bn=2, T=12, G=2, H=4, A=4).items()}
    lengths = (5, 12)
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(2, 4, 4, generator=g), 0.1 * torch.randn(2, 4, 16, 16, generator=g),
              torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)]
    states = [s.double() for s in states]
    rows = lambda t, b, n: t[b, :n] if t.dim() == 4 else t[b, :, :n].T  # noqa: E731  ([T, ...] per slot)
    flat = {n: torch.cat([rows(inp[n], b, lengths[b]) for b in range(2)])
            for n in ('q', 'k', 'v', 'adt', 'dt', 'trap', 'angles')}
    theta, S, k, v = states
    y, final = mamba3_reference(**flat, q_bias=inp['q_bias'], k_bias=inp['k_bias'], D=inp['D'],
                                cu_seqlens=torch.tensor([0, 5, 17]), initial_state=pack_states(S, k, v, theta),
                                output_final_state=True)
    S_f, k_f, v_f, theta_f = unpack_states(final, 16, 16)
    for b, n in enumerate(lengths):
        piece = {name: t[b:b + 1, :n] if name in TIME_SECOND else t if name in SHARED else t[b:b + 1, :, :n]
                 for name, t in inp.items() if name != 'z'}
        want, (w_theta, w_S, w_k, w_v) = step_reference(**piece, states=[s[b:b + 1] for s in states])
        close(y[sum(lengths[:b]):sum(lengths[:b + 1])], want[0], tol=1e-12)
        close_states([theta_f[b:b + 1], S_f[b:b + 1], k_f[b:b + 1], v_f[b:b + 1]], [w_theta, w_S, w_k, w_v], 1e-12)


# ---- the split, the convention and the refusals -------------------------------------------------------------

def test_write_side_moves_out_of_the_host():
    mom = mom_mamba3(ngroups=2)
    names = {n for n, _ in mom.named_parameters()}
    assert not any(n.startswith('host.in_proj') for n in names)
    assert mom.host.mom_read_proj.out_features == 64 + 2 * 16 and mom.host.mom_read_proj.bias is None
    assert mom.memories.names == ['x', 'B', 'dt', 'A', 'trap', 'angles']
    assert mom.memories.out_features == [64, 32, 4, 4, 4, 4] and not mom.memories.conv
    assert mom._adapter.state_shape() == (4, 16 * 16 + 16 + 16 + 4) and mom._adapter.read_conv_shapes() == {}


def test_seq_idx_is_the_second_positional_argument_and_packs():
    """The host's call: ``forward(u, seq_idx, cu_seqlens, inference_params)``. The wrapper packs by seq_idx (the
    host takes and ignores it) as by the cu_seqlens the host packs with."""
    mom = mom_mamba3()
    u = torch.randn(1, 14, 32)
    seq_idx = torch.tensor([[0] * 6 + [1] * 8], dtype=torch.int32)
    with torch.no_grad():
        by_idx = mom(u, seq_idx)
        close(by_idx, mom(u, cu_seqlens=torch.tensor([0, 6, 14], dtype=torch.int32)), tol=1e-6)
        close(by_idx[:, 6:], mom(u[:, 6:]), tol=1e-5)
    with pytest.raises(TypeError, match='seqlen'):
        mom(u, seqlen=14)


def test_mimo_is_refused_by_name():
    from mom_wrap import MixtureOfMemories
    host = make_host()
    host.is_mimo = True  # (a MIMO layer needs TileLang to be made)
    with pytest.raises(ValueError, match='is_mimo'):
        MixtureOfMemories(host, num_memories=2, topk=1)


# ---- fla's Mamba3 (its port of the layer: fla's convention, use_bias, norm_eps) ---------------------------------

def make_fla_host(**kw):
    from mom_wrap.adapters.mamba3_fla import FlaMamba3Adapter
    cfg = dict(hidden_size=32, state_size=16, head_dim=16, chunk_size=16, layer_idx=0)
    cfg.update(kw)
    torch.manual_seed(0)
    host = FlaMamba3Adapter.load_host_class()(**cfg)
    with torch.no_grad():  # the parameters that start at a constant: make them count
        for p in host.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.3 * torch.randn_like(p))
    return host.eval()


@pytest.fixture
def fla_forward_on_cpu(monkeypatch):
    """fla's Mamba3 forward without its refusal of the CPU (and its adapter saying so): its own
    ``cuda_kernels_forward`` (the kernels under the interpreter), packed sequences through cu_seqlens; no padding
    mask, and a cache left as it is (fla's model passes one; the checks that use this compare full forwards only)."""
    from fla.layers.mamba3 import Mamba3 as FlaMamba3

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        assert attention_mask is None
        return self.cuda_kernels_forward(hidden_states, cu_seqlens=cu_seqlens)[0], None, past_key_values
    from mom_wrap.adapters.mamba3_fla import FlaMamba3Adapter
    monkeypatch.setattr(FlaMamba3, 'forward', forward)
    monkeypatch.setattr(FlaMamba3Adapter, 'host_forward_runs_on', classmethod(lambda cls, device: True))


FLA_OPTIONS = [{}, dict(use_bias=True, norm_eps=1e-2), dict(n_groups=2, is_outproj_norm=True, rope_fraction=1.0)]


@interpreter
@pytest.mark.parametrize('kw', FLA_OPTIONS, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'default')
def test_fla_one_memory_equals_real_host(kw):
    """M=1 copies, both backends, = fla's layer (its kernel path, which its forward takes on CUDA), full and packed;
    a prompt's states in fla's Cache = the layer's own (its use_cache path)."""
    from fla.models.utils import Cache

    from mom_wrap import MixtureOfMemories
    from mom_wrap.adapters.mamba3 import unpack_states
    host = make_fla_host(**kw)
    u = torch.randn(2, 20, 32)
    packed, cu = u[:, :13].reshape(1, 26, 32), torch.tensor([0, 9, 26], dtype=torch.int32)
    with torch.no_grad():
        want, (angle, ssm, k, v) = host.cuda_kernels_forward(u, use_cache=True)
        want_packed = host.cuda_kernels_forward(packed, cu_seqlens=cu)[0]
        for backend in ('torch', 'triton'):
            mom = MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, init='copy',
                                    backend=backend).eval()
            cache = Cache()
            close(mom(u, past_key_values=cache, use_cache=True)[0], want, tol=1e-5)
            close(mom(packed, cu_seqlens=cu)[0], want_packed, tol=1e-5)
            S, k_m, v_m, theta = unpack_states(cache[0]['recurrent_state'][:, 0], 16, 16)
            for a, b in [(S, ssm), (k_m, k[:, 0]), (v_m, v), (theta.cos(), angle.cos()), (theta.sin(), angle.sin())]:
                close(a, b, tol=1e-5)


@interpreter
def test_fla_parity_suite_and_models_on_cpu(fla_forward_on_cpu):
    """The public parity suite on fla's Mamba3, its Mamba3ForCausalLM models included (``example_models``: M=1
    copies keep the logits), with the layer's refusal of the CPU lifted (``fla_forward_on_cpu``); on a GPU the suite
    runs the layer as it is (tests/test_parity.py)."""
    from mom_wrap.adapters.mamba3_fla import FlaMamba3Adapter
    from mom_wrap.testing import run_checks
    results = run_checks(FlaMamba3Adapter.example_host, 'fla.Mamba3')
    ran = {r.check for r in results}
    assert {f'model_one_memory_equals_host[{m}]' for m in FlaMamba3Adapter.example_models()} <= ran, ran
    assert not [r for r in results if not r.passed]


@interpreter
def test_fla_forward_refuses_the_cpu(capsys):
    """What the parity suite on the CPU would meet without ``fla_forward_on_cpu``: so the adapter says so
    (``host_forward_runs_on``), and ``python -m mom_wrap.check`` leaves the checks against the layer out there and
    says so (on the GPU it runs them: tests/test_parity.py)."""
    import mom_wrap.check as check
    from mom_wrap.adapters.mamba3_fla import FlaMamba3Adapter
    host = make_fla_host()
    with pytest.raises(NotImplementedError, match='CUDA'):
        host(torch.randn(1, 4, 32))
    assert not FlaMamba3Adapter.host_forward_runs_on(torch.device('cpu'))
    assert FlaMamba3Adapter.host_forward_runs_on(torch.device('cuda'))
    assert check.main(['fla.Mamba3', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'naive_loop[shared=True]' in out and 'equals_host' not in out
    assert "fla.Mamba3: its own forward does not run on cpu: the checks against it were left out" in out


@interpreter
def test_fla_model_convert_preserves_the_logits_and_one_memory_copies_keep_them(fla_forward_on_cpu):
    """fla's Mamba3ForCausalLM (tests/test_models.py's): ``convert`` with its default init="preserve", and every layer
    wrapped with M=1 copies, keep the model's logits (with the layer's refusal of the CPU lifted; on a GPU
    tests/test_convert.py and tests/test_models.py run these on the layer as it is)."""
    from mom_wrap import convert
    from tests.test_models import host_model
    ids = torch.randint(0, 64, (2, 10))
    for init in ('preserve', 'copy'):
        model = host_model('fla.Mamba3')
        with torch.no_grad():
            want = model(ids).logits
            convert(model, **({} if init == 'preserve' else dict(num_memories=1, topk=1, shared_memory=False,
                                                                  init='copy')))
            assert model.config.mom['init'] == init
            close(model(ids).logits, want, tol=1e-6)


@interpreter
def test_fla_without_mamba_ssm_the_torch_backend_runs_and_triton_names_what_is_missing(monkeypatch):
    """With mamba-ssm unimportable (as where it is not installed): fla's Mamba3 wrapped trains and decodes on the
    torch backend; the triton backend says that it needs mamba-ssm's kernels."""
    import sys
    host = make_fla_host()
    for name in [m for m in sys.modules if m == 'mamba_ssm' or m.startswith('mamba_ssm.')] + ['mamba_ssm']:
        monkeypatch.setitem(sys.modules, name, None)  # (an import of it raises ImportError)
    from mom_wrap.testing import wrap
    from tests.test_every_host import run_chunks
    mom = wrap(host)
    x = torch.randn(2, 6, 32)
    mom.train()(x)[0].sum().backward()
    with torch.no_grad():
        run_chunks(mom.eval(), x, [4, 1, 1])
    mom.backend = 'triton'
    with pytest.raises(ImportError, match="backend: Mamba3's triton backend runs mamba-ssm's kernels"):
        mom(x)
