"""The driver of ``jobs/pretrain.py`` and ``jobs/finetune.py``: checks, data, MLflow, the TorchTrainer, export.

Everything that can be wrong with a config (batch arithmetic, precision, data paths, tokenizer, the checkpoint to
start from) is found here, before any worker starts. Workers run :func:`phi1_ray.train.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.checkpoint import (
    Resolved,
    is_train_checkpoint,
    load_resolved,
    load_train_checkpoint,
    read_train_manifest,
    resolve,
    write_run,
)
from phi1_ray.errors import CheckpointError, ConfigError, Phi1Error
from phi1_ray.tracking import TrackedRun, start_run, tracked, tracking_uri, try_log
from phi1_ray.train.config import TrainJobConfig, resolve_precision

# Model fields a finetuning run may change; the sizes come from the checkpoint it starts from.
RUNTIME_MODEL_FIELDS = ("attn_impl", "attn_pdrop", "resid_pdrop", "embd_pdrop", "gradient_checkpointing", "doc_mask")


def default_run_dir(job: str) -> str:
    return f"runs/{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_from(job: TrainJobConfig) -> Resolved:
    """What ``init_from`` names, resolved once (a ConfigError naming init_from when it is no checkpoint)."""
    assert job.init_from is not None
    try:
        return resolve(job.init_from)
    except Phi1Error as exc:
        raise ConfigError(f"init_from={job.init_from}: {exc}") from None


def checked(job: TrainJobConfig) -> tuple[TrainJobConfig, Resolved | None]:
    """Errors a user can fix, found before Ray starts: (the config with its run directory and model set, the
    checkpoint it starts from)."""
    updates: dict[str, Any] = {}
    if job.run_dir is None:
        updates["run_dir"] = default_run_dir(job.job)
    if job.job == "finetune" and not job.init_from:
        raise ConfigError(
            "init_from is not set: a finetuning run starts from a pretraining run or checkpoint, or "
            "a Hugging Face directory / hub id"
        )
    start = start_from(job) if job.init_from else None
    if start is not None:  # sizes from the checkpoint, runtime options from the config
        try:
            updates["model"] = start.model_config(**{k: getattr(job.model, k) for k in RUNTIME_MODEL_FIELDS})
        except Phi1Error as exc:
            raise ConfigError(str(exc)) from None
    if job.prepared:
        if not storage.exists(storage.join(job.prepared, "manifest.json")):
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
    return (job.model_copy(update=updates) if updates else job), start


def check(job: TrainJobConfig) -> TrainJobConfig:
    """:func:`checked`'s config alone."""
    return checked(job)[0]


def tokenizer_for(job: TrainJobConfig, run_dir: Path, log: Any, start: Resolved | None = None) -> str:
    """The run's tokenizer path: the configured one, the one of the checkpoint it starts from, or one trained
    offline on the data sources (once)."""
    from phi1_ray.tokenizer import check_vocab, has_tokenizer, load_tokenizer, train_from_sources

    if job.data.tokenizer:
        path = job.data.tokenizer
    elif job.init_from:
        start = start or start_from(job)
        if start.tokenizer is None:
            raise ConfigError(f"init_from={job.init_from} has no tokenizer: set data.tokenizer")
        path = start.portable_tokenizer  # workers on other nodes load it too: not this machine's copy
        log(f"tokenizer: {path}, the one of init_from")
    else:
        path = str(run_dir / "tokenizer")
        if has_tokenizer(path):
            log(f"tokenizer: {path} exists, skipped")
        else:
            log(f"tokenizer: training a {job.model.vocab_size}-entry byte-level BPE offline on data.sources")
            train_from_sources(job.data.sources, job.model.vocab_size, path)
    if not storage.is_uri(path) and Path(path).exists():
        path = str(Path(path).resolve())  # workers run elsewhere: a relative path would not reach them
    try:
        check_vocab(load_tokenizer(path), job.model.vocab_size)
    except Phi1Error as exc:
        raise ConfigError(str(exc)) from None
    return path


def _mlflow_start(
    job: TrainJobConfig, run_dir: Path, run_name: str, log: Any, tags: dict[str, str] | None = None
) -> TrackedRun | None:
    """The run's MLflow run, resumed if this run directory had one; None (one warning) when the tracking server
    cannot be reached."""
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(job.mlflow, run_dir)
    unreachable = f"training goes on, metrics are kept in {run_dir / 'metrics.jsonl'}"
    return start_run(uri, job.mlflow.experiment, run_dir, run_name, {"phi1_ray.job": job.job, **(tags or {})},
                     job, unreachable, log)  # fmt: skip


@dataclass
class Prepared:
    """The data a run trains on, checked against its model."""

    tokenizer: str
    data_dir: str
    manifest: dict[str, Any]

    @property
    def has_val(self) -> bool:
        return self.manifest["splits"].get("val", {}).get("blocks", 0) > 0


def _prepare_data(job: TrainJobConfig, run_dir: Path, storage_root: str, name: str, log: Any, start: Any) -> Prepared:
    """Tokenize and pack the run's corpus (or read the prepared one), then check it fits the model and batch."""
    from phi1_ray.data.ray_pipeline import prepare, read_manifest

    tokenizer = tokenizer_for(job, run_dir, log, start)
    # with checkpoints on shared storage the data goes beside them, where every node reads it
    data_dir = job.prepared or (storage.join(storage_root, f"{name}-data") if job.storage_path else run_dir / "data")
    data_dir = storage.resolve(data_dir)
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
    return Prepared(tokenizer, data_dir, manifest)


def _precision(job: TrainJobConfig, log: Any) -> str:
    """Start (or join) Ray with room for the workers, then the precision the machine allows."""
    import ray.data

    from phi1_ray.runtime import gpus_for_training, init_ray

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
    return precision


def _trainer(
    job: TrainJobConfig, loop_config: dict[str, Any], data: Prepared, name: str, storage_root: str, callbacks: Any
) -> Any:
    """The ``TorchTrainer`` of a run: its workers, checkpoints (best by validation loss when asked) and streams."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from phi1_ray.data.ray_pipeline import ingest_config, prepared_dataset
    from phi1_ray.train.worker import train_loop_per_worker

    datasets = {"train": prepared_dataset(data.data_dir, "train")}
    if data.has_val:
        datasets["val"] = prepared_dataset(data.data_dir, "val")
    score = {"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if job.train.keep_best else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=job.train.num_workers,
            use_gpu=job.train.use_gpu,
            resources_per_worker=job.train.resources_per_worker or None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_root,
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.num_to_keep, **score),
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=ingest_config(equal=True),
    )


def _initial_state(start: Resolved | None, log: Any) -> Any:
    """The weights a run starts from, in Ray's object store (every worker reads the same copy)."""
    if start is None:
        return None
    import ray

    model, _ = load_resolved(start)
    log(f"init: {model.num_parameters():,} parameters from {start.source}")
    return ray.put({k: v.contiguous() for k, v in model.state_dict().items()})


def run_training(
    job: TrainJobConfig, log: Any = print, callbacks: list[Any] | None = None, mlflow_tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train as ``job`` says; returns a summary (steps, losses, checkpoint and export paths).

    ``callbacks``: Ray Train callbacks (a Tune sweep passes ``TuneReportCallback``); ``mlflow_tags``: tags of the
    run's MLflow run (a sweep's trials name their parent run)."""
    job, start = checked(job)
    assert job.run_dir is not None
    run_dir = Path(job.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    name = job.name or run_dir.name
    storage_root = storage.resolve(job.storage_path or run_dir / "checkpoints")
    precision = _precision(job, log)
    data = _prepare_data(job, run_dir, storage_root, name, log, start)
    init_state = _initial_state(start, log)
    mlflow = _mlflow_start(job, run_dir, name, log, mlflow_tags)
    loop_config = {
        "job": job.model_dump(mode="json"),
        "precision": precision,
        "init_state": init_state,
        "has_val": data.has_val,
        "tokenizer": data.tokenizer,
        "metrics_file": str(run_dir / "metrics.jsonl"),
        "tracking_uri": mlflow.uri if mlflow else None,
        "mlflow_run_id": mlflow.run_id if mlflow else None,
    }
    trainer = _trainer(job, loop_config, data, name, storage_root, callbacks)
    log(
        f"train: {job.train.num_workers} workers, {precision}, ZeRO-{job.train.zero_stage}, "
        f"{job.train.grad_accum} micro-batches of {job.train.micro_batch} per step, {job.optim.max_steps} steps "
        f"-> {storage_root}/{name}"
    )
    result = trainer.fit()
    if result.metrics and result.metrics.get("error"):
        raise Phi1Error(result.metrics["error"])
    latest = result.checkpoint.path if result.checkpoint else None
    best = None
    if job.train.keep_best and result.best_checkpoints:
        best = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", math.inf))[0].path
    run = {"name": name, "storage": f"{storage_root}/{name}", "latest": latest, "best": best,
           "mlflow_run_id": loop_config["mlflow_run_id"], "tracking_uri": loop_config["tracking_uri"]}  # fmt: skip
    write_run(run_dir, run)
    summary = {"run_dir": str(run_dir), **run, **loss_summary(run_dir / "metrics.jsonl")}
    if job.export and (best or latest) and not storage.is_uri(best or latest):
        summary["hf"] = str(export(best or latest, run_dir / "hf", run["tracking_uri"], run["mlflow_run_id"], log))
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

    if not is_train_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a training checkpoint")
    model, tokenizer = load_train_checkpoint(checkpoint)
    path = export_hf(model, out, tokenizer)
    log(f"export: step {read_train_manifest(checkpoint)['step']} -> {path} (Hugging Face format)")
    run = tracked(uri, run_id)
    if run is not None:
        try_log(f"the export (it stays at {path})", run.log_artifacts, path, "hf")
    return path
