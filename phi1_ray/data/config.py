"""Configs of the data pipeline: corpus sources (local or object storage, any format), cleaning, tokenizing and
packing (``DataConfig``), and ``jobs/prepare_data.py``'s job."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from phi1_ray.config import Section
from phi1_ray.runtime import RayConfig
from phi1_ray.tracking import MlflowConfig

SourceType = Literal["stdlib", "files", "jsonl", "parquet", "datagen"]


class SourceConfig(Section):
    """One corpus source. ``weight`` is how many times each of its documents is seen per epoch (2.0 twice,
    0.5 a seeded half)."""

    type: SourceType
    """``stdlib``: the running interpreter's standard library (no download); ``files``: trees of source/text
    files, one document per file; ``jsonl`` / ``parquet``: one document per line / row; ``datagen``: outputs of the
    data-generation jobs (directories with a manifest: textbooks, exercises, filtered code), their shards read as
    Parquet (``text``, or ``prompt`` / ``completion`` for finetuning)."""
    paths: list[str] = []
    """Files or directories, local or any filesystem pyarrow reaches (``s3://``, ``gs://``)."""
    name: str | None = None
    weight: float = 1.0
    text_key: str = "text"
    prompt_key: str = "prompt"
    """Finetuning records (``data.format: finetune``): the prompt (signature + docstring) column."""
    completion_key: str = "completion"
    extensions: list[str] = [".py"]
    """``files`` / ``stdlib``: which files of a tree are documents."""
    max_bytes: int | None = None
    """Stop adding files once their sizes sum past this (a quick corpus from a big tree)."""
    exercises: bool = False
    """``files`` / ``stdlib`` with ``data.format: finetune``: each top-level function with a docstring becomes a
    record, prompt = signature + docstring, completion = body (CodeExercises mined from real code, offline)."""

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.type != "stdlib" and not self.paths:
            raise ValueError(f"a {self.type!r} source needs paths")
        if self.exercises and self.type not in ("files", "stdlib"):
            raise ValueError(f"exercises needs a 'files' or 'stdlib' source, got type {self.type!r}")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.type if not self.paths else f"{self.type}:{self.paths[0]}")


class DataConfig(Section):
    """Reading, cleaning, tokenizing and packing a corpus into blocks of ``seq_len + 1`` tokens."""

    sources: list[SourceConfig] = [SourceConfig(type="stdlib")]
    tokenizer: str | None = None
    """Tokenizer directory or hub id; jobs that train one fill this in."""
    seq_len: int = 2048
    format: Literal["pretrain", "finetune"] = "pretrain"
    """``finetune``: records with prompt/completion columns (CodeExercises)."""
    loss_on: Literal["all", "completion"] = "all"
    """Finetuning: loss on every token (the paper) or on completions only (a ``loss_mask`` column)."""
    val_fraction: float = 0.0
    """Documents held out for validation, chosen by a seeded hash of (file, line)."""
    shuffle: bool = False
    seed: int = 0
    strict: bool = False
    """Fail on the first bad line instead of quarantining it."""
    invalid_utf8: Literal["replace", "drop"] = "replace"
    doc_boundaries: bool = False
    """Store each block's document start offsets (``doc_starts``) for document masking."""
    docs_per_batch: int = 512
    """Documents per tokenizer call."""
    tokenize_tasks: int | None = None
    """Read + tokenize tasks at once (None: as many as the cluster's CPUs allow). Each tokenizes with the fast
    tokenizer's threads, so 1 per node is often fastest on small machines."""
    rows_per_shard: int = 4096
    rows_per_ray_block: int = 256
    """Packed rows per Ray block: how finely a stream is spread over trainer workers."""
    bytes_per_read_task: int = 4 << 20
    """Files are read in groups of about this many bytes, one Ray task each."""
    quarantine_keep: int = 100_000
    """Bad lines kept verbatim in quarantine.jsonl; beyond that they are only counted."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.sources:
            raise ValueError("sources must name at least one source")
        for i, source in enumerate(self.sources):
            if source.exercises and self.format != "finetune":
                raise ValueError(f"sources[{i}].exercises needs format: finetune (records of prompt + completion)")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for key in (
            "docs_per_batch",
            "rows_per_shard",
            "rows_per_ray_block",
            "bytes_per_read_task",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        return self


class PrepareDataConfig(Section):
    """``jobs/prepare_data.py``: packed Parquet shards + manifest under ``out`` (default ``run_dir/data``)."""

    run_dir: str = "runs/data"
    out: str | None = None
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
