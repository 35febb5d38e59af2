"""The pipeline's config (``jobs/pipeline.py``): the shared sections, then one section per stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from phi1_ray.config import DEFAULT_STOP, SamplingConfig, Section
from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.model import ModelConfig
from phi1_ray.runtime import RayConfig
from phi1_ray.tokenizer import TokenizerConfig
from phi1_ray.tracking import MlflowConfig


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
