"""The pipeline's stages, one module each. Every module has ``NAME``, ``build(ctx) -> Stage`` (called when the
stage is on, after the stages before it: their results are in ``ctx.results``) and, where needed, ``after(ctx)``
(called whether the stage ran, was skipped as finished, or is off)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi1_ray.pipeline.plan import Plan


@dataclass
class Context:
    """What a stage is built from: the plan, the pipeline's MLflow run, the results of the stages before it."""

    plan: Plan
    run_id: str
    """The pipeline's MLflow run (the active run while stages run)."""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: Path | None = None
    """The training stages' loss curves, once drawn."""
