"""Optimizers and learning-rate schedules, registered by name for the config's Optimizer section."""
import math

import paddle

from ppzoo.core.tensor_fusion import fuse_optimizer
from ppzoo.registry import LR_SCHEDULES, OPTIMIZERS, register_lr_schedule, register_optimizer


@register_lr_schedule("CosineWarmup")
class CosineWarmup(paddle.optimizer.lr.LRScheduler):
    """Linear warmup from 0 to max_lr over warmup_steps, then cosine decay to min_lr at decay_steps, then
    constant min_lr. `last_epoch` counts optimizer steps, so the scheduler's state_dict resumes it."""

    def __init__(self, max_lr, min_lr, warmup_steps, decay_steps):
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        super().__init__(learning_rate=float(max_lr), last_epoch=-1)

    def get_lr(self):
        step = self.last_epoch
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@register_lr_schedule("Constant")
class ConstantLR(paddle.optimizer.lr.LRScheduler):
    def __init__(self, max_lr, min_lr=None, warmup_steps=0, decay_steps=None):
        self.warmup_steps = int(warmup_steps)
        super().__init__(learning_rate=float(max_lr), last_epoch=-1)

    def get_lr(self):
        if self.warmup_steps > 0 and self.last_epoch < self.warmup_steps:
            return self.base_lr * (self.last_epoch + 1) / self.warmup_steps
        return self.base_lr


def _no_decay(param):
    # Norm weights and biases are not decayed (the usual LLaMA/GPT recipe); matrices are.
    group = getattr(param, "fused_group", None)  # a tensor fusion buffer (flat) says which kind it holds
    if group is not None:
        return group.startswith("no_decay")
    return param.ndim < 2


@register_optimizer("AdamW")
def build_adamw(opt_cfg, parameters, lr_schedule, paddle_clip=False):
    # Gradient clipping is done by the Engine (clip_grad_norm), which knows which parameters are split
    # across tensor-parallel ranks, except under fleet's GPU hybrid optimizer (paddle_clip=True), whose
    # ClipGradByGlobalNorm handling sums the norm over the mp / pp / sharding groups itself.
    clip = paddle.nn.ClipGradByGlobalNorm(opt_cfg.grad_clip) if paddle_clip and opt_cfg.grad_clip > 0 else None
    decay_names = {p.name for p in parameters if not _no_decay(p)}
    return paddle.optimizer.AdamW(
        learning_rate=lr_schedule,
        parameters=parameters,
        beta1=opt_cfg.beta1,
        beta2=opt_cfg.beta2,
        epsilon=opt_cfg.epsilon,
        weight_decay=opt_cfg.weight_decay,
        apply_decay_param_fun=lambda name: name in decay_names,
        grad_clip=clip,
    )


def build_optimizer(opt_cfg, parameters, max_steps, paddle_clip=False):
    lr_cfg = opt_cfg.lr
    schedule_cls = LR_SCHEDULES.get(lr_cfg.name, where="Optimizer.lr.name")
    schedule = schedule_cls(
        max_lr=lr_cfg.max_lr,
        min_lr=lr_cfg.min_lr,
        warmup_steps=lr_cfg.warmup_steps,
        decay_steps=lr_cfg.decay_steps if lr_cfg.decay_steps is not None else max_steps,
    )
    build = OPTIMIZERS.get(opt_cfg.name, where="Optimizer.name")
    if opt_cfg.tensor_fusion:
        optimizer = fuse_optimizer(lambda buffers: build(opt_cfg, buffers, schedule, paddle_clip), list(parameters),
                                   lambda p: "no_decay" if _no_decay(p) else "decay", paddle_clip)
    else:
        optimizer = build(opt_cfg, list(parameters), schedule, paddle_clip)
    return optimizer, schedule


@paddle.no_grad()
def clip_grad_norm(parameters, max_norm, mp_group=None, ep_group=None):
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    Parameters split across tensor-parallel ranks (`mp_split_axis` set) contribute their local squares,
    summed over the mp group; expert-parallel ones (`expert_parallel` set: each ep rank holds its own
    experts) summed over the ep group; replicated parameters are counted once."""
    parameters = list(parameters)
    grads_split, grads_replicated, grads_expert = [], [], []
    for p in parameters:
        if p.grad is None:
            continue
        if getattr(p, "expert_parallel", None) is not None:
            grads_expert.append(p.grad)
        else:
            (grads_split if getattr(p, "mp_split_axis", None) is not None else grads_replicated).append(p.grad)
    def sum_squares(grads):
        if not grads:
            return paddle.zeros([], dtype="float32")
        # One concatenated vector and one dot product: a kernel per parameter costs more than the copy.
        flat = paddle.concat([g.reshape([-1]).astype("float32") if g.dtype != paddle.float32 else g.reshape([-1])
                              for g in grads])
        return paddle.dot(flat, flat)

    split_sq = sum_squares(grads_split)
    if mp_group is not None and mp_group.nranks > 1:
        paddle.distributed.all_reduce(split_sq, group=mp_group)
    expert_sq = sum_squares(grads_expert)
    if ep_group is not None and ep_group.nranks > 1:
        paddle.distributed.all_reduce(expert_sq, group=ep_group)
    total_norm = paddle.sqrt(split_sq + expert_sq + sum_squares(grads_replicated))
    if max_norm and max_norm > 0:
        coef = max_norm / (float(total_norm) + 1e-6)
        if coef < 1.0:
            for p in parameters:
                if p.grad is not None:
                    p.grad.scale_(coef)
    return float(total_norm)
