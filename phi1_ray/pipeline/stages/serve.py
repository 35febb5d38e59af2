"""The serve stage: the export deployed behind the Serve app on the pipeline's Ray instance, one completion
request over HTTP, a short exercise generation with the served model as the teacher, then shut down."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context

NAME = "serve"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    settings = {**p.cfg.serving.model_dump(mode="json"), "served_items": p.cfg.datagen.served_items}
    out = p.run_dir / "serve"
    run = lambda: make(p.cfg, p.export_uri, out)  # noqa: E731
    return Stage(NAME, ("export",), [str(out / "summary.json")], settings, run, uses_ray=True)


def _complete(url: str, prompt: str, max_tokens: int) -> tuple[dict[str, Any], float]:
    """One completion request to the served app: (the answer, seconds it took)."""
    import urllib.request

    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - start


def make(cfg: PipelineConfig, checkpoint: str, out: Path) -> dict[str, Any]:
    from ray import serve

    from phi1_ray.serving.app import app_builder

    sv = cfg.serving
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    serve.start(http_options={"host": sv.host, "port": sv.port})
    try:
        serve.run(app_builder({"checkpoint": checkpoint, "num_replicas": 1}), name="phi1", route_prefix="/")
        ready = time.perf_counter() - started
        url = f"http://{sv.host}:{sv.port}/v1/completions"
        answer, latency = _complete(url, sv.prompt, sv.max_tokens)
        base_url = f"http://{sv.host}:{sv.port}/v1"
        generated = served_generation(cfg, storage.name_of(checkpoint), base_url, out / "served_exercises")
    finally:
        serve.shutdown()
    choice = answer["choices"][0]
    log(
        f"serve: {url} answered in {latency * 1000:.0f} ms (app ready in {ready:.1f} s; "
        f"{answer['usage']['completion_tokens']} tokens, {choice['finish_reason']}), then shut down:\n"
        f"{sv.prompt}{choice['text']}"
    )
    summary = {"url": url, "latency_s": round(latency, 3), "text": choice["text"], "usage": answer["usage"]}
    if generated is not None:
        summary["generated_exercises"] = generated
    storage.write_json(out / "summary.json", summary)
    return summary


def served_generation(cfg: PipelineConfig, model_name: str, base_url: str, out: Path) -> dict[str, Any] | None:
    """A short CodeExercises generation with the served checkpoint as the teacher (the path a real teacher
    takes); whatever the small model writes is validated, kept or rejected with a reason."""
    if not (cfg.datagen.enabled and cfg.datagen.served_items):
        return None
    from phi1_ray.datagen.config import GenerateConfig
    from phi1_ray.datagen.generate import run_generation

    teacher = {"base_url": base_url, "model": model_name, "api": "completions", "api_key_env": None,
               "max_tokens": 96, "temperature": 0.8, "concurrency": 4}  # fmt: skip
    manifest = run_generation(
        GenerateConfig(kind="exercises", out=str(out), seed=cfg.seed, teacher=teacher,
                       exercises={"num_items": cfg.datagen.served_items}),
        log=lambda msg: log(f"serve: {msg}"),
    )  # fmt: skip
    usage = manifest.get("usage", {})
    return {"out": str(out), "kept": manifest["rows"], "rejected": manifest["rejected"],
            "requests": usage.get("requests"), "completion_tokens": usage.get("completion_tokens")}  # fmt: skip
