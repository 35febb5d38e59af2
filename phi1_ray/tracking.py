"""MLflow, every call of it: the project's only module that imports ``mlflow``.

- :func:`tracking_uri`: a local SQLite store under the run directory unless a URI is given (``MLFLOW_TRACKING_URI``
  wins where a job says so);
- :func:`mlflow_run`: an active run for a job whose process logs as it goes (the pipeline, the quality filter),
  nested under the active run when there is one, the resolved config logged as params and ``config.yaml``;
- :func:`start_run`: a run created (or resumed, from a state file in the run directory) through the client, for
  jobs whose metrics come from other processes (training workers, Tune trials, evaluation actors); parent and
  child runs through tags; an unreachable server gives one warning and ``None``: the job goes on untracked;
- :class:`TrackedRun`: metrics, params and artifacts of such a run from any process that knows its id.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from phi1_ray.config import Section


class MlflowConfig(Section):
    tracking_uri: str | None = None
    """None means a file store under the run directory."""
    experiment: str = "phi1_ray"


PARENT_TAG = "mlflow.parentRunId"
"""The tag that makes a run a child of another in MLflow's UI."""


def tracking_uri(cfg: MlflowConfig, run_dir: str | Path) -> str:
    return cfg.tracking_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 2}}`` -> ``{"model.n_layer": 2}``, the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _quiet() -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def experiment_id(client: Any, name: str, run_dir: str | Path, uri: str, local_artifacts: bool = False) -> str:
    """The id of MLflow experiment ``name``, created when it does not exist yet, its artifacts under
    ``run_dir/mlartifacts`` for a local store (or ``local_artifacts``), else where the server keeps them."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = local_artifacts or uri.startswith("sqlite")
    artifacts = (Path(run_dir).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=artifacts)


@contextmanager
def mlflow_run(cfg: MlflowConfig, run_dir: str | Path, run_name: str, config: BaseModel | None = None) -> Iterator[Any]:
    """An active MLflow run with the resolved config logged as params (and as ``config.yaml``)."""
    import mlflow

    from phi1_ray.config import to_yaml

    _quiet()
    uri = tracking_uri(cfg, run_dir)
    mlflow.set_tracking_uri(uri)
    experiment = experiment_id(mlflow.tracking.MlflowClient(uri), cfg.experiment, run_dir, uri, local_artifacts=True)
    nested = mlflow.active_run() is not None  # a stage of the pipeline job: a child of its run
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, nested=nested) as run:
        if config is not None:
            params = flatten(config.model_dump(mode="json"))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_text(to_yaml(config), "config.yaml")
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics of the active run (:func:`mlflow_run`)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """A file as an artifact of the active run (:func:`mlflow_run`)."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


@dataclass(frozen=True)
class TrackedRun:
    """A run known by id: what any process (a worker, an actor, the driver after ``fit``) logs to it."""

    uri: str | None
    """None: ``MLFLOW_TRACKING_URI``."""
    run_id: str

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self.client().log_batch(self.run_id, metrics=batch)

    def log_metric(self, key: str, value: float) -> None:
        self.client().log_metric(self.run_id, key, float(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifacts(self.run_id, str(directory), artifact_path)


def tracked(uri: str | None, run_id: str | None) -> TrackedRun | None:
    """The run ``run_id`` at ``uri``, or None when either is missing (tracking off or unreachable)."""
    return TrackedRun(uri, run_id) if uri and run_id else None


def start_run(
    uri: str,
    experiment: str,
    run_dir: Path,
    run_name: str,
    tags: dict[str, str] | None = None,
    config: BaseModel | None = None,
    unreachable: str = "the job goes on untracked",
    log: Any = None,
) -> TrackedRun | None:
    """The MLflow run of a job's run directory: the one ``run_dir/mlflow_run.json`` names (a resumed job), else a
    new one with ``tags`` and the config's params and ``config.yaml``. An unreachable server gives one warning
    ending in ``unreachable`` and None."""
    from mlflow.tracking import MlflowClient

    from phi1_ray.config import to_yaml

    _quiet()
    state_file = run_dir / "mlflow_run.json"
    try:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        client = MlflowClient(uri)
        if state_file.is_file():
            run_id = json.loads(state_file.read_text())["run_id"]
            client.get_run(run_id)
            if log:
                log(f"mlflow: continuing run {run_id} at {uri}")
            return TrackedRun(uri, run_id)
        run = client.create_run(experiment_id(client, experiment, run_dir, uri), run_name=run_name, tags=tags or {})
        if config is not None:
            for key, value in flatten(config.model_dump(mode="json")).items():
                client.log_param(run.info.run_id, key, str(value)[:500])
            client.log_text(run.info.run_id, to_yaml(config), "config.yaml")
    except Exception as exc:  # noqa: BLE001 - tracking never stops a job
        warnings.warn(f"MLflow at {uri} is unreachable ({type(exc).__name__}: {exc}); {unreachable}", stacklevel=3)
        return None
    from phi1_ray import storage

    storage.write_json(state_file, {"run_id": run.info.run_id, "tracking_uri": uri})
    if log:
        log(f"mlflow: run {run.info.run_id} at {uri}")
    return TrackedRun(uri, run.info.run_id)


def try_log(what: str, fn: Any, *args: Any, log: Any = None, **kwargs: Any) -> bool:
    """Call a logging function; on any failure one warning (or ``log`` line) saying ``what`` was not logged.
    Tracking never loses a computed result nor stops a job."""
    try:
        fn(*args, **kwargs)
        return True
    except Exception as exc:  # noqa: BLE001
        message = f"MLflow: could not log {what} ({type(exc).__name__}: {exc})"
        if log is not None:
            log(f"warning: {message}")
        else:
            warnings.warn(message, stacklevel=2)
        return False
