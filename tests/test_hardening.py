"""Regression tests of the core's review defects (issue 7), each failing on the code before its fix.

Kernels past 2^31 elements are in tests/test_kernels_large.py; grouped GEMM shapes at the primitive level
in tests/test_primitives.py.
"""
import copy
import gc
import os
import weakref

import pytest
import torch
from fla.models.utils import Cache

import mom_wrap.ops as ops
from mom_wrap import MixtureOfMemories, load_balancing_loss, set_balance_loss_weight
from tests.test_generation import left_padded_prompts
from tests.test_layer import HIDDEN, close, make_host, wrap

interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason="fla's kernels need TRITON_INTERPRET=1 or CUDA")


# ------------------------------------------------------------------------------------------ 1. grouped GEMM

def test_fused_width_not_16_byte_aligned_still_uses_grouped_gemm(monkeypatch):
    """3 heads: k 48 + v 96 + a 3 + b 3 = 150 fused columns, 600 bytes a row in fp32 (not a multiple of 16),
    as fla's default size (4620 columns in bf16) is. Training forward and backward take the grouped GEMM and
    equal the per-block fallback."""
    calls = []
    real = ops._grouped_mm
    monkeypatch.setattr(ops, '_grouped_mm', lambda *a, **k: calls.append(1) or real(*a, **k))
    mom = wrap(make_host(hidden_size=48, num_heads=3), init='random')
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    assert sum(w.shape[1] for w in mom.memories.proj.values()) == 150
    x = torch.randn(2, 13, 48)

    def grads():
        mom.zero_grad()
        y = mom(x)[0]
        y.square().mean().backward()
        return y.detach(), torch.cat([p.grad.flatten() for p in mom.parameters()])
    y, g = grads()
    assert calls, "the grouped GEMM was skipped"
    monkeypatch.setattr(ops, '_grouped_mm_ok', lambda x, weight: False)
    y_ref, g_ref = grads()
    close(y, y_ref, tol=1e-5)
    close(g, g_ref, tol=1e-5)


# ------------------------------------------------------------------------------- 3. inference sees edits

def test_inference_sees_weights_edited_through_data():
    """In-place edits through ``.data`` (EMA updates, init_(p.data)) bump no version counter: inference must
    still use them."""
    mom = wrap(init='random').eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        before = mom(x)[0]
    mom.memories.proj['v'].data.mul_(0.5)
    with torch.no_grad():
        after = mom(x)[0]
    want = mom(x)[0].detach()  # with autograd
    assert not torch.allclose(before, after)
    close(after, want, tol=1e-6)


def test_dtype_conversion_reaches_every_weight_used_in_inference():
    mom = wrap(init='random').eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        want = mom.double()(x.double())[0]
        mom.float()(x)  # an inference forward, then a conversion: no fp32 copy of a weight may stay behind
        mom.double()
        assert not [(name, n) for name, m in mom.named_modules() for n, v in vars(m).items()
                    if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and n != 'router_logits']
        got = mom(x.double())[0]
    assert got.dtype == torch.float64
    close(got, want, tol=0)


# ----------------------------------------------------------------------- 4. no graph kept on the module

def test_deepcopy_after_a_forward_with_autograd():
    mom = wrap(init='random', balance_loss_weight=0.01)
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    mom(x)[0].sum().backward()
    twin = copy.deepcopy(mom)
    with torch.no_grad():
        close(twin(x)[0], mom(x)[0], tol=0)


def test_module_keeps_no_activation_alive_after_its_output_is_dropped():
    mom = wrap(init='random', balance_loss_weight=0.01)

    def forward():
        h = torch.randn(2, 9, HIDDEN, requires_grad=True) * 2  # an upstream activation
        return mom(h)[0], weakref.ref(h)
    out, ref = forward()
    del out
    gc.collect()
    assert ref() is None, "the module holds the autograd graph of its last forward"
    assert mom.router_logits.grad_fn is None and load_balancing_loss(mom).grad_fn is None


# ---------------------------------------------------------------------------- 5. the balancing loss

def reference_balance_loss(mom, x, mask=None):
    """M * sum_e f_e * P_e from the router weight, written out; differentiable in the router weight."""
    xs = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()]
    probs = (xs.float() @ mom.router.weight.float().t()).softmax(-1)
    top = probs.topk(mom.topk, -1).indices
    f = torch.stack([(top == e).float().sum() for e in range(mom.num_memories)]) / (top.numel())
    return mom.num_memories * (f * probs.mean(0)).sum()


@pytest.mark.parametrize('topk', [1, 2])
def test_balance_loss_gradient_comes_with_the_output_backward(topk):
    """The router's gradient is that of task + weight * balance, with nothing added to the task loss."""
    w = 0.3
    mom = wrap(init='random', topk=topk, balance_loss_weight=w)
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    x = torch.randn(2, 11, HIDDEN)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    mom(x, attention_mask=mask)[0].square().mean().backward()
    got = mom.router.weight.grad.clone()
    close(load_balancing_loss(mom), reference_balance_loss(mom, x, mask).detach(), tol=1e-6)

    mom.zero_grad()
    set_balance_loss_weight(mom, 0.0)
    task = mom(x, attention_mask=mask)[0].square().mean()
    (task + w * reference_balance_loss(mom, x, mask)).backward()
    close(got, mom.router.weight.grad, tol=1e-5)
    if topk == 1:  # one memory a token, weight 1: only the balancing loss moves the router
        assert got.abs().sum() > 0


def test_balance_loss_of_every_forward_before_one_backward_counts():
    mom = wrap(init='random', balance_loss_weight=0.5)
    torch.nn.init.normal_(mom.router.weight, std=0.5)
    x1, x2 = torch.randn(2, 7, HIDDEN), torch.randn(2, 9, HIDDEN)
    (mom(x1)[0].square().mean() + mom(x2)[0].square().mean()).backward()
    both = mom.router.weight.grad.clone()
    mom.zero_grad()
    mom(x1)[0].square().mean().backward()
    mom(x2)[0].square().mean().backward()
    close(both, mom.router.weight.grad, tol=1e-6)


def test_balance_loss_weight_is_checked():
    with pytest.raises(TypeError, match='balance_loss_weight'):
        wrap(balance_loss_weight='0.01')
    with pytest.raises(TypeError, match='weight'):
        set_balance_loss_weight(wrap(), None)


def checkpointed_model(topk):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cfg = GatedDeltaNetConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_heads=2, head_dim=16,
                              expand_v=1, intermediate_size=128, fuse_cross_entropy=False, use_cache=False)
    model = GatedDeltaNetForCausalLM(cfg)
    for layer in model.model.layers:
        layer.attn = MixtureOfMemories(layer.attn, num_memories=4, topk=topk, init='random', backend='torch',
                                       balance_loss_weight=0.1)
        torch.nn.init.normal_(layer.attn.router.weight, std=0.5)
    return model.train()


@interpreter
@pytest.mark.parametrize('reentrant', [True, False])
@pytest.mark.parametrize('topk', [1, 2])
def test_hf_gradient_checkpointing_keeps_the_router_gradient(reentrant, topk):
    """HF's gradient_checkpointing_enable (reentrant by default: the first forward runs without grad) on a
    wrapped fla model: every router gets the gradient of task loss + 0.1 x each layer's balancing loss, the
    latter written out here from the layer's input (captured by a hook in a run without checkpointing)."""
    model = checkpointed_model(topk)
    ids, mask = left_padded_prompts([12, 9], 12)

    def task_loss():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def router_grads():
        return [layer.attn.router.weight.grad.clone() for layer in model.model.layers]

    inputs = []
    hooks = [layer.attn.register_forward_hook(lambda m, args, kw, out: inputs.append((m, kw['hidden_states'])),
                                              with_kwargs=True) for layer in model.model.layers]
    set_balance_loss_weight(model, 0.0)
    (task_loss() + 0.1 * sum(reference_balance_loss(m, h, mask) for m, h in inputs)).backward()
    want = router_grads()
    for h in hooks:
        h.remove()
    model.zero_grad()
    set_balance_loss_weight(model, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': reentrant})
    task_loss().backward()
    for g, w in zip(router_grads(), want):
        assert w.abs().sum() > 0
        close(g, w, tol=1e-5)


# ------------------------------------------------------------------------------ 6. the host's cache rules

@interpreter
def test_cache_rules_match_the_real_host_side_by_side():
    """The M=1 wrapper next to the real fla layer (eval, its fused_recurrent kernel under the interpreter)
    for every use_cache x past_key_values combination: same outputs, same returned cache, same token count;
    use_cache=False reads a stored state and leaves it as it was."""
    host = make_host().eval()
    mom = MixtureOfMemories(copy.deepcopy(host), num_memories=1, topk=1, shared_memory=False, backend='torch').eval()
    x = torch.randn(2, 12, HIDDEN)
    with torch.no_grad():
        # use_cache=True without a cache: runs as without one and returns None
        (oh, _, ch), (om, _, cm) = host(x, use_cache=True), mom(x, use_cache=True)
        assert ch is None and cm is None
        close(om, oh, tol=1e-5)
        # use_cache=False with an empty cache: counts the tokens, stores nothing to start from
        c_h, c_m = Cache(), Cache()
        (oh, _, rh), (om, _, rm) = (host(x[:, :5], past_key_values=c_h, use_cache=False),
                                    mom(x[:, :5], past_key_values=c_m, use_cache=False))
        assert rh is c_h and rm is c_m and c_h.get_seq_length() == c_m.get_seq_length() == 5
        close(om, oh, tol=1e-5)
        # prefill, then use_cache=False continuations (a chunk and one token) from the stored state
        c_h, c_m = Cache(), Cache()
        close(mom(x[:, :5], past_key_values=c_m, use_cache=True)[0],
              host(x[:, :5], past_key_values=c_h, use_cache=True)[0], tol=1e-5)
        stored = [t.clone() for t in (c_m[0]['recurrent_state'], *c_m[0]['conv_state']['write'].values(),
                                      *c_m[0]['conv_state']['read'].values())]
        for n in (3, 1):
            probe_h = copy.deepcopy(c_h)  # fla's layer drops its conv states here: probe on a copy
            close(mom(x[:, 5:5 + n], past_key_values=c_m, use_cache=False)[0],
                  host(x[:, 5:5 + n], past_key_values=probe_h, use_cache=False)[0], tol=1e-5)
            assert probe_h.get_seq_length() == c_h.get_seq_length() + n
        after = [c_m[0]['recurrent_state'], *c_m[0]['conv_state']['write'].values(),
                 *c_m[0]['conv_state']['read'].values()]
        assert all(torch.equal(a, b) for a, b in zip(after, stored)), "use_cache=False changed the stored state"
        assert c_m.get_seq_length() == 5 + 3 + 1
        # and the stored state continues where the prefill ended
        close(mom(x[:, 5:7], past_key_values=c_m, use_cache=True)[0],
              host(x[:, 5:7], past_key_values=c_h, use_cache=True)[0], tol=1e-5)


# ------------------------------------------------------------------------------- 7. all-padding batches

def test_all_padding_batch_gives_every_parameter_a_gradient():
    mom = wrap(init='random', balance_loss_weight=0.01)
    x = torch.randn(2, 6, HIDDEN, requires_grad=True)
    out = mom(x, attention_mask=torch.zeros(2, 6, dtype=torch.long))[0]
    assert torch.all(out == 0)
    out.sum().backward()
    for name, p in mom.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name
    assert x.grad is not None and torch.all(x.grad == 0)


# --------------------------------------------------------------------------- 8. gradient layouts (DDP)

@pytest.mark.parametrize('backend', ['torch', pytest.param('triton', marks=pytest.mark.gpu)])  # fla's chunk kernels
@pytest.mark.parametrize('kw', [dict(num_memories=4, topk=2), dict(num_memories=1, topk=1, shared_memory=False),
                                dict(num_memories=3, topk=1, host=dict(conv_size=3, conv_bias=True))])
def test_every_gradient_has_its_parameters_strides(backend, kw):
    """DDP copies each gradient into a bucket view with its parameter's strides and warns ("Grad strides do
    not match bucket view strides") when they differ, on size-1 dimensions too (which autograd's layout
    contract ignores): the host's q conv weight [D, 1, W] got a transposed gradient."""
    kw = dict(kw)
    dev = 'cuda' if backend == 'triton' else 'cpu'
    mom = wrap(make_host(**kw.pop('host', {})), init='random', backend=backend, balance_loss_weight=0.01, **kw)
    mom.to(dev)(torch.randn(2, 9, HIDDEN, device=dev))[0].square().mean().backward()
    for name, p in mom.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


@pytest.mark.parametrize('layer', ['GatedDeltaNet', 'KimiDeltaAttention'])
@pytest.mark.parametrize('heads, v_heads', [(4, 2), (3, 1)])
def test_fewer_value_heads_than_qk_heads_are_refused(layer, heads, v_heads):
    """fla's layers accept fewer value heads than q/k heads when made (they check divisibility only for more) and
    their kernels refuse them at the first forward: the wrapper refuses them by name when it is made."""
    import fla.layers
    host = getattr(fla.layers, layer)(hidden_size=48, head_dim=16, num_heads=heads, num_v_heads=v_heads, expand_v=1)
    with pytest.raises(ValueError, match='num_v_heads: must be a multiple of num_heads'):
        MixtureOfMemories(host, num_memories=4, topk=2)
