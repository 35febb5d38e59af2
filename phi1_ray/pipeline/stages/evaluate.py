"""The evaluate stage: completions of the config's prompts, then the benchmark (completions from Ray Data actors,
each run in the sandbox), pass@k logged to the pipeline's MLflow run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from phi1_ray import tracking
from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context

NAME = "evaluate"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    cfg = p.cfg
    settings = {**_evaluation_settings(cfg), "prompts": cfg.prompts, "sampling": cfg.sampling.model_dump(mode="json")}
    run = lambda: make(cfg, p.run_dir, p.export_uri, ctx.run_id, p.tracking_uri)  # noqa: E731
    return Stage(NAME, ("export",), [str(p.run_dir / "eval")], settings, run, uses_ray=True)


SAMPLING_KEYS_ADDED = ("top_k", "top_p", "seed", "stop")
"""Keys the evaluation section gained from :class:`SamplingConfig`: hashed only when set to other than their
defaults, so a finished evaluate stage of an unchanged config stays finished."""


def _evaluation_settings(cfg: PipelineConfig) -> dict[str, Any]:
    ev = cfg.evaluation
    defaults = type(ev)()
    unset = {k for k in SAMPLING_KEYS_ADDED if getattr(ev, k) == getattr(defaults, k)}
    return ev.model_dump(mode="json", exclude=unset)


def _prompts(cfg: PipelineConfig, checkpoint: str, out: Path) -> dict[str, Any]:
    """The config's prompts completed by the exported model, written to ``completions.jsonl``."""
    from phi1_ray.checkpoint import load_model
    from phi1_ray.generate import generate

    model, tokenizer = load_model(checkpoint)
    start = time.perf_counter()
    completions = generate(model, tokenizer, cfg.prompts, cfg.sampling)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c.token_ids) for c in completions)
    for prompt, c in zip(cfg.prompts, completions):
        log(f"generate ({c.finish_reason}, {len(c.token_ids)} tokens):\n{prompt}{c.text}")
    records = [{"prompt": p, **c.__dict__} for p, c in zip(cfg.prompts, completions)]
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tracking.log_metrics({"generate_tokens_per_s": new_tokens / seconds})
    tracking.log_artifact(out / "completions.jsonl")
    return {"generated_tokens": new_tokens, "generate_tokens_per_s": round(new_tokens / seconds, 1)}


def make(cfg: PipelineConfig, run_dir: Path, checkpoint: str, run_id: str, tracking_uri: str) -> dict[str, Any]:
    from phi1_ray.evals.generation import EvalSampling
    from phi1_ray.evals.run import evaluate
    from phi1_ray.evals.sandbox import Limits

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = _prompts(cfg, checkpoint, out)
    ev = cfg.evaluation
    settings = ev.model_dump(include=set(EvalSampling.model_fields))  # the stage's sampling keys and n
    sampling = EvalSampling(**{**settings, "seed": cfg.seed if ev.seed is None else ev.seed})
    scores = evaluate(
        ev.benchmark,
        out,
        checkpoint=checkpoint,
        sampling=sampling,
        limits=Limits(timeout_s=ev.timeout_s),
        limit=ev.limit,
        actors=ev.actors,
        use_gpu=ev.use_gpu,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        log=log,
    )
    log(
        f"evaluate: {scores['benchmark']} pass@1 {scores['pass@1']:.3f} over {scores['problems']} problems "
        f"({scores['passed']} passed, {scores['failed']} failed, {scores['timed_out']} timed out; "
        f"sandbox: {scores['isolation']}) -> {out}"
    )
    keep = ("benchmark", "pass@1", "problems", "samples", "passed", "failed", "timed_out")
    return {**summary, **{k: scores[k] for k in keep if k in scores}}
