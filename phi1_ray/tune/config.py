"""Configs of a Ray Tune sweep (``jobs/tune_finetune.py``): the search space, the scheduler, the objective."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from phi1_ray.config import Section
from phi1_ray.runtime import RayConfig
from phi1_ray.tracking import MlflowConfig


class SearchDim(Section):
    """One searched config key: ``loguniform``/``uniform`` (floats in [low, high]), ``randint`` (ints in
    [low, high)), ``choice`` (one of ``values``, sampled) or ``grid`` (every one of ``values``)."""

    type: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"type {self.type} needs a non-empty list of values")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs low and high")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class SchedulerConfig(Section):
    """Early stopping of the sweep's trials on their validation loss (reported at every checkpoint)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    """reports (checkpoints) a trial makes before it can be stopped"""
    reduction_factor: float = 2.0

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        return self


class TuneObjectiveConfig(Section):
    """What ranks the trials: the best validation loss, or HumanEval pass@1 of each finished trial's best checkpoint."""

    metric: Literal["val_loss", "pass@1"] = "val_loss"
    benchmark: str = "humaneval"
    limit: int | None = 20
    """pass@1 on the first N problems (None: all)"""
    max_new_tokens: int = 128


class TuneJobConfig(Section):
    """``jobs/tune_finetune.py``: a Ray Tune sweep whose trials are Ray Train finetuning runs."""

    job: Literal["tune"] = "tune"
    run_dir: str = "runs/tune"
    name: str = "sweep"
    """The Tune experiment's name: the same name and run_dir resume an interrupted sweep."""
    base: str = "configs/finetune/tiny.yaml"
    """The finetuning config every trial starts from."""
    overrides: dict[str, Any] = {}
    """Dotted keys set on the base for every trial (e.g. ``optim.max_steps: 40``)."""
    space: dict[str, SearchDim] = {}
    """Dotted finetuning-config keys and how to search them."""
    searcher: Literal["random", "optuna"] = "random"
    """random (with grid dimensions as a grid); optuna: TPE (``pip install optuna``)."""
    num_samples: int = 4
    """Trials (with grid dimensions: repeats of the whole grid)."""
    max_concurrent_trials: int = 2
    scheduler: SchedulerConfig = SchedulerConfig()
    objective: TuneObjectiveConfig = TuneObjectiveConfig()
    seed: int = 0
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _check(self) -> TuneJobConfig:
        if not self.space:
            raise ValueError("space is empty: name at least one config key to search")
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.searcher == "optuna" and any(d.type == "grid" for d in self.space.values()):
            raise ValueError("searcher optuna takes no grid dimensions (use choice)")
        return self
