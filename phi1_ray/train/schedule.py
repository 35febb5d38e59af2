"""Linear warmup then linear decay: the paper's learning-rate schedule."""

from __future__ import annotations

from phi1_ray.train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """LR for optimizer step ``step`` (0-based): 0 -> lr over ``warmup_steps``, then lr -> min_lr at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    remaining = max(0.0, (cfg.max_steps - step) / decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining


def lr_lambda(cfg: OptimConfig):
    """The multiplier form for ``torch.optim.lr_scheduler.LambdaLR`` (optimizer built with ``lr=cfg.lr``)."""
    return lambda step: lr_at(step, cfg) / cfg.lr
