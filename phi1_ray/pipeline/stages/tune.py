"""The tune stage (optional): a Ray Tune sweep of finetuning hyperparameters whose trials start from the
pretraining run; the finetune stage then trains with the best trial's values."""

from __future__ import annotations

from typing import Any

from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context
from phi1_ray.tune.config import TuneJobConfig

NAME = "tune"


def build(ctx: Context) -> Stage:
    sweep = ctx.plan.sweep
    assert sweep is not None  # the plan makes one when the stage is on
    deps = ("pretrain", "decontaminate", "tokenizer")
    return Stage(NAME, deps, [sweep.run_dir], sweep.model_dump(mode="json"), lambda: make(sweep), uses_ray=True)


def make(sweep: TuneJobConfig) -> dict[str, Any]:
    from phi1_ray.tune.sweep import run_sweep

    log(f"tune: {sweep.num_samples} x the search space's grid, {sweep.max_concurrent_trials} trials at a time")
    return run_sweep(sweep)
