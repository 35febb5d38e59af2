"""Typed configuration shared by every phi1_ray job.

A job's config is a tree of pydantic models. It is built from a YAML file under ``configs/`` plus dotted
command-line overrides (``model.n_layer=4``) and validated at load time: an unknown key or a bad value raises
:class:`ConfigError` naming the key and what it accepts.

Model sizes come from named presets (``phi-1``, ``phi-1-small``, ``tiny``); any field of the preset can be
overridden next to the name::

    model:
      name: tiny
      n_layer: 4
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo

from phi1_ray.errors import ConfigError

AttnImpl = Literal["sdpa", "flash_attn", "eager"]

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's 1.3B model: 24 layers, hidden 2048, MLP 8192, 32 heads of 64.
    "phi-1": {"n_layer": 24, "n_embd": 2048, "n_inner": 8192, "n_head": 32},
    # The paper's 350M model.
    "phi-1-small": {"n_layer": 20, "n_embd": 1024, "n_inner": 4096, "n_head": 16},
    # A ~1M-parameter model for CPU tests and the demo; small vocab so a CPU step is cheap.
    "tiny": {
        "n_layer": 2,
        "n_embd": 128,
        "n_inner": 512,
        "n_head": 2,
        # the offline tokenizer of phi1_ray.tokenizer: 4096 entries, <|endoftext|> = 0
        "vocab_size": 4096,
        "eos_token_id": 0,
        "bos_token_id": 0,
    },
}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and the docstring under a
    field is its description (what a job's ``--help`` lists)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), use_attribute_docstrings=True
    )

    renamed_keys: ClassVar[dict[str, str]] = {}
    """Old spellings still read: a key this section once had -> its name now."""

    @model_validator(mode="before")
    @classmethod
    def _read_renamed_keys(cls, data: Any) -> Any:
        if not cls.renamed_keys or not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in cls.renamed_keys.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old} is the old name of {new}: give one of them")
                data[new] = data.pop(old)
        return data


class ModelConfig(Section):
    """Sizes and options of the phi-1 network (Hugging Face ``PhiForCausalLM`` semantics)."""

    name: str | None = None
    """Preset the other fields start from (``phi-1``, ``phi-1-small``, ``tiny``); None means all fields given."""
    vocab_size: int = 51200
    n_layer: int = 24
    n_embd: int = 2048
    n_inner: int = 8192
    n_head: int = 32
    rotary_dim: int = 32
    """Rotary embedding on the first ``rotary_dim`` dims of each head (NeoX style); the rest pass through."""
    rope_theta: float = 10000.0
    n_positions: int = 2048
    """Context length."""
    layer_norm_eps: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    initializer_range: float = 0.02
    attn_impl: AttnImpl = "sdpa"
    doc_mask: bool = False
    """Packed rows: positions restart after each EOS and no token attends across a document boundary."""
    eos_token_id: int = 50256
    bos_token_id: int = 50256
    gradient_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is not None:
            name = data["name"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        positive = ("vocab_size", "n_layer", "n_embd", "n_inner", "n_head", "n_positions")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id ({self.eos_token_id}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """``ModelConfig.from_name("phi-1", n_layer=4)``."""
        return build(cls, {"name": name, **overrides}, where="model")


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


class TokenizerConfig(Section):
    """Where the tokenizer comes from: a local directory or hub id, or trained offline on ``sources``."""

    path: str | None = None
    """Directory or Hugging Face hub id (for example ``microsoft/phi-1``); None trains one offline."""
    vocab_size: int = 4096
    """Size of a tokenizer trained offline (BPE merges + 256 bytes + special and whitespace tokens)."""
    sources: list[SourceConfig] = [SourceConfig(type="stdlib", max_bytes=8_000_000)]
    """Corpus a tokenizer is trained on."""


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


class RayConfig(Section):
    address: str | None = None
    """None: the cluster this job was submitted to, else a new local instance."""
    num_cpus: int | None = None
    """Local instance only: CPUs it may use (default: all)."""


DEFAULT_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a benchmark completion ends: the function body stops where a new top-level block begins."""


class SamplingConfig(Section):
    """Decoding settings shared by the generate job, evaluation, serving and the data-generation teacher."""

    max_new_tokens: int = 128
    """Tokens generated at most after the prompt."""
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability; 1 disables it."""
    seed: int | None = None
    """Seed of the sampling generator; None: unseeded."""
    stop: list[str] = []
    """Stop sequences: the text ends before the first one."""

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


Precision = Literal["fp16", "bf16", "fp32"]


class OptimConfig(Section):
    """AdamW with linear warmup then linear decay (the paper's recipe; defaults are pretraining's)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 750
    max_steps: int = 36_000
    min_lr: float = 0.0
    """LR reached at ``max_steps`` by the linear decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables it."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        return self


class TrainConfig(Section):
    """Batch arithmetic, precision and ZeRO settings of a DeepSpeed training run on Ray Train."""

    effective_batch: int = 1024
    """Sequences per optimizer step = micro_batch x num_workers x gradient accumulation."""
    micro_batch: int = 8
    """Sequences per worker per forward/backward."""
    num_workers: int = 8
    use_gpu: bool = True
    resources_per_worker: dict[str, float] = {}
    precision: Precision = "fp16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    """ZeRO-3 only: parameters offloaded to CPU."""
    log_every: int = 10
    eval_every: int = 1000
    eval_batches: int = 50
    checkpoint_every: int = 1000
    num_to_keep: int | None = 3
    keep_best: bool = False
    """Keep the checkpoint with the lowest validation loss (finetuning)."""
    max_failures: int = 3
    max_nonfinite_steps: int = 20
    """Consecutive non-finite losses that stop the run (the last good checkpoint stays)."""
    compile: bool = False
    """``torch.compile`` the model in each worker (GPUs: fuses dropout, GELU, LayerNorm and rotary kernels)."""
    deepspeed: dict[str, Any] = {}
    """Extra DeepSpeed config keys, merged over the generated ones (e.g. ``{zero_optimization: {overlap_comm:
    false}}``)."""
    peak_tflops: float | None = None
    """Dense fp16/bf16 peak of one accelerator for MFU; None: looked up for A100/H100/H200, else MFU is n/a."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for key in ("effective_batch", "micro_batch", "num_workers", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        per_step = self.micro_batch * self.num_workers
        if self.effective_batch % per_step:
            raise ValueError(
                f"effective_batch ({self.effective_batch}) must be a multiple of micro_batch x num_workers "
                f"({self.micro_batch} x {self.num_workers} = {per_step}); e.g. effective_batch="
                f"{max(per_step, self.effective_batch // per_step * per_step)}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.effective_batch // (self.micro_batch * self.num_workers)


def resolve_precision(requested: str, has_gpu: bool) -> tuple[str, str | None]:
    """The precision a run can use, and the one line saying why it differs from the one asked for.

    DeepSpeed refuses fp16 without a GPU; there the run trains in fp32 instead of failing. fp32, not bf16:
    on CPUs without bf16 matrix units a bf16 step is about 15 times slower than fp32 (measured on a 2-core EPYC:
    0.91 s vs 0.06 s for the tiny model). Asking for ``bf16`` explicitly still gets bf16.
    """
    if requested == "fp16" and not has_gpu:
        return "fp32", "train.precision=fp16 needs a GPU (DeepSpeed refuses it on CPU); training in fp32 instead"
    return requested, None


class MlflowConfig(Section):
    tracking_uri: str | None = None
    """None means a file store under the run directory."""
    experiment: str = "phi1_ray"


class TrainJobConfig(Section):
    """``jobs/pretrain.py`` and ``jobs/finetune.py``: a Ray Train ``TorchTrainer`` of DeepSpeed workers."""

    job: Literal["pretrain", "finetune"] = "pretrain"
    run_dir: str | None = None
    """Checkpoints, MLflow store, logs and exports; default ``runs/<job>-<timestamp>``."""
    name: str | None = None
    """Ray Train run name (default: the run directory's name). Same name + storage continues a stopped run."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints: a local directory, ``s3://`` or ``gs://`` (default ``run_dir``)."""
    init_from: str | None = None
    """Finetuning: a pretraining run directory or checkpoint, a phi1_ray model directory, or a Hugging Face
    directory / hub id (e.g. the released phi-1 base weights)."""
    prepared: str | None = None
    """Prepared shards (``jobs/prepare_data.py``); None: ``data`` is prepared into ``run_dir/data`` first."""
    seed: int = 0
    model: ModelConfig = ModelConfig(name="phi-1", attn_pdrop=0.1, resid_pdrop=0.1)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    export: bool = True
    """Consolidate the final (or best) checkpoint into a Hugging Face directory ``run_dir/hf``."""


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


class GenerateJobConfig(Section):
    """``jobs/generate.py``: one prompt completed by a checkpoint."""

    checkpoint: str
    """A phi1_ray checkpoint or training run, a Hugging Face directory or hub id, or an ``s3://`` / ``gs://`` URI."""
    prompt: str
    tokenizer: str | None = None
    """Tokenizer directory or hub id, when the checkpoint has none."""
    sampling: SamplingConfig = SamplingConfig()
    stream: bool = False
    """Print the text as it is decoded."""
    json_output: bool = False
    """Print one JSON object, ``{"completion": str, "token_ids": [int, ...]}`` (the new tokens only)."""


class ExportJobConfig(Section):
    """``jobs/export.py``: a checkpoint as a Hugging Face directory (transformers, vLLM; no trust_remote_code)."""

    checkpoint: str
    """A training run directory (its best, else latest checkpoint), a training checkpoint (its ZeRO shards are
    consolidated first), a phi1_ray checkpoint, or a Hugging Face directory / hub id."""
    out: str
    """The output directory."""


class PrepareDataConfig(Section):
    """``jobs/prepare_data.py``: packed Parquet shards + manifest under ``out`` (default ``run_dir/data``)."""

    run_dir: str = "runs/data"
    out: str | None = None
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()


class TrainTokenizerConfig(Section):
    """``jobs/train_tokenizer.py``: a codegen-style byte-level BPE trained offline."""

    run_dir: str = "runs/tokenizer"
    out: str | None = None
    """Tokenizer directory (default ``run_dir/tokenizer``)."""
    tokenizer: TokenizerConfig = TokenizerConfig()


class StageJobConfig(Section):
    """A training stage of the pipeline: a job config file plus nested overrides of it."""

    config: str | None = None
    """``configs/pretrain/*.yaml`` or ``configs/finetune/*.yaml``."""
    overrides: dict[str, Any] = {}
    """Merged over the file, key by key (``{optim: {max_steps: 50}}``)."""


class EvalStageConfig(SamplingConfig):
    """The pipeline's evaluation stage: the finetuned checkpoint on a benchmark, scored in the sandbox. The sampling
    keys are :class:`SamplingConfig`'s with evaluation's defaults (``top_p`` 0.95, cut at :data:`DEFAULT_STOP`);
    ``seed`` None means the pipeline's ``seed``."""

    enabled: bool = True
    benchmark: str = "humaneval"
    """humaneval, mbpp or a JSONL file in the HumanEval schema"""
    limit: int | None = None
    """only the first N problems (None: all)"""
    n: int = 1
    """samples per problem"""
    top_p: float = 0.95
    stop: list[str] = list(DEFAULT_STOP)
    timeout_s: float = 3.0
    actors: int = 1
    """Ray Data actors generating completions (one model replica each)"""
    use_gpu: bool = False
    """one GPU per actor"""

    @model_validator(mode="after")
    def _check_stage(self) -> EvalStageConfig:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        for name in ("n", "max_new_tokens", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        return self


class ServeStageConfig(Section):
    """The pipeline's last stage: the exported checkpoint behind the Serve app, one request through HTTP, shut down."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    prompt: str = "def is_even(n):\n"
    max_tokens: int = 24

    @model_validator(mode="after")
    def _check(self) -> ServeStageConfig:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        return self


class GenerateFiles(Section):
    """Generation job configs of the pipeline's datagen stage (``jobs/generate_textbooks.py``'s and
    ``jobs/generate_exercises.py``'s files; their ``out`` is set by the pipeline)."""

    textbooks: list[str] = []
    """Synthetic textbooks: they join the pretraining corpus."""
    exercises: list[str] = []
    """Teacher-written CodeExercises: decontaminated, they join the finetuning corpus."""


class DatagenStageConfig(Section):
    """The pipeline's data-generation stage, offline: exercises mined from code and decontaminated against the
    benchmarks, code scored by the learned quality filter, both deduplicated together. The filtered code becomes
    the pretraining corpus and the exercises the finetuning one (``data.sources`` and the finetuning sources are
    then set by the pipeline). The serving stage ends with a short generation against the served checkpoint."""

    enabled: bool = False
    exercises: list[SourceConfig] = [SourceConfig(type="stdlib", max_bytes=4_000_000)]
    """Code whose functions with docstrings become exercises (no teacher)."""
    code: list[SourceConfig] = [SourceConfig(type="stdlib", max_bytes=3_000_000)]
    """The code corpus the quality filter scores."""
    labels: str | None = "heuristic"
    """Labels of the filter's sample: ``heuristic`` (offline), a JSONL file (``text``, ``label``), or null: the teacher
    (``teacher``) labels ``annotate`` documents."""
    annotate: int = 400
    threshold: float = 0.5
    encoder: str | None = None
    """Embeddings for the filter and decontamination: a checkpoint directory; None: a randomly initialized
    ``tiny`` model with the pipeline's tokenizer (random features; nothing is pretrained yet)."""
    generate: GenerateFiles = GenerateFiles()
    """Teacher generation configs run as part of the stage, each into ``datagen/generated/<file name>``."""
    teacher: dict[str, Any] = {}
    """The filter's teacher (``TeacherConfig`` keys) when ``labels`` is null: the teacher labels the sample."""
    benchmarks: list[str] = ["humaneval"]
    dedup_threshold: float = 0.8
    served_items: int = 8
    """Exercises generated against the served export at the end of the serving stage (0: none)."""


class TuneStageConfig(Section):
    """An optional Ray Tune sweep before finetuning (``jobs/tune_finetune.py``'s config): its trials start from the
    pipeline's pretraining checkpoint on the finetuning data; the best trial's hyperparameters go into finetuning."""

    enabled: bool = False
    config: str = "configs/tune/tiny.yaml"
    overrides: dict[str, Any] = {}
    """Merged over the file, key by key (``{num_samples: 2}``)."""


StageName = Literal[
    "tokenizer", "datagen", "decontaminate", "data", "pretrain", "tune", "finetune", "export", "evaluate", "serve"
]


class PipelineConfig(Section):
    """The end-to-end job (``jobs/pipeline.py``): the whole recipe as stages, each skipped when its outputs exist."""

    run_dir: str = "runs/demo"
    """Stage markers, tokenizer, metrics, evaluation and the export (small files)."""
    storage: str | None = None
    """Where the large outputs go: generated corpora, prepared data, checkpoints (``s3://bucket/phi1``,
    ``gs://...`` or a shared directory). None: under ``run_dir``. On a multi-node cluster every node must see it."""
    seed: int = 0
    skip: list[StageName] = []
    """Stages not to run (``skip=[serve]``); also each stage section's ``enabled: false``."""
    rerun: list[StageName] = []
    """Stages to run again even though their outputs exist (``rerun=[finetune]``); the stages after them follow."""
    model: ModelConfig = ModelConfig(name="tiny")
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig(sources=[SourceConfig(type="stdlib", max_bytes=4_000_000)], seq_len=256)
    ray: RayConfig = RayConfig()
    prompts: list[str] = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n']
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=48)
    mlflow: MlflowConfig = MlflowConfig()
    pretrain: StageJobConfig = StageJobConfig(config="configs/pretrain/tiny.yaml")
    finetune: StageJobConfig = StageJobConfig(config="configs/finetune/tiny.yaml")
    datagen: DatagenStageConfig = DatagenStageConfig()
    tune: TuneStageConfig = TuneStageConfig()
    evaluation: EvalStageConfig = EvalStageConfig()
    serving: ServeStageConfig = ServeStageConfig()


C = TypeVar("C", bound=BaseModel)
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _format_error(err: dict[str, Any], cls: type[BaseModel], where: str, flags: Mapping[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(([where] if where else []) + loc)
    if err["type"] == "extra_forbidden":
        section = _section_at(cls, loc[:-1])
        valid = sorted(section.model_fields) if section else []
        renamed = list(getattr(section, "renamed_keys", {}))
        close = difflib.get_close_matches(loc[-1], valid + renamed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: unknown key{hint}; valid keys: {', '.join(valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{key or '<root>'}{_flags_of(key, msg, flags)}: {msg}"


def _flags_of(key: str, msg: str, flags: Mapping[str, str]) -> str:
    """`` (--flag)`` for the command-line flags behind ``key``: the flag that sets it or, for a section's own
    check, the flags of the section's keys its message names."""
    named = []
    for dotted, flag in flags.items():
        section, _, name = dotted.rpartition(".")
        if dotted == key or (section == key and re.search(rf"\b{re.escape(name)}\b", msg)):
            named.append(flag)
    return f" ({', '.join(named)})" if named else ""


def _section_at(cls: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = cls.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def build(
    cls: type[C],
    data: dict[str, Any],
    where: str = "",
    source: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> C:
    """Validate ``data`` as ``cls``; every problem is reported with its dotted key (and, from ``flags``: dotted key
    -> command-line flag, the flag that set it)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, cls, where, flags or {}) for e in exc.errors()]
        origin = f" in {source}" if source else ""
        raise ConfigError(f"invalid config{origin}:\n  " + "\n  ".join(lines)) from None


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config, as ``--help`` lists it."""

    key: str
    type: str
    default: str
    doc: str


def config_keys(cls: type[BaseModel], prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of ``cls``, sections expanded (``optim.lr``), with its type, default and field docstring."""
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from config_keys(ann, f"{prefix}{name}.")
            continue
        default = "required" if field.is_required() else _short(_plain(field.get_default(call_default_factory=True)))
        yield KeyDoc(prefix + name, _type_name(ann), default, " ".join(field_doc(cls, name).split()))


def field_doc(cls: type[BaseModel], name: str) -> str:
    """A field's docstring; a field redeclared without one (a subclass's new default) keeps its base's."""
    for base in cls.__mro__:
        field = getattr(base, "model_fields", {}).get(name)
        if isinstance(field, FieldInfo) and field.description:
            return field.description
    return ""


def field_at(cls: type[BaseModel], key: str) -> tuple[type[BaseModel], str] | None:
    """(the section holding dotted ``key``, the key's last part), or None when ``cls`` has no such key."""
    *path, name = key.split(".")
    section = _section_at(cls, path)
    return (section, name) if section is not None and name in section.model_fields else None


def _type_name(ann: Any) -> str:
    if ann is type(None):
        return "null"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are read as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string
    return parts, value


def set_dotted(data: dict[str, Any], key: str | list[str], value: Any) -> None:
    """Set ``key`` (``"optim.lr"`` or its parts) in a nested dict, creating sections as needed."""
    parts = key.split(".") if isinstance(key, str) else key
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested dict (a copy), creating sections as needed."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        parts, value = parse_override(item)
        try:
            set_dotted(out, parts, value)
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load ``cls`` from an optional YAML file plus dotted overrides, validating everything."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return build(cls, data, source=str(path) if path else None)


def to_yaml(cfg: BaseModel) -> str:
    """The fully resolved config, as printed at the start of every job."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
