"""The balancing loss under HF ``Trainer``'s loss scaling: ``BalanceLossScaleCallback``.

Each MoM layer injects ``balance_loss_weight * balance_loss_scale * d(term)`` into its backward
(``mom_wrap.losses``). The Trainer multiplies every micro-batch's task loss by a factor before its backward: 1 /
the optimizer step's micro-batches (or, where the loss was normalised by ``num_items_in_batch``, a share of the
step's tokens: the same step-wide mean), and under fp16 by its ``GradScaler``'s scale. The callback sets the
layers' scale to that factor at each step's start, so that ``balance_loss_weight`` means the same whatever the
accumulation and loss scaling: the step's gradient is that of the mean over its micro-batches of
``task + weight * term``.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from mom_wrap.balance import set_balance_loss_scale
from mom_wrap.wrapper import MixtureOfMemories


class BalanceLossScaleCallback(TrainerCallback):
    """Sets ``balance_loss_scale`` of the trainer's MoM layers (``mom_wrap.set_balance_loss_scale``) at every
    optimizer step's start to the factor the Trainer multiplies the step's micro-batch losses by, and back to 1
    when training ends::

        trainer = Trainer(model, args, train_dataset=...)
        trainer.add_callback(BalanceLossScaleCallback(trainer))

    The factor: 1 / ``trainer.current_gradient_accumulation_steps`` (the micro-batches of this step: fewer than
    ``gradient_accumulation_steps`` in an epoch's short last step); / ``args.n_gpu`` under ``torch.nn.DataParallel``
    (``n_gpu > 1``: the task loss is the mean over the replicas, whose balancing gradients add up); x the fp16
    ``GradScaler``'s scale where accelerate has one (``trainer.accelerator.scaler``: ``fp16=True`` with DDP, FSDP
    or one device), read at the step's start (after its update at the end of the last step) as a device tensor
    (``scaler.scale``: no host sync).

    Covered: gradient accumulation with a per-batch mean loss or with ``num_items_in_batch`` (the balancing term
    is a mean over the step's micro-batches in both); fp32/bf16 (no loss scaling) and fp16 with accelerate's
    GradScaler; DDP and FSDP (each rank's term, averaged over ranks with the gradients, as the task loss is);
    activation checkpointing. Not covered: DeepSpeed's fp16 loss scaler (its scale is inside the engine:
    ``on_train_begin`` raises); a ``training_step`` or ``compute_loss`` override that scales the loss otherwise
    (set the scale yourself with ``set_balance_loss_scale``). Under ``torch.compile`` a traced layer (backend
    ``'torch'``) takes the scale when its forward runs, which the step's start precedes.

    Args:
        trainer: the ``transformers.Trainer`` this callback is added to (a callback is not handed the trainer,
            and the accumulation count of the step and the loss scaler are only found there).
    """

    def __init__(self, trainer):
        if not all(hasattr(trainer, a) for a in ('accelerator', 'args', 'model')):
            raise TypeError(f"trainer: expected a transformers Trainer, got {type(trainer).__name__}")
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(self.trainer, 'is_deepspeed_enabled', False) and args.fp16:
            raise ValueError("trainer: DeepSpeed's fp16 loss scaler is not covered (its scale stays inside the "
                             "engine); use bf16, or set mom_wrap.set_balance_loss_scale yourself")
        if not any(isinstance(m, MixtureOfMemories) for m in self.trainer.model.modules()):
            raise ValueError("trainer: its model contains no MixtureOfMemories layer")

    def on_step_begin(self, args, state, control, **kwargs):
        set_balance_loss_scale(self.trainer.model, self.loss_scale())

    def on_train_end(self, args, state, control, **kwargs):
        set_balance_loss_scale(self.trainer.model, 1.0)

    def loss_scale(self) -> float | torch.Tensor:
        """The factor the Trainer multiplies this optimizer step's micro-batch losses by (see the class)."""
        trainer = self.trainer
        steps = getattr(trainer, 'current_gradient_accumulation_steps', trainer.args.gradient_accumulation_steps)
        steps *= max(trainer.args.n_gpu, 1)
        scaler = trainer.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0 / steps
        return scaler.scale(torch.ones((), device=trainer.args.device)) / steps
