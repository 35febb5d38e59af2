"""Completions for benchmark problems: from a checkpoint in this process, from Ray Data actors (see
``ray_generation.py``), or from any OpenAI-compatible endpoint. Every completion goes through one recorded
post-processing step: cut at the first stop sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import model_validator

from phi1_ray.config import DEFAULT_STOP, SamplingConfig
from phi1_ray.evals.problems import Problem


class EvalSampling(SamplingConfig):
    """How benchmark completions are sampled: :class:`~phi1_ray.config.SamplingConfig` with evaluation's defaults
    (``top_p`` 0.95, up to 384 new tokens, cut at :data:`DEFAULT_STOP`, seeded), plus samples per problem and
    prompts per batch."""

    n: int = 1
    """Samples per problem (pass@k is reported for every k up to n)."""
    batch_size: int = 16
    """Prompts per generation call (and per Ray Data batch)."""
    max_new_tokens: int = 384
    top_p: float = 0.95
    seed: int | None = 0
    """Sample i of a problem is drawn with seed + i; None: unseeded."""
    stop: list[str] = list(DEFAULT_STOP)

    @model_validator(mode="after")
    def _check_eval(self) -> EvalSampling:
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def for_sample(self, index: int) -> SamplingConfig:
        """The decoding settings of sample ``index`` of every problem (its seed: ``seed + index``)."""
        params = self.model_dump(include=set(SamplingConfig.model_fields))
        params["seed"] = None if self.seed is None else self.seed + index
        return SamplingConfig(**params)


@dataclass
class Sample:
    task_id: str
    completion: str
    raw: str = ""
    sample_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def postprocess(text: str, stop: Sequence[str] = DEFAULT_STOP) -> str:
    """Cut the completion before the first stop sequence (the function body ends where a new top-level block begins)."""
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if s and at != -1:
            cut = min(cut, at)
    return text[:cut]


def postprocessing_record(sampling: EvalSampling) -> dict[str, Any]:
    return {"name": "truncate_at_first_stop", "stop": list(sampling.stop)}


def requests(problems: Sequence[Problem], n: int) -> list[tuple[str, str, int]]:
    """(task_id, prompt, sample_index) for every problem and sample."""
    return [(p.task_id, p.prompt, i) for i in range(n) for p in problems]


def complete_with_model(
    model: Any, tokenizer: Any, rows: Sequence[tuple[str, str, int]], sampling: EvalSampling
) -> list[Sample]:
    """Complete ``rows`` with a loaded model, ``batch_size`` prompts at a time; sample i uses seed ``seed + i``."""
    from phi1_ray.generate import generate

    out: list[Sample] = []
    by_index: dict[int, list[tuple[str, str, int]]] = {}
    for row in rows:
        by_index.setdefault(row[2], []).append(row)
    for index, group in sorted(by_index.items()):
        params = sampling.for_sample(index)
        for start in range(0, len(group), sampling.batch_size):
            batch = group[start : start + sampling.batch_size]
            completions = generate(model, tokenizer, [prompt for _, prompt, _ in batch], params)
            for (task_id, _, i), completion in zip(batch, completions):
                out.append(Sample(task_id, postprocess(completion.text, sampling.stop), completion.text, i))
    return out


def complete_with_endpoint(
    base_url: str,
    model: str,
    rows: Sequence[tuple[str, str, int]],
    sampling: EvalSampling,
    api_key: str = "EMPTY",
    concurrency: int = 8,
) -> list[Sample]:
    """Complete ``rows`` through an OpenAI-compatible ``/v1/completions`` endpoint (the project's Serve app, vLLM)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=3)

    def one(row: tuple[str, str, int]) -> Sample:
        task_id, prompt, index = row
        params = sampling.for_sample(index)
        response = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop),
            extra_body={"top_k": params.top_k} if params.top_k else None,  # not OpenAI's; vLLM takes it
        )
        text = response.choices[0].text
        return Sample(task_id, postprocess(text, sampling.stop), text, index)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, rows))
