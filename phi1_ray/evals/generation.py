"""Completions for benchmark problems: from a checkpoint in this process, from Ray Data actors (see
``ray_generation.py``), or from any OpenAI-compatible endpoint. Every completion goes through one recorded
post-processing step: cut at the first stop sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phi1_ray.evals.problems import Problem

DEFAULT_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class EvalSampling:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 384
    stop: tuple[str, ...] = DEFAULT_STOP
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
    from phi1_ray.config import SamplingConfig
    from phi1_ray.generate import generate

    out: list[Sample] = []
    by_index: dict[int, list[tuple[str, str, int]]] = {}
    for row in rows:
        by_index.setdefault(row[2], []).append(row)
    for index, group in sorted(by_index.items()):
        params = SamplingConfig(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed + index,
            stop=list(sampling.stop),
        )
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
        response = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed + index,
            stop=list(sampling.stop),
        )
        text = response.choices[0].text
        return Sample(task_id, postprocess(text, sampling.stop), text, index)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, rows))
