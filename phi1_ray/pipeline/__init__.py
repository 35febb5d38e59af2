"""The whole phi-1 recipe as stages (``jobs/pipeline.py``; ``make demo`` runs it on ``configs/pipeline/demo.yaml``).

Stages, in order (:data:`TABLE`, one module each under ``stages/``): tokenizer, datagen (teacher generation,
exercises mined from code, the learned quality filter), decontaminate (against HumanEval/MBPP, then dedup), data
(tokenize and pack), pretrain, tune (optional sweep), finetune, export (Hugging Face format), evaluate (HumanEval
in the sandbox), serve (the export behind the Serve app, one request, shut down).

- ``plan.py``: the config resolved before anything runs (which stages, where outputs go, the jobs' configs);
- ``records.py``: each stage's record in ``run_dir/stages/<stage>.json``, skip / rerun / resume;
- ``stages/<stage>.py``: ``build(ctx)`` makes the stage from the plan and the results before it; an optional
  ``after(ctx)`` runs once the stage is done, skipped or off (a check, a metric, a plot);
- ``report.py``: the summary, the overview a person reads, the loss curves.

Adding a stage means adding one module and one row of :data:`TABLE`.
"""

from __future__ import annotations

import json
from typing import Any

from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.plan import STAGES, Plan, enabled_stages, plan
from phi1_ray.pipeline.records import Stage, Stages, log
from phi1_ray.pipeline.report import pipeline_summary, print_overview
from phi1_ray.pipeline.stages import (
    Context,
    data,
    datagen,
    decontaminate,
    evaluate,
    export,
    finetune,
    pretrain,
    serve,
    tokenizer,
    tune,
)
from phi1_ray.tracking import mlflow_run

TABLE = (tokenizer, datagen, decontaminate, data, pretrain, tune, finetune, export, evaluate, serve)
"""The stage modules, in the order they run (their names are :data:`STAGES`)."""

__all__ = ["STAGES", "TABLE", "Plan", "Stage", "Stages", "enabled_stages", "plan", "run"]


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage of the plan in order (skipping the finished ones); returns the summary."""
    p = plan(cfg)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    need = max(job.train.num_workers for job in p.jobs.values()) + 2  # trainer workers + data tasks

    def start_ray() -> None:
        from phi1_ray.runtime import init_ray

        init_ray(p.cfg.ray, min_cpus=need)

    stages = Stages(p.run_dir, rerun=set(p.cfg.rerun), start_ray=start_ray)
    with mlflow_run(p.cfg.mlflow, p.run_dir, "pipeline", p.cfg) as active:
        ctx = Context(p, run_id=active.info.run_id)
        for module in TABLE:
            name = module.NAME
            if p.on[name]:
                ctx.results[name] = stages.run(module.build(ctx))
            else:
                stages.skip(name, "skipped in the config")
            if hasattr(module, "after"):
                module.after(ctx)
    summary = pipeline_summary(p, ctx.results, stages, ctx.curves, ctx.run_id)
    log("summary:\n" + json.dumps(summary, indent=2, default=str))
    print_overview(summary, p.export_dir)
    return summary
