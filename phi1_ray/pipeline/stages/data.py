"""The data stage: the pretraining corpus tokenized and packed once into ``<store>/data`` (Parquet shards and a
manifest), which the pretraining job reads."""

from __future__ import annotations

from typing import Any

from phi1_ray import tracking
from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context

NAME = "data"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    out = f"{p.store}/data"
    run = lambda: make(p.cfg, out, p.tokenizer_path)  # noqa: E731
    return Stage(NAME, ("tokenizer", "decontaminate"), [out], p.cfg.data.model_dump(mode="json"), run, uses_ray=True)


def after(ctx: Context) -> None:
    if NAME in ctx.results:
        data = ctx.results[NAME]
        tracking.log_metrics({"data_tokens": data["tokens"], "data_blocks": data["blocks"]})


def make(cfg: PipelineConfig, out: str, tokenizer_path: str) -> dict[str, Any]:
    from phi1_ray.data.ray_pipeline import prepare

    return prepare(cfg.data.model_copy(update={"tokenizer": tokenizer_path}), out, log=log)
