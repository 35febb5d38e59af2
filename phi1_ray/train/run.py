"""The driver of ``jobs/pretrain.py`` and ``jobs/finetune.py``: checks, data, MLflow, the TorchTrainer, export.

Everything that can be wrong with a config (batch arithmetic, precision, data paths, tokenizer, the checkpoint to
start from) is found here, before any worker starts. Workers run :func:`phi1_ray.train.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from phi1_ray.config import ModelConfig, TrainJobConfig, build, resolve_precision
from phi1_ray.errors import CheckpointError, ConfigError, Phi1Error
from phi1_ray.train.checkpoints import RUN_FILE, find_checkpoint, is_train_checkpoint, read_train_manifest

# Model fields a finetuning run may change; the sizes come from the checkpoint it starts from.
RUNTIME_MODEL_FIELDS = ("attn_impl", "attn_pdrop", "resid_pdrop", "embd_pdrop", "gradient_checkpointing", "doc_mask")


def default_run_dir(job: str) -> str:
    return f"runs/{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def _init_model_config(job: TrainJobConfig) -> tuple[ModelConfig, str]:
    """The model of a run that starts from ``init_from``: sizes from there, runtime options from the config."""
    source = job.init_from
    assert source is not None
    if "://" in source:  # object storage: a local copy (load_model reads the same one)
        from phi1_ray.checkpoint import localize

        source = localize(source)
    found = find_checkpoint(source) if Path(source).exists() else None
    if found is not None:
        fields = read_train_manifest(found)["model"]
        origin = str(found)
    elif Path(source).exists() and (Path(source) / "phi1_ray.json").is_file():
        fields = json.loads((Path(source) / "phi1_ray.json").read_text())["model"]
        origin = source
    elif not Path(source).exists() or (Path(source) / "config.json").is_file():
        from phi1_ray.hf import config_from_hf, read_json, resolve_hf_path

        try:
            directory = resolve_hf_path(source)
        except Phi1Error as exc:
            raise ConfigError(f"init_from: {exc}") from None
        fields = config_from_hf(read_json(directory / "config.json")).model_dump(mode="json")
        origin = str(directory)
    else:
        raise ConfigError(
            f"init_from={source}: neither a training run or checkpoint, a phi1_ray model directory, nor a Hugging "
            "Face directory (no phi1_ray_train.json, run.json, phi1_ray.json or config.json)"
        )
    fields = {k: v for k, v in fields.items() if k != "name"}
    fields.update({k: getattr(job.model, k) for k in RUNTIME_MODEL_FIELDS})
    return build(ModelConfig, fields, where="model", source=origin), origin


def check(job: TrainJobConfig) -> TrainJobConfig:
    """Errors a user can fix, found before Ray starts; returns the config with its run directory and model set."""
    updates: dict[str, Any] = {}
    if job.run_dir is None:
        updates["run_dir"] = default_run_dir(job.job)
    if job.job == "finetune" and not job.init_from:
        raise ConfigError(
            "init_from is not set: a finetuning run starts from a pretraining run or checkpoint, or "
            "a Hugging Face directory / hub id"
        )
    if job.init_from:
        model, _ = _init_model_config(job)
        updates["model"] = model
    if job.prepared:
        from phi1_ray.data.read import path_exists

        if not path_exists(f"{job.prepared.rstrip('/')}/manifest.json"):
            raise ConfigError(f"prepared={job.prepared}: no manifest.json there; run jobs/prepare_data.py first")
    else:
        from phi1_ray.data.read import list_files

        try:
            list_files(job.data.sources)
        except Phi1Error as exc:
            raise ConfigError(f"data.sources: {exc}") from None
    if job.train.keep_best and not job.prepared and job.data.val_fraction <= 0:
        raise ConfigError("train.keep_best needs a validation split: set data.val_fraction > 0")
    n_positions = updates.get("model", job.model).n_positions
    if job.data.seq_len > n_positions:
        raise ConfigError(f"data.seq_len ({job.data.seq_len}) exceeds the model's context ({n_positions} positions)")
    return job.model_copy(update=updates) if updates else job


def _tokenizer(job: TrainJobConfig, run_dir: Path, log: Any) -> str:
    """The run's tokenizer path: the configured one, or one trained offline on the data sources (once)."""
    from phi1_ray.tokenizer import check_vocab, has_tokenizer, load_tokenizer, train_from_sources

    if job.data.tokenizer:
        path = job.data.tokenizer
    elif job.init_from:
        path = _init_tokenizer(job.init_from)
        log(f"tokenizer: {path}, the one of init_from")
    else:
        path = str(run_dir / "tokenizer")
        if has_tokenizer(path):
            log(f"tokenizer: {path} exists, skipped")
        else:
            log(f"tokenizer: training a {job.model.vocab_size}-entry byte-level BPE offline on data.sources")
            train_from_sources(job.data.sources, job.model.vocab_size, path)
    if Path(path).exists():
        path = str(Path(path).resolve())  # workers run elsewhere: a relative path would not reach them
    try:
        check_vocab(load_tokenizer(path), job.model.vocab_size)
    except Phi1Error as exc:
        raise ConfigError(str(exc)) from None
    return path


def _init_tokenizer(source: str) -> str:
    """The tokenizer a finetuning run inherits from the model it starts from."""
    from phi1_ray.tokenizer import has_tokenizer

    if not Path(source).exists():
        return source  # a hub id: its tokenizer lives beside the weights
    found = find_checkpoint(source)
    for candidate in ([found / "tokenizer"] if found else []) + [Path(source), Path(source) / "hf"]:
        if has_tokenizer(candidate):
            return str(candidate)
    raise ConfigError(f"init_from={source} has no tokenizer: set data.tokenizer")


def _mlflow_start(
    job: TrainJobConfig, run_dir: Path, run_name: str, log: Any, tags: dict[str, str] | None = None
) -> tuple[str | None, str | None]:
    """(tracking URI, run id) of the run's MLflow run, resumed if this run directory had one; (None, None) with
    a warning when the tracking server cannot be reached."""

    import mlflow

    from phi1_ray.config import to_yaml
    from phi1_ray.tracking import experiment_id, flatten, tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(job.mlflow, run_dir)
    state_file = run_dir / "mlflow_run.json"
    try:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        mlflow.set_tracking_uri(uri)
        client = mlflow.tracking.MlflowClient(uri)
        if state_file.is_file():
            run_id = json.loads(state_file.read_text())["run_id"]
            client.get_run(run_id)
            log(f"mlflow: continuing run {run_id} at {uri}")
            return uri, run_id
        experiment = experiment_id(client, job.mlflow.experiment, run_dir, uri)
        run = client.create_run(experiment, run_name=run_name, tags={"phi1_ray.job": job.job, **(tags or {})})
        params = flatten(job.model_dump(mode="json"))
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value)[:500])
        client.log_text(run.info.run_id, to_yaml(job), "config.yaml")
    except Exception as exc:
        warnings.warn(
            f"MLflow at {uri} is unreachable ({type(exc).__name__}: {exc}); training goes on, metrics "
            f"are kept in {run_dir / 'metrics.jsonl'}",
            stacklevel=2,
        )
        return None, None
    state_file.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}) + "\n")
    log(f"mlflow: run {run.info.run_id} at {uri}")
    return uri, run.info.run_id


def run_training(
    job: TrainJobConfig, log: Any = print, callbacks: list[Any] | None = None, mlflow_tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train as ``job`` says; returns a summary (steps, losses, checkpoint and export paths).

    ``callbacks``: Ray Train callbacks (a Tune sweep passes ``TuneReportCallback``); ``mlflow_tags``: tags of the
    run's MLflow run (a sweep's trials name their parent run)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from phi1_ray.data.ray_pipeline import ingest_config, prepare, prepared_dataset, read_manifest
    from phi1_ray.runtime import gpus_for_training, init_ray
    from phi1_ray.train.worker import train_loop_per_worker

    job = check(job)
    assert job.run_dir is not None
    run_dir = Path(job.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    name = job.name or run_dir.name
    storage = job.storage_path or str(run_dir / "checkpoints")
    if "://" not in storage:
        storage = str(Path(storage).resolve())

    worker_cpus = (job.train.resources_per_worker or {}).get("CPU", 1)
    init_ray(job.ray, min_cpus=int(math.ceil(job.train.num_workers * worker_cpus)) + 2)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the workers print one progress line
    has_gpu = gpus_for_training(job.train.use_gpu, job.ray)
    if job.train.use_gpu and not has_gpu:  # a cluster may still add GPU nodes; this machine will not
        raise ConfigError(
            "train.use_gpu is true but this machine has no GPUs; set train.use_gpu=false to train on CPUs"
        )
    precision, note = resolve_precision(job.train.precision, has_gpu)
    if note:
        log(note)

    tokenizer = _tokenizer(job, run_dir, log)
    # with checkpoints on shared storage the data goes beside them, where every node reads it
    data_dir = job.prepared or (f"{storage}/{name}-data" if job.storage_path else str(run_dir / "data"))
    if "://" not in data_dir:
        data_dir = str(Path(data_dir).resolve())
    if job.prepared:
        manifest = read_manifest(job.prepared)
    else:
        manifest = prepare(job.data.model_copy(update={"tokenizer": tokenizer}), data_dir, log=log)
    if manifest["seq_len"] != job.data.seq_len:
        raise ConfigError(
            f"data.seq_len is {job.data.seq_len} but {data_dir} was packed with seq_len {manifest['seq_len']}"
        )
    if manifest["tokenizer"]["size"] > job.model.vocab_size:
        raise ConfigError(
            f"{data_dir} was tokenized with {manifest['tokenizer']['size']} entries, more than "
            f"model.vocab_size ({job.model.vocab_size})"
        )
    train_blocks = manifest["splits"]["train"]["blocks"]
    per_step = job.train.micro_batch * job.train.num_workers
    if train_blocks < per_step:
        raise ConfigError(
            f"{data_dir} holds {train_blocks} training blocks, fewer than one micro-batch per worker "
            f"(train.micro_batch x train.num_workers = {per_step})"
        )
    has_val = manifest["splits"].get("val", {}).get("blocks", 0) > 0

    init_state = None
    if job.init_from:
        from phi1_ray.checkpoint import load_model

        model, _ = load_model(job.init_from)
        init_state = ray.put({k: v.contiguous() for k, v in model.state_dict().items()})
        log(f"init: {model.num_parameters():,} parameters from {job.init_from}")

    uri, run_id = _mlflow_start(job, run_dir, name, log, mlflow_tags)
    datasets = {"train": prepared_dataset(data_dir, "train")}
    if has_val:
        datasets["val"] = prepared_dataset(data_dir, "val")
    score = {"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if job.train.keep_best else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "precision": precision,
            "init_state": init_state,
            "has_val": has_val,
            "tokenizer": tokenizer,
            "metrics_file": str(run_dir / "metrics.jsonl"),
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=job.train.num_workers,
            use_gpu=job.train.use_gpu,
            resources_per_worker=job.train.resources_per_worker or None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.num_to_keep, **score),
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=ingest_config(equal=True),
    )
    log(
        f"train: {job.train.num_workers} workers, {precision}, ZeRO-{job.train.zero_stage}, "
        f"{job.train.grad_accum} micro-batches of {job.train.micro_batch} per step, {job.optim.max_steps} steps "
        f"-> {storage}/{name}"
    )
    result = trainer.fit()
    if result.metrics and result.metrics.get("error"):
        raise Phi1Error(result.metrics["error"])
    latest = result.checkpoint.path if result.checkpoint else None
    best = None
    if job.train.keep_best and result.best_checkpoints:
        best = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", math.inf))[0].path
    run = {
        "name": name,
        "storage": f"{storage}/{name}",
        "latest": latest,
        "best": best,
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
    }
    (run_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")

    summary = {"run_dir": str(run_dir), **run, **loss_summary(run_dir / "metrics.jsonl")}
    if job.export and (best or latest) and "://" not in str(best or latest):
        summary["hf"] = str(export(best or latest, run_dir / "hf", uri, run_id, log))
    return summary


def loss_summary(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    out: dict[str, Any] = {}
    if losses:
        out.update(first_loss=losses[0][1], last_loss=losses[-1][1], steps=losses[-1][0])
    if vals:
        out.update(first_val_loss=vals[0][1], last_val_loss=vals[-1][1], best_val_loss=min(v for _, v in vals))
    return out


def export(checkpoint: str | Path, out: Path, uri: str | None, run_id: str | None, log: Any = print) -> Path:
    """Consolidate a training checkpoint into a Hugging Face directory and attach it to the MLflow run."""
    from phi1_ray.hf import export_hf
    from phi1_ray.train.checkpoints import load_train_checkpoint

    if not is_train_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a training checkpoint")
    model, tokenizer = load_train_checkpoint(checkpoint)
    path = export_hf(model, out, tokenizer)
    log(f"export: step {read_train_manifest(checkpoint)['step']} -> {path} (Hugging Face format)")
    if uri and run_id:
        try:
            import mlflow

            mlflow.tracking.MlflowClient(uri).log_artifacts(run_id, str(path), "hf")
        except Exception as exc:
            warnings.warn(f"MLflow artifact upload failed ({exc}); the export stays at {path}", stacklevel=2)
    return path
