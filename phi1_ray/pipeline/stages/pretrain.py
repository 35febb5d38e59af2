"""The pretrain stage: the pretraining job (Ray Train, DeepSpeed) on the prepared data; :func:`train` also runs
the finetuning stage's job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi1_ray.checkpoint import read_run
from phi1_ray.pipeline.plan import train_outputs
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context
from phi1_ray.train.config import TrainJobConfig

NAME = "pretrain"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    job = p.jobs[NAME]
    outputs = train_outputs(job, p.ckpt_root)
    return Stage(NAME, ("data",), outputs, job.model_dump(mode="json"), lambda: train(job, NAME), uses_ray=True)


def train(job: TrainJobConfig, name: str) -> dict[str, Any]:
    """Run (or continue, from its last checkpoint) a training job; returns its summary."""
    from phi1_ray.train.run import loss_summary, run_training

    run = read_run(str(job.run_dir))
    if run is not None:  # finished before the stage record existed
        return {**run, **loss_summary(Path(str(job.run_dir)) / "metrics.jsonl")}
    log(f"{name}: {job.optim.max_steps} steps of {job.model.name or 'the model'} on {job.train.num_workers} workers")
    return run_training(job, log=lambda line: log(f"{name}: {line}"))
