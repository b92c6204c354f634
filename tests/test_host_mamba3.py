"""Mamba3 as a host (mamba-ssm 2.3.2's ``mamba_ssm.modules.mamba3.Mamba3``, fla 0.6.0's ``fla.layers.mamba3.Mamba3``):
what runs on the CPU, and an independent step reference of the SISO recurrence checked against the hosts' own
kernels. No adapter yet (see the notes at the end of this docstring).

The recurrence (SISO; per sequence, per head h of H, state S [P, N]; sizes P = headdim, N = d_state, G = ngroups,
A = num_rope_angles = (N * rope_fraction rounded down to even) / 2), from in_proj's rows
[z | x | B | C | dd_dt | dd_A | trap | angles]:
    B, C = RMSNorm(B), RMSNorm(C) per group (weight [N]);  k_t = B_t[group(h)] + B_bias[h],  q_t = C_t[...] + C_bias[h]
    dt_t = softplus(dd_dt + dt_bias);  a_t = dt_t * clamp(-softplus(dd_A), max=-A_floor);  lam_t = sigmoid(trap)
    theta_t = theta_{t-1} + pi * tanh(angles_t) * dt_t        [H, A] (the angle state; the kernels keep it mod 2 pi)
    k~_t, q~_t = R(theta_t) k_t, R(theta_t) q_t: pairs (2i, 2i+1) for i < A rotated by theta_t[i], the rest as is
    S_t = exp(a_t) * (S_{t-1} + dt_t (1 - lam_t) v_{t-1} k~_{t-1}^T) + dt_t lam_t v_t k~_t^T      (trapezoidal)
    y_t = S_t q~_t + D v_t;  y = y * silu(z) (is_outproj_norm: y = RMSNormGated(y, z) per head, norm before gate)
    out = out_proj(y)
with v = x [H, P]. A fresh sequence starts from zeros; the host's cache keeps (theta, S, k~_last, v_last): four
states, no conv state. The chunked kernel writes it as one scalar-decay scan (decay a, key k~ * (dt lam +
dt_next (1 - lam_next)), dt_next = 0 at a sequence's end) with its diagonal taken at dt lam only, and folds
dt_0 (1 - lam_0) v_in k_in^T into an initial state. MIMO (is_mimo, rank R): x and z go through per-head rank-R
up-projections (mimo_x, mimo_z), B and C have R rows each, the state sums the R outer products, mimo_o folds the R
outputs back; its rotation pairs (i, i + N/2) instead of (2i, 2i+1). Its kernels are TileLang only (not here).

What runs on the CPU (Triton's interpreter, tests/conftest.py):
* Neither layer's kernels as shipped: mamba-ssm's Triton Mamba3 kernels call PTX ``cos.approx`` / ``sin.approx`` /
  ``tanh.approx`` through ``tl.inline_asm_elementwise``, which the interpreter refuses
  (``test_layer_forward_on_cpu_needs_the_ptx_swap``). With those four functions swapped for Triton's exact ones in
  the kernel modules (``swap_ptx_approximations``; nothing else changed), the chunked forward runs: batched, varlen
  (cu_seqlens) and with per-sequence initial states (all four), and equals the step reference below in fp32.
* Its backward does not: ``compute_dzdo`` asserts CUDA tensors. Gradients of the kernels: GPU tests only.
* Neither layer's decode: mamba-ssm's ``step`` and fla's need ``mamba3_step_fn`` (CuTe DSL, nvidia-cutlass-dsl +
  quack-kernels; not installed, CUDA only). The Triton rotary step (``apply_rotary_qk_inference_fwd``) runs and
  equals its own ``apply_rotary_qk_inference_reference``.
* fla's layer has no PyTorch path: its ``forward`` raises NotImplementedError off CUDA, and it calls mamba-ssm's
  kernels (without mamba-ssm it has none). Its ``cuda_kernels_forward`` runs on the CPU with the swap and equals
  mamba-ssm's layer with the same weights.
* Host defects seen: mamba-ssm's ``step`` broadcasts B and C from ngroups to nheads with ``expand``, which fails
  for 1 < ngroups < nheads (fla's step repeats them); mamba-ssm's ``forward`` takes ``seq_idx`` and ignores it.

The adapter is not built yet: its design (torch backend: this reference's decomposition into our scalar-decay
reference; triton backend: ``mamba3_siso_combined`` with cu_seqlens and per-segment Input_States; the four
states packed into one recurrent state per segment; a calling convention of its own, as the host's second
positional argument is ``seq_idx``, not ``seqlen``) is in the report of this work.
"""
import copy
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
KERNEL_MODULES = ('angle_dt', 'mamba3_siso_fwd', 'mamba3_siso_bwd', 'mamba3_siso_step')


import triton  # noqa: E402  (Triton: a dependency of mamba-ssm's kernels and of mom_wrap's)
import triton.language as tl  # noqa: E402  (visible to the jit functions below: module level)


@triton.jit
def cos_exact(x):
    return tl.cos(x)


@triton.jit
def sin_exact(x):
    return tl.sin(x)


@triton.jit
def tanh_exact(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def sech2_exact(x):
    t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return 1.0 - t * t


EXACT = {'cos_approx': cos_exact, 'sin_approx': sin_exact, 'tanh_approx': tanh_exact, 'sech2_approx': sech2_exact}


@pytest.fixture
def swap_ptx_approximations(monkeypatch):
    """mamba-ssm's Mamba3 Triton kernels with their PTX approximations (inline asm, which the interpreter refuses)
    replaced by Triton's exact functions, in each kernel module's namespace (undone after the test)."""
    import importlib
    for name in KERNEL_MODULES:
        module = importlib.import_module(f'mamba_ssm.ops.triton.mamba3.{name}')
        for fn, exact in EXACT.items():
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, exact)


@pytest.fixture
def fp32_kernels(monkeypatch, swap_ptx_approximations):
    """Both layers' ``mamba3_siso_combined`` without its cast of q, k, v, z, trap and angles to bf16: Triton 3.9's
    interpreter computes ``tl.dot`` of bf16 blocks wrongly (``test_interpreter_bf16_dot_is_wrong``), so on the CPU
    the layers run their kernels in fp32; all else is the layers' own."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import _Mamba3Function

    def combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
                 return_final_states=False, cu_seqlens=None):
        return _Mamba3Function.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                                     *(Input_States or (None,) * 4), cu_seqlens, chunk_size, return_final_states)
    import fla.layers.mamba3
    import mamba_ssm.modules.mamba3
    monkeypatch.setattr(mamba_ssm.modules.mamba3, 'mamba3_siso_combined', combined)
    monkeypatch.setattr(fla.layers.mamba3, 'mamba3_siso_combined', combined)


@interpreter
def test_interpreter_bf16_dot_is_wrong():
    """The smallest reproduction of why the layers' bf16 kernels give garbage on the CPU (Triton 3.9's interpreter):
    tl.dot of two bf16 16 x 16 blocks. Fails once the interpreter gets it right: then drop ``fp32_kernels``."""
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
def test_layer_forward_on_cpu_needs_the_ptx_swap():
    """The smallest reproduction: the real layer's forward on the CPU stops at the PTX inline asm."""
    from triton.runtime.errors import InterpreterError
    layer = Mamba3(d_model=32, d_state=16, headdim=16, chunk_size=16, layer_idx=0)
    with pytest.raises(InterpreterError, match='inline_asm'), torch.no_grad():
        layer(torch.randn(1, 8, 32))


@interpreter
@pytest.mark.parametrize('G,H,A', [(1, 2, 4), (2, 4, 4), (1, 2, 8)], ids=['default', 'groups', 'full_rope'])
def test_host_kernel_equals_step_reference_in_fp32(swap_ptx_approximations, G, H, A):
    """Two chunks and a ragged end; the four final states too."""
    inp = kernel_inputs(G=G, H=H, A=A)
    y, *states = run_kernel(inp)
    want, want_states = step_reference(**inp)
    close(y, want)
    close_states(states, want_states)


@interpreter
def test_host_kernel_continues_per_sequence_states_and_packed_sequences(swap_ptx_approximations):
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
def test_real_layer_equals_layer_reference(fp32_kernels, kw):
    """The real layer (its kernels in fp32: ``fp32_kernels``) = the reference from its parameters."""
    host = make_host(**kw)
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        close(host(u), layer_reference(host, u), tol=1e-4)


@interpreter
def test_fla_layer_runs_mamba_ssm_kernels_and_refuses_the_cpu(fp32_kernels):
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
    """On CUDA (PTX approximations as shipped): the chunked kernel's forward and every input's gradient, from
    initial states, = the fp64 step reference's (autograd), to the approximations' and TF32's error."""
    inp = {n: t.cuda() for n, t in kernel_inputs(T=100, H=4, P=64, N=128, A=32).items()}
    states = [torch.randn(2, 4, 32, device='cuda'), 0.1 * torch.randn(2, 4, 64, 128, device='cuda'),
              torch.randn(2, 4, 128, device='cuda'), torch.randn(2, 4, 64, device='cuda')]
    leaves = {n: t.clone().requires_grad_() for n, t in inp.items()}
    y, *_ = run_kernel(leaves, states=states, chunk_size=64)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_leaves = {n: t.double().requires_grad_() for n, t in inp.items()}
    want, _ = step_reference(**ref_leaves, states=[s.double() for s in states])
    want.backward(grad.double())
    close(y.double(), want, 1e-2)
    for n in inp:
        close(leaves[n].grad.double(), ref_leaves[n].grad, 2e-2)


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
        params = InferenceParams(max_seqlen=24, max_batch_size=2)
        outs = [host(u[:, :16], inference_params=params)]
        params.seqlen_offset += 16
        for t in range(16, 24):
            outs.append(host(u[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
        close(torch.cat(outs, 1), full, tol=2e-2)
