"""Typed configs of the data-generation jobs (``jobs/generate_textbooks.py``, ``generate_exercises.py``,
``filter_code.py``, ``dedup.py``, ``decontaminate.py``): the teacher endpoint, what to generate, how to filter."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from phi1_ray.config import SamplingConfig, Section
from phi1_ray.data.config import SourceConfig
from phi1_ray.runtime import RayConfig
from phi1_ray.tracking import MlflowConfig


class TeacherConfig(SamplingConfig):
    """An OpenAI-compatible endpoint (OpenAI, vLLM, the project's own Serve app), how hard to call it, and what each
    request asks for: :class:`SamplingConfig`'s keys (``max_new_tokens`` is sent as ``max_tokens``, its old name
    here; ``seed`` and ``stop`` only when set), ``temperature`` at most 2 and no ``top_k`` (the OpenAI API has
    none)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "phi1_ray"
    api: Literal["chat", "completions"] = "chat"
    """``chat``: ``/chat/completions`` (OpenAI, vLLM chat models); ``completions``: ``/completions`` (base
    models, the project's Serve app)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the key (sent as ``Authorization: Bearer``); unset variable: no key."""
    max_new_tokens: int = 1024
    temperature: float = 1.0
    concurrency: int = 16
    """Requests in flight across the whole job (split over ``actors``)."""
    actors: int = 1
    """Ray Data actors making calls (each an async client)."""
    requests_per_s: float | None = None
    """Request-rate limit across the whole job (one token bucket shared by every actor); None: no limit."""
    timeout_s: float = 120.0
    max_retries: int = 8
    """Retries of one request after 429, 5xx, a timeout or a dropped connection."""
    backoff_s: float = 1.0
    """First retry waits up to this long (full jitter), doubling each time up to ``max_backoff_s``."""
    max_backoff_s: float = 60.0
    cache_dir: str | None = None
    """Replies on disk keyed by (model, prompt, sampling parameters); None: ``<out>/../teacher_cache``.
    On a cluster, a filesystem every node mounts."""
    price_per_1k_prompt: float = 0.0
    """Cost accounting in the manifest (currency units per 1,000 prompt tokens)."""
    price_per_1k_completion: float = 0.0

    renamed_keys = {"max_tokens": "max_new_tokens"}

    @model_validator(mode="after")
    def _check_teacher(self) -> TeacherConfig:
        for name in ("max_new_tokens", "concurrency", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.concurrency < self.actors:
            raise ValueError(f"concurrency ({self.concurrency}) must be >= actors ({self.actors})")
        if self.temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_k:
            raise ValueError(f"top_k must be 0: the OpenAI API has no top_k, got {self.top_k}")
        if self.requests_per_s is not None and self.requests_per_s <= 0:
            raise ValueError(f"requests_per_s must be > 0 or null, got {self.requests_per_s}")
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("timeout_s must be > 0 and 0 <= backoff_s <= max_backoff_s")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        return self


class TextbookConfig(Section):
    """Synthetic textbook sections: one prompt per item, its seeds drawn from the topic lists."""

    topics: str = "configs/datagen/topics.yaml"
    """YAML with ``topics`` (each with ``subtopics``), ``audiences``, ``styles``, ``words``."""
    num_items: int = 100
    random_words: int = 2
    """Random words each prompt must use (the paper's extra source of diversity)."""
    min_chars: int = 300
    max_chars: int = 20_000
    min_code_blocks: int = 1


class ExerciseConfig(Section):
    """CodeExercises: docstring exercises from the teacher and/or mined from real code (no teacher)."""

    topics: str = "configs/datagen/topics.yaml"
    """YAML with ``function_verbs``, ``function_nouns`` (constrained function names), ``topics``, ``audiences``."""
    num_items: int = 100
    """Teacher exercises; 0 for mined ones only."""
    mine: list[SourceConfig] = []
    """Code corpora (``files`` / ``stdlib`` / ``parquet``) whose functions with docstrings become exercises."""
    min_body_lines: int = 2


class GenerateConfig(Section):
    """``jobs/generate_textbooks.py`` / ``jobs/generate_exercises.py``."""

    kind: Literal["textbooks", "exercises"] = "textbooks"
    out: str = "runs/datagen/textbooks"
    seed: int = 0
    template_version: str = "v1"
    teacher: TeacherConfig = TeacherConfig()
    textbooks: TextbookConfig = TextbookConfig()
    exercises: ExerciseConfig = ExerciseConfig()
    rows_per_shard: int = 5_000
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.textbooks.num_items < 0 or self.exercises.num_items < 0:
            raise ValueError("num_items must be >= 0")
        if self.kind == "exercises" and self.exercises.num_items == 0 and not self.exercises.mine:
            raise ValueError("exercises: num_items is 0 and no mine sources: nothing to generate")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        return self


class EncoderConfig(Section):
    """Documents as vectors: mean-pooled final hidden states of a phi1_ray checkpoint / Hugging Face phi model,
    or of any Hugging Face encoder (``AutoModel``) in a local directory."""

    path: str | None = None
    random_init: str | None = None
    """Instead of ``path``: a freshly initialized model of this preset (``tiny``) with ``tokenizer`` -- random
    features, for runs that have no pretrained model yet (the demo's filter runs before pretraining)."""
    tokenizer: str | None = None
    """Tokenizer directory of a ``random_init`` encoder."""
    seed: int = 0
    max_tokens: int = 512
    """Tokens of a document that are embedded (its start)."""
    batch_size: int = 16

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.random_init is not None and (self.path is not None or self.tokenizer is None):
            raise ValueError("random_init takes a tokenizer and no path")
        return self

    @property
    def configured(self) -> bool:
        return self.path is not None or self.random_init is not None


class FilterConfig(Section):
    """``jobs/filter_code.py``: teacher labels on a sample, a random forest on embeddings, the corpus scored."""

    sources: list[SourceConfig] = [SourceConfig(type="stdlib", max_bytes=2_000_000)]
    out: str = "runs/datagen/filtered_code"
    seed: int = 0
    labels: str | None = None
    """Instead of teacher annotation: a labelled JSONL (``text``, ``label`` 0/1), or ``heuristic`` (documented,
    parseable code is educational: a teacher-free stand-in for offline runs such as the demo)."""
    annotate: int = 200
    """Documents of the corpus the teacher labels (ignored with ``labels``)."""
    annotate_chars: int = 3_000
    """A document's first characters shown to the teacher."""
    positive_score: float = 6.0
    """A teacher score (0-10) at or above this labels a document educational."""
    holdout: float = 0.25
    trees: int = 200
    threshold: float = 0.5
    """Keep documents whose predicted probability of being educational is at least this."""
    teacher: TeacherConfig = TeacherConfig()
    encoder: EncoderConfig = EncoderConfig()
    rows_per_shard: int = 5_000
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.annotate < 4 and self.labels is None:
            raise ValueError(f"annotate must be >= 4 (a train and a held-out part), got {self.annotate}")
        if not self.encoder.configured:
            raise ValueError("encoder.path is required: a phi1_ray checkpoint or a Hugging Face model directory")
        return self


class DedupConfig(Section):
    """Exact (normalized-text hash) and near-duplicate (MinHash LSH) removal across datasets."""

    threshold: float = 0.8
    """Estimated Jaccard similarity of word 5-gram shingles at or above which two documents are near-duplicates."""
    num_perm: int = 128
    shingle: int = 5

    @model_validator(mode="after")
    def _check(self) -> DedupConfig:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 16 or self.shingle < 1:
            raise ValueError("num_perm must be >= 16 and shingle >= 1")
        return self


class DecontamConfig(Section):
    """Decontamination against benchmarks (the paper's section 5): n-gram overlap, embedding similarity and an
    AST match of the code with identifiers renamed."""

    ngram: int = 13
    tau: float = 0.9
    """AST match rate (1 - normalized edit distance of the two canonical node sequences) at or above which a
    function matches a benchmark solution."""
    min_ast_nodes: int = 12
    """Functions smaller than this are not AST-compared (every tiny function looks alike)."""
    embedding_similarity: float = 0.95
    """Cosine similarity of embeddings at or above which a record matches (with an encoder)."""
    encoder: EncoderConfig = EncoderConfig()

    @model_validator(mode="after")
    def _check(self) -> DecontamConfig:
        if self.ngram < 3:
            raise ValueError(f"ngram must be >= 3, got {self.ngram}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not -1.0 <= self.embedding_similarity <= 1.0:
            raise ValueError(f"embedding_similarity must be in [-1, 1], got {self.embedding_similarity}")
        return self


class DedupJobConfig(Section):
    """``jobs/dedup.py``: exact and near-duplicate removal across datasets; the first occurrence of a document, in
    the order of ``inputs``, stays."""

    inputs: list[str]
    """Data-generation output directories or JSONL / Parquet files, first wins."""
    out: str
    """Output directory: each input's survivors in ``out/<name>/``, every removed record in ``out/report.jsonl``."""
    dedup: DedupConfig = DedupConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> DedupJobConfig:
        if not self.inputs:
            raise ValueError("inputs is empty: name at least one dataset")
        return self


BENCHMARKS = ("humaneval", "mbpp")


def parse_benchmark(value: str) -> tuple[str, str | None]:
    """``humaneval``, ``humaneval=FILE`` or ``mbpp=FILE`` -> (name, file or None)."""
    name, _, path = value.partition("=")
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {value!r}: use humaneval, humaneval=FILE or mbpp=FILE")
    if name == "mbpp" and not path:
        raise ValueError("benchmark mbpp needs a file in MBPP's schema: mbpp=FILE (no download)")
    return name, path or None


class DecontamJobConfig(Section):
    """``jobs/decontaminate.py``: the records of ``input`` that do not match a benchmark problem, to ``out``."""

    input: str
    """JSONL or Parquet records (``text``, or ``prompt`` + ``completion``) or a data-generation output directory."""
    out: str
    """Output directory: the survivors (shards + manifest.json), ``report.jsonl`` (each removed record's index,
    the matched ``task_id`` and the test)."""
    benchmarks: list[str] = ["humaneval"]
    """``humaneval``, ``humaneval=FILE`` or ``mbpp=FILE`` (a file in MBPP's schema; no download)."""
    decontam: DecontamConfig = DecontamConfig()
    actors: int = 1
    """Ray Data actors matching records."""
    ray: RayConfig = RayConfig()

    @field_validator("benchmarks")
    @classmethod
    def _check_benchmarks(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("name at least one benchmark")
        for value in values:
            parse_benchmark(value)
        return values

    @model_validator(mode="after")
    def _check(self) -> DecontamJobConfig:
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        return self

    @property
    def benchmark_files(self) -> list[tuple[str, str | None]]:
        """(name, file or None) per benchmark, as :func:`~phi1_ray.datagen.decontam.run_decontamination` takes them."""
        return [parse_benchmark(value) for value in self.benchmarks]
