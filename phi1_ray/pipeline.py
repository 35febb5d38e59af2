"""The end-to-end job behind ``make demo``. Stages so far: tokenizer, data generation (mined exercises,
decontamination, the learned quality filter, dedup), data preparation, pretraining, finetuning, export, generation,
HumanEval, and serving (the export behind the Serve app, one request and a short generation with it as the
teacher, shut down).

Each stage writes its outputs under ``run_dir`` and is skipped, with a line saying so, when they already exist.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from phi1_ray.checkpoint import load_model
from phi1_ray.config import PipelineConfig, SourceConfig, StageJobConfig, TrainJobConfig, build, read_yaml
from phi1_ray.generate import generate
from phi1_ray.tokenizer import check_vocab, load_tokenizer, train_from_sources
from phi1_ray.tracking import mlflow_run, tracking_uri
from phi1_ray.train.checkpoints import RUN_FILE
from phi1_ray.train.deepspeed_config import merge
from phi1_ray.train.run import RUNTIME_MODEL_FIELDS


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def stage_tokenizer(cfg: PipelineConfig, run_dir: Path) -> Any:
    if cfg.tokenizer.path:
        log(f"tokenizer: loading {cfg.tokenizer.path}")
        return load_tokenizer(cfg.tokenizer.path)
    out = run_dir / "tokenizer"
    if (out / "tokenizer.json").is_file():
        log(f"tokenizer: {out} exists, skipped")
        return load_tokenizer(out)
    names = ", ".join(s.label for s in cfg.tokenizer.sources)
    log(f"tokenizer: training a {cfg.tokenizer.vocab_size}-entry byte-level BPE on {names}")
    return train_from_sources(cfg.tokenizer.sources, cfg.tokenizer.vocab_size, out)


def stage_datagen(cfg: PipelineConfig, run_dir: Path, tokenizer_path: str, min_cpus: int) -> dict[str, Any]:
    """Mined exercises -> decontamination; code -> quality filter; both -> dedup. Returns the two corpora."""
    from phi1_ray.data.ray_pipeline import init_ray
    from phi1_ray.datagen.config import DecontamConfig, DedupConfig, FilterConfig, GenerateConfig
    from phi1_ray.datagen.decontam import run_decontamination
    from phi1_ray.datagen.dedup import run_dedup
    from phi1_ray.datagen.generate import run_generation
    from phi1_ray.datagen.quality import run_filter

    dg = cfg.datagen
    out = run_dir / "datagen"
    init_ray(cfg.ray, min_cpus=min_cpus)

    def say(msg: str) -> None:
        log(f"datagen: {msg}")

    encoder = {"path": dg.encoder} if dg.encoder else {"random_init": "tiny", "tokenizer": tokenizer_path}
    mined = run_generation(
        GenerateConfig(kind="exercises", out=str(out / "mined_exercises"), seed=cfg.seed,
                       exercises={"num_items": 0, "mine": [s.model_dump() for s in dg.exercises]}),
        log=say,
    )  # fmt: skip
    benchmarks = [(b, None) if b in ("humaneval", "mbpp") else ("humaneval", b) for b in dg.benchmarks]
    clean = run_decontamination(str(out / "mined_exercises"), str(out / "exercises"), benchmarks, DecontamConfig(),
                                log=say)  # fmt: skip
    filtered = run_filter(
        FilterConfig(sources=[s.model_dump() for s in dg.code], out=str(out / "filtered_code"), seed=cfg.seed,
                     labels=dg.labels, annotate=dg.annotate, threshold=dg.threshold, encoder=encoder,
                     mlflow={"tracking_uri": tracking_uri(cfg.mlflow, run_dir), "experiment": cfg.mlflow.experiment}),
        log=say,
    )  # fmt: skip
    deduped = run_dedup([str(out / "filtered_code"), str(out / "exercises")], str(out / "dedup"),
                        DedupConfig(threshold=dg.dedup_threshold), log=say)  # fmt: skip
    return {
        "mined_exercises": mined["rows"],
        "decontaminated_removed": clean["stages"][-1].get("removed_by_test", {}),
        "filter": filtered.get("classifier"),
        "filtered_code": filtered["rows"],
        "code_documents": filtered["stages"][-1].get("documents"),
        "after_dedup": {name: m["rows"] for name, m in deduped.items()},
        "pretrain_source": str(out / "dedup" / "filtered_code"),
        "finetune_source": str(out / "dedup" / "exercises"),
    }


def stage_data(cfg: PipelineConfig, run_dir: Path, tokenizer_path: str, min_cpus: int) -> dict[str, Any]:
    from phi1_ray.data.ray_pipeline import init_ray, prepare

    data = cfg.data.model_copy(update={"tokenizer": tokenizer_path})
    init_ray(cfg.ray, min_cpus=min_cpus)  # the training stages share this instance
    return prepare(data, run_dir / "data", log=log)


def stage_job(cfg: PipelineConfig, stage: StageJobConfig, name: str, forced: dict[str, Any]) -> TrainJobConfig:
    """A training stage's job config: its file, its overrides, then what the pipeline fixes (run directory,
    tokenizer, data, the model's sizes)."""
    data = read_yaml(stage.config) if stage.config else {}
    data = merge(merge(data, stage.overrides), forced)
    model = data.get("model", {})
    runtime = {k: model[k] for k in RUNTIME_MODEL_FIELDS if k in model}
    data["model"] = {**cfg.model.model_dump(mode="json"), **runtime}
    return build(TrainJobConfig, data, where=name, source=stage.config)


def stage_train(job: TrainJobConfig, name: str) -> dict[str, Any]:
    """Run a training job unless its run directory says it finished; returns its summary."""
    from phi1_ray.train.run import loss_summary, run_training

    run_dir = Path(job.run_dir or name)
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        log(f"{name}: {run_dir} exists, skipped")
        return {
            **json.loads(run_file.read_text()),
            **loss_summary(run_dir / "metrics.jsonl"),
            "hf": str(run_dir / "hf"),
        }
    log(f"{name}: {job.optim.max_steps} steps of {job.model.name or 'the model'} on {job.train.num_workers} workers")
    return run_training(job, log=lambda line: log(f"{name}: {line}"))


def stage_evaluate(cfg: PipelineConfig, run_dir: Path, mlflow_run_id: str) -> dict[str, Any]:
    """The finetuned checkpoint on the benchmark: completions from Ray Data actors, scored in the sandbox."""
    from phi1_ray.evals.generation import EvalSampling
    from phi1_ray.evals.run import evaluate
    from phi1_ray.evals.sandbox import Limits

    ev = cfg.evaluation
    out = run_dir / "eval"
    if (out / "summary.json").is_file():
        log(f"evaluate: {out / 'summary.json'} exists, skipped")
        return json.loads((out / "summary.json").read_text())
    sampling = EvalSampling(n=ev.n, temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=cfg.seed)
    summary = evaluate(
        ev.benchmark,
        out,
        checkpoint=run_dir / "finetune",
        sampling=sampling,
        limits=Limits(timeout_s=ev.timeout_s),
        limit=ev.limit,
        actors=ev.actors,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri(cfg.mlflow, run_dir),
        log=log,
    )
    log(
        f"evaluate: {summary['benchmark']} pass@1 {summary['pass@1']:.3f} over {summary['problems']} problems "
        f"({summary['passed']} passed, {summary['failed']} failed, {summary['timed_out']} timed out; "
        f"sandbox: {summary['isolation']}) -> {out}"
    )
    return summary


def stage_serve(cfg: PipelineConfig, checkpoint: Path) -> dict[str, Any]:
    """Deploy the Serve app on the pipeline's Ray instance, send one completion request over HTTP, shut down."""
    import urllib.request

    from ray import serve

    from phi1_ray.serving.app import app_builder

    sv = cfg.serving
    started = time.perf_counter()
    serve.start(http_options={"host": sv.host, "port": sv.port})
    try:
        serve.run(app_builder({"checkpoint": str(checkpoint), "num_replicas": 1}), name="phi1", route_prefix="/")
        ready = time.perf_counter() - started
        url = f"http://{sv.host}:{sv.port}/v1/completions"
        body = json.dumps({"prompt": sv.prompt, "max_tokens": sv.max_tokens, "temperature": 0}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        latency = time.perf_counter() - start
        generated = served_generation(cfg, checkpoint.name, f"http://{sv.host}:{sv.port}/v1")
    finally:
        serve.shutdown()
    choice = answer["choices"][0]
    log(
        f"serve: {url} answered in {latency * 1000:.0f} ms (app ready in {ready:.1f} s; "
        f"{answer['usage']['completion_tokens']} tokens, {choice['finish_reason']}), then shut down:\n"
        f"{sv.prompt}{choice['text']}"
    )
    out = {"url": url, "latency_s": round(latency, 3), "text": choice["text"], "usage": answer["usage"]}
    return {**out, "generated_exercises": generated} if generated is not None else out


def served_generation(cfg: PipelineConfig, model_name: str, base_url: str) -> dict[str, Any] | None:
    """A short CodeExercises generation with the served checkpoint as the teacher (the path a real teacher
    takes); whatever the small model writes is validated, kept or rejected with a reason."""
    if not (cfg.datagen.enabled and cfg.datagen.served_items):
        return None
    from phi1_ray.datagen.config import GenerateConfig
    from phi1_ray.datagen.generate import run_generation

    teacher = {"base_url": base_url, "model": model_name, "api": "completions", "api_key_env": None,
               "max_tokens": 96, "temperature": 0.8, "concurrency": 4}  # fmt: skip
    out = Path(cfg.run_dir) / "datagen" / "served_exercises"
    manifest = run_generation(
        GenerateConfig(kind="exercises", out=str(out), seed=cfg.seed, teacher=teacher,
                       exercises={"num_items": cfg.datagen.served_items}),
        log=lambda msg: log(f"serve: {msg}"),
    )  # fmt: skip
    usage = manifest.get("usage", {})
    return {"out": str(out), "kept": manifest["rows"], "rejected": manifest["rejected"],
            "requests": usage.get("requests"), "completion_tokens": usage.get("completion_tokens")}  # fmt: skip


def run(cfg: PipelineConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    tokenizer_path = cfg.tokenizer.path or str(run_dir / "tokenizer")
    shared = {  # one Ray instance, one MLflow store, one tokenizer for the whole pipeline
        "ray": cfg.ray.model_dump(),
        "mlflow": {"tracking_uri": tracking_uri(cfg.mlflow, run_dir), "experiment": cfg.mlflow.experiment},
        "seed": cfg.seed,
    }
    finetune_data: dict[str, Any] = {}
    if cfg.datagen.enabled:  # the corpora come from the datagen stage
        generated = run_dir / "datagen" / "dedup"
        cfg = cfg.model_copy(deep=True)
        cfg.data.sources = [SourceConfig(type="datagen", paths=[str(generated / "filtered_code")])]
        finetune_data = {"sources": [{"type": "datagen", "paths": [str(generated / "exercises")]}]}
    stages = {
        "pretrain": (cfg.pretrain, {"prepared": str(run_dir / "data"), "data": {"seq_len": cfg.data.seq_len}}),
        "finetune": (cfg.finetune, {"init_from": str(run_dir / "pretrain"), "data": finetune_data}),
    }
    jobs = {}
    for name, (stage, forced) in stages.items():
        forced["data"]["tokenizer"] = tokenizer_path
        jobs[name] = stage_job(cfg, stage, name, {**shared, **forced, "run_dir": str(run_dir / name)})
    with mlflow_run(cfg.mlflow, run_dir, "pipeline", cfg) as run:
        import mlflow

        tokenizer = stage_tokenizer(cfg, run_dir)
        check_vocab(tokenizer, cfg.model.vocab_size)
        need = max(job.train.num_workers for job in jobs.values()) + 2  # trainer workers + data tasks
        if cfg.datagen.enabled:
            summary["datagen"] = stage_datagen(cfg, run_dir, tokenizer_path, need)
        manifest = stage_data(cfg, run_dir, tokenizer_path, need)
        mlflow.log_metrics({"data_tokens": manifest["tokens"], "data_blocks": manifest["blocks"]})
        pre = stage_train(jobs["pretrain"], "pretrain")
        fine = stage_train(jobs["finetune"], "finetune")
        model, _ = load_model(run_dir / "finetune")  # the best finetuning checkpoint, ZeRO shards consolidated
        hf_dir = Path(fine["hf"])
        log(f"export: Hugging Face directory at {hf_dir}")
        curves = plot_losses(run_dir, {"pretrain": run_dir / "pretrain", "finetune": run_dir / "finetune"})
        if curves is not None:
            mlflow.log_artifact(str(curves))

        start = time.perf_counter()
        completions = generate(model, tokenizer, cfg.prompts, cfg.sampling)
        seconds = time.perf_counter() - start
        new_tokens = sum(len(c.token_ids) for c in completions)
        for prompt, c in zip(cfg.prompts, completions):
            log(f"generate ({c.finish_reason}, {len(c.token_ids)} tokens):\n{prompt}{c.text}")
        records = [{"prompt": p, **c.__dict__} for p, c in zip(cfg.prompts, completions)]
        (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

        mlflow.log_metrics({"parameters": model.num_parameters(), "generate_tokens_per_s": new_tokens / seconds})
        mlflow.log_artifact(str(run_dir / "completions.jsonl"))
        scores = stage_evaluate(cfg, run_dir, run.info.run_id) if cfg.evaluation.enabled else None
        summary.update(
            pretrain_loss=[pre.get("first_loss"), pre.get("last_loss")],
            pretrain_val_loss=[pre.get("first_val_loss"), pre.get("last_val_loss")],
            finetune_loss=[fine.get("first_loss"), fine.get("last_loss")],
            finetune_val_loss=[fine.get("first_val_loss"), fine.get("best_val_loss")],
            finetune_best_checkpoint=fine.get("best"),
            loss_curves=str(curves) if curves else None,
            data_documents=manifest["documents"],
            data_tokens=manifest["tokens"],
            data_blocks=manifest["blocks"],
            data_quarantined=manifest["quarantined"],
            parameters=model.num_parameters(),
            checkpoint=str(run_dir / "finetune"),
            hf_export=str(hf_dir),
            generated_tokens=new_tokens,
            generate_tokens_per_s=round(new_tokens / seconds, 1),
            mlflow_uri=tracking_uri(cfg.mlflow, run_dir),
            mlflow_run_id=run.info.run_id,
        )
        if cfg.serving.enabled:
            summary["serving"] = stage_serve(cfg, hf_dir)
        if scores is not None:  # last: the summary ends with the score
            summary["evaluation"] = {k: scores[k] for k in ("problems", "samples", "passed", "failed", "timed_out")}
            summary[f"{scores['benchmark']}_pass@1"] = scores["pass@1"]
    log("summary:\n" + json.dumps(summary, indent=2))
    log(f"generate again with: python jobs/generate.py --checkpoint {run_dir / 'finetune'} --prompt 'def add(a, b):'")
    return summary


def plot_losses(run_dir: Path, runs: dict[str, Path]) -> Path | None:
    """``loss_curves.png``: training and validation loss of each training stage against its step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("loss curves: matplotlib is not installed, no picture")
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5))
    for ax, (name, path) in zip(axes if len(runs) > 1 else [axes], runs.items()):
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
