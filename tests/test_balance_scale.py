"""The balancing loss under the loop's loss scaling (``set_balance_loss_scale``, ``BalanceLossScaleCallback``).

A loop multiplies its task loss by 1/accumulation steps and, under fp16, a loss scaler's scale; the layers'
injected balancing gradient must be scaled alike, or ``balance_loss_weight`` means 8x as much under
accumulation 8 and about nothing under a 65536 loss scale. Each test fails without the scale: HF's Trainer
with gradient accumulation 4 (and a GradScaler) against a plain autograd loop; a GradScaler's scale;
the scale read when the backward runs (checkpointing, several forwards); the setter's reach and checks.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_wrap import MixtureOfMemories, set_balance_loss_weight
from mom_wrap.balance import set_balance_loss_scale
from tests.test_hardening import reference_balance_loss
from tests.test_layer import HIDDEN, wrap

VOCAB, T, W = 32, 8, 0.5  # W: large enough that a wrong scale of the balancing part shows in the gradient
interpreter = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                 reason="fla's models need TRITON_INTERPRET=1 or CUDA")


def same(got, want, tol=1e-5):
    """Equal up to ``tol`` of ``want``'s largest entry (fp32: the reference sums in another order)."""
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max abs err {err:.3e} (ref max {want.abs().max().item():.3e})"


class TinyLM(nn.Module):
    """Embedding -> one MoM layer (GatedDeltaNet host, torch backend) -> head, returning HF's ``{'loss': ...}``.
    ``token_sum``: the loss summed over tokens / ``num_items_in_batch`` (the Trainer then does not divide it by
    the accumulation steps), else the micro-batch's mean."""

    def __init__(self, token_sum: bool = False):
        super().__init__()
        self.accepts_loss_kwargs = token_sum
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mom = wrap(init='random', backend='torch', balance_loss_weight=W)
        nn.init.normal_(self.mom.router.weight, std=0.5)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels, num_items_in_batch=None):
        logits = self.head(self.mom(self.embed(input_ids))[0])
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none')
        return {'loss': losses.sum() / num_items_in_batch if self.accepts_loss_kwargs else losses.mean()}


def reference_step_grads(model, batches, num_items=None):
    """The gradients of the mean over the micro-batches of task + W x that micro-batch's balancing term, the term
    written out (``reference_balance_loss``, on the layer's input) and the layer's own one off. ``num_items``:
    the task part as the token-sum model gives it (summed over the micro-batches, not averaged)."""
    model = copy.deepcopy(model)
    set_balance_loss_weight(model, 0.0)
    for ids, labels in batches:
        task = model(ids, labels, num_items)['loss']
        task = task if num_items is not None else task / len(batches)
        (task + W * reference_balance_loss(model.mom, model.embed(ids)) / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def trainer_step_grads(model, tmp_path, loss_scale=None):
    """One optimizer step of HF's Trainer (CPU, 4 micro-batches of 2 sequences, the callback added): every
    parameter's gradient as the optimizer took it (unscaled, where a GradScaler with scale ``loss_scale`` is put
    in the accelerator: accelerate makes none on the CPU), and the micro-batches the model saw."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mom_wrap.training import BalanceLossScaleCallback
    data = [{'input_ids': ids, 'labels': torch.roll(ids, -1)} for ids in torch.randint(0, VOCAB, (8, T))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, use_cpu=True, report_to=[],
                             save_strategy='no', logging_strategy='no', disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    grads, batches = {}, []

    class Capture(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):  # a GradScaler has unscaled them
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    hook = model.register_forward_pre_hook(
        lambda m, a, kw: batches.append((kw['input_ids'], kw['labels'], kw.get('num_items_in_batch'))),
        with_kwargs=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Capture()])
    trainer.add_callback(BalanceLossScaleCallback(trainer))
    if loss_scale is not None:
        trainer.accelerator.scaler = torch.amp.GradScaler('cpu', init_scale=loss_scale)
    trainer.train()
    hook.remove()
    assert len(batches) == 4 and model.mom.balance_loss_scale == 1.0  # reset when training ends
    return grads, batches


@pytest.mark.parametrize('token_sum, loss_scale', [(False, None), (True, None), (False, 2.0 ** 16)])
def test_trainer_with_accumulation_steps_the_mean_of_task_and_balance(tmp_path, token_sum, loss_scale):
    """HF's Trainer, gradient accumulation 4, the model's loss a micro-batch mean (the Trainer divides it by 4) or
    a sum over the step's tokens (``num_items_in_batch``: not divided), fp32 or under a 2^16 GradScaler: every
    gradient is that of the mean over the 4 micro-batches of task + W x balancing term (without the scale its
    balancing part is 4x too large, or under the GradScaler 2^16 / 4x too small)."""
    torch.manual_seed(0)
    model = TinyLM(token_sum)
    start = copy.deepcopy(model)
    got, batches = trainer_step_grads(model, tmp_path, loss_scale)
    num_items = batches[0][2]
    assert (num_items is not None) == token_sum
    want = reference_step_grads(start, [(ids, labels) for ids, labels, _ in batches], num_items)
    assert got.keys() == want.keys() and want['mom.router.weight'].abs().sum() > 0
    for name in want:
        same(got[name], want[name])


def layer_and_batch():
    mom = wrap(init='random', backend='torch', balance_loss_weight=W)
    nn.init.normal_(mom.router.weight, std=0.5)
    x = torch.randn(2, 11, HIDDEN)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    return mom, x, mask


def grads_of(mom, step):
    mom.zero_grad()
    step()
    return {n: p.grad.clone() for n, p in mom.named_parameters()}


@pytest.mark.parametrize('as_tensor', [False, True])
def test_loss_scaler_leaves_the_unscaled_gradient_unchanged(as_tensor):
    """A GradScaler's loss scale S (loss x S backward, then the gradients / S) with the scale set to S, as a number
    or as the scaler's own tensor: every gradient as without a scaler. With the default scale 1 (today's
    behaviour) the balancing part comes out S times too small: the loss practically off."""
    S = 2.0 ** 16
    mom, x, mask = layer_and_batch()

    def task():
        return mom(x, attention_mask=mask)[0].square().mean()

    def scaled(set_scale):
        def step():
            scaler = torch.amp.GradScaler('cpu', init_scale=S)
            if set_scale:
                set_balance_loss_scale(mom, scaler.scale(torch.ones(())) if as_tensor else S)
            scaler.scale(task()).backward()
            scaler.unscale_(torch.optim.SGD(mom.parameters(), lr=0.0))
        return step

    want = grads_of(mom, lambda: task().backward())
    set_balance_loss_weight(mom, 0.0)
    task_only = grads_of(mom, lambda: task().backward())
    set_balance_loss_weight(mom, W)
    default = grads_of(mom, scaled(False))  # scale 1
    got = grads_of(mom, scaled(True))
    assert (want['router.weight'] - task_only['router.weight']).abs().max() > 1e-3  # the balancing part counts
    for name in want:
        same(got[name], want[name], tol=1e-6)
        same(default[name], task_only[name] + (want[name] - task_only[name]) / S, tol=1e-6)


def checkpointed(use_reentrant):
    def run(mom, x, mask):
        return torch.utils.checkpoint.checkpoint(lambda h: mom(h, attention_mask=mask)[0], x,
                                                 use_reentrant=use_reentrant)
    return run


@pytest.mark.parametrize('forward', ['plain', 'two forwards', 'reentrant checkpoint', 'checkpoint'])
def test_scale_is_read_when_the_backward_runs(forward):
    """The scale set after the forward and before the backward is the one applied: the gradient of
    task + 3 W x balancing term, under activation checkpointing (reentrant: the forward runs without grad and
    again inside the backward; non-reentrant) and with two forwards before one backward."""
    mom, x, mask = layer_and_batch()
    x.requires_grad_()  # a reentrant checkpoint passes gradients only to inputs that need them
    run = {'plain': lambda m, h, k: m(h, attention_mask=k)[0],
           'two forwards': lambda m, h, k: m(h)[0] + m(h, attention_mask=k)[0],
           'reentrant checkpoint': checkpointed(True), 'checkpoint': checkpointed(False)}[forward]

    def step(scale_after_forward):
        def go():
            out = run(mom, x, mask)
            if scale_after_forward is not None:
                set_balance_loss_scale(mom, scale_after_forward)
            out.square().mean().backward()
        return go
    set_balance_loss_weight(mom, 3 * W)
    want = grads_of(mom, step(None))
    set_balance_loss_weight(mom, W)
    got = grads_of(mom, step(3.0))
    for name in want:
        same(got[name], want[name], tol=1e-6)


@interpreter
def test_scale_reaches_every_layer_and_is_checked():
    """``set_balance_loss_scale`` on a converted 2-layer fla model sets every layer's scale (1 by default); bad
    input names the argument and changes nothing; the callback takes only a Trainer."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from mom_wrap import convert
    from mom_wrap.training import BalanceLossScaleCallback
    cfg = GatedDeltaNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_heads=2, head_dim=16,
                              expand_v=1, intermediate_size=128, fuse_cross_entropy=False, use_cache=False)
    model = convert(GatedDeltaNetForCausalLM(cfg), num_memories=4, topk=2, backend='torch')
    layers = [m for m in model.modules() if isinstance(m, MixtureOfMemories)]
    assert len(layers) == 2 and all(m.balance_loss_scale == 1.0 for m in layers)
    set_balance_loss_scale(model, 0.25)
    assert all(m.balance_loss_scale == 0.25 for m in layers)
    scale = torch.tensor(8.0)
    set_balance_loss_scale(model, scale)
    assert all(m.balance_loss_scale is layers[0].balance_loss_scale and float(m.balance_loss_scale) == 8.0
               for m in layers)
    set_balance_loss_scale(model, 2)
    for bad in ['1', None, True, torch.tensor([1.0, 2.0]), torch.tensor(4)]:
        with pytest.raises(TypeError, match='^scale: '):
            set_balance_loss_scale(model, bad)
    for bad in [-1.0, math.nan, math.inf, torch.tensor(-0.5), torch.tensor(math.nan)]:
        with pytest.raises(ValueError, match='^scale: must be finite and >= 0'):
            set_balance_loss_scale(model, bad)
    assert all(m.balance_loss_scale == 2.0 for m in layers)
    with pytest.raises(ValueError, match='^module: contains no MixtureOfMemories'):
        set_balance_loss_scale(nn.Linear(2, 2), 1.0)
    with pytest.raises(TypeError, match='^trainer: expected a transformers Trainer'):
        BalanceLossScaleCallback(model)
