"""The finetune stage: the finetuning job on the exercises, from the pretraining run (with the sweep's best
hyperparameters when the tune stage ran); afterwards the training stages' loss curves are drawn."""

from __future__ import annotations

import json

from phi1_ray import tracking
from phi1_ray.config import build as build_config
from phi1_ray.config import set_dotted
from phi1_ray.pipeline.plan import Plan, train_outputs
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.report import plot_losses
from phi1_ray.pipeline.stages import Context
from phi1_ray.pipeline.stages.pretrain import train
from phi1_ray.train.config import TrainJobConfig

NAME = "finetune"


def _with_best(p: Plan, best: dict) -> TrainJobConfig:
    """The finetuning job with the sweep's best values (``param.<dotted key>``) spliced in."""
    for key, value in best.items():
        if key.startswith("param."):
            set_dotted(p.fine_data, key.removeprefix("param."), value)
    log(f"finetune: the sweep's best {json.dumps(best)}")
    return build_config(TrainJobConfig, p.fine_data, where="finetune (with the sweep's best)")


def build(ctx: Context) -> Stage:
    p = ctx.plan
    if p.on["tune"]:
        p.jobs[NAME] = _with_best(p, ctx.results["tune"]["best"])
    job = p.jobs[NAME]
    deps = ("pretrain", "tune", "decontaminate", "tokenizer")
    outputs = train_outputs(job, p.ckpt_root)
    return Stage(NAME, deps, outputs, job.model_dump(mode="json"), lambda: train(job, NAME), uses_ray=True)


def after(ctx: Context) -> None:
    p = ctx.plan
    trained = {name: p.run_dir / name for name in ("pretrain", "finetune") if p.on[name]}
    ctx.curves = plot_losses(p.run_dir, trained) if trained else None
    if ctx.curves is not None:
        tracking.log_artifact(ctx.curves)
