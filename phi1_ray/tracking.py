"""MLflow tracking shared by every job: a local SQLite store under the run directory unless a URI is given."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from phi1_ray.config import MlflowConfig


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


def experiment_id(client: Any, name: str, run_dir: str | Path, uri: str) -> str:
    """The id of MLflow experiment ``name``, created (artifacts under ``run_dir/mlartifacts`` for a local store)
    when it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = (Path(run_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
    return client.create_experiment(name, artifact_location=artifacts)


@contextmanager
def mlflow_run(cfg: MlflowConfig, run_dir: str | Path, run_name: str, config: BaseModel | None = None) -> Iterator[Any]:
    """An active MLflow run with the resolved config logged as params (and as ``config.yaml``)."""
    import logging

    import mlflow

    from phi1_ray.config import to_yaml

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg, run_dir))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        artifacts = (Path(run_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    nested = mlflow.active_run() is not None  # a stage of the pipeline job: a child of its run
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested) as run:
        if config is not None:
            params = flatten(config.model_dump(mode="json"))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_text(to_yaml(config), "config.yaml")
        yield run
