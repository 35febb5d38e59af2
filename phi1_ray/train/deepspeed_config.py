"""The DeepSpeed config dict of a run, from our typed config. Plain data: no DeepSpeed import here."""

from __future__ import annotations

from typing import Any

from phi1_ray.config import merge
from phi1_ray.train.config import OptimConfig, TrainConfig


def deepspeed_config(train: TrainConfig, optim: OptimConfig, precision: str) -> dict[str, Any]:
    """ZeRO stage and offload, precision (fp16 with dynamic loss scaling), batch arithmetic, clipping.

    ``precision`` is the resolved one (see :func:`phi1_ray.train.config.resolve_precision`). The optimizer and the LR
    schedule are built in torch and handed to ``deepspeed.initialize``, so the schedule is ours exactly.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_batch_size": train.effective_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,  # progress lines are ours
        "wall_clock_breakdown": False,
    }
    return merge(config, train.deepspeed)
