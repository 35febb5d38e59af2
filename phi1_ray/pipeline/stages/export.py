"""The export stage: the best checkpoint of the last training stage as a Hugging Face directory (copied to
object storage when the pipeline's storage is there), attached to the pipeline's MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi1_ray import storage, tracking
from phi1_ray.errors import ConfigError
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context

NAME = "export"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    outputs = [str(p.export_dir)] + ([p.export_uri] if p.export_uri != str(p.export_dir) else [])
    trained = p.run_dir / p.model_stage
    run = lambda: make(trained, p.export_dir, p.export_uri, p.tracking_uri, ctx.run_id)  # noqa: E731
    return Stage(NAME, (p.model_stage,), outputs, {"from": p.model_stage}, run)


def after(ctx: Context) -> None:
    if NAME in ctx.results:
        tracking.log_metrics({"parameters": ctx.results[NAME]["parameters"]})


def make(trained: Path, out: Path, uri_out: str, tracking_uri: str, run_id: str) -> dict[str, Any]:
    from phi1_ray.checkpoint import find_checkpoint
    from phi1_ray.hf import count_parameters
    from phi1_ray.train.run import export

    checkpoint = find_checkpoint(trained)
    if checkpoint is None:
        raise ConfigError(f"export: {trained} has no checkpoint")
    path = export(checkpoint, out, tracking_uri, run_id, log)
    if uri_out != str(out):
        storage.upload(out, uri_out)
        log(f"export: copied to {uri_out}")
    return {"checkpoint": str(checkpoint), "hf": str(path), "uri": uri_out, "parameters": count_parameters(path)}
