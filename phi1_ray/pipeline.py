"""The whole phi-1 recipe as stages (``jobs/pipeline.py``; ``make demo`` runs it on ``configs/pipeline/demo.yaml``).

Stages, in order: tokenizer, datagen (teacher generation, exercises mined from code, the learned quality filter),
decontaminate (against HumanEval/MBPP, then dedup), data (tokenize and pack), pretrain, tune (optional sweep),
finetune, export (Hugging Face format), evaluate (HumanEval in the sandbox), serve (the export behind the Serve app,
one request, shut down).

Each stage records what it ran on in ``run_dir/stages/<stage>.json``: the ids of the stages it depends on and a hash
of its settings. A rerun skips a stage, with a line saying so, when that record says finished, its inputs and
settings are unchanged and its outputs exist. Deleting a stage's output (or ``rerun=[stage]``) runs it again, and
the stages that depend on it follow because their input changed; an interrupted stage resumes from what it left.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi1_ray.config import (
    PipelineConfig,
    SourceConfig,
    StageJobConfig,
    TrainJobConfig,
    TuneJobConfig,
    build,
    read_yaml,
    set_dotted,
)
from phi1_ray.data.read import filesystem_of, path_exists
from phi1_ray.errors import ConfigError
from phi1_ray.tokenizer import check_vocab, load_tokenizer, train_from_sources
from phi1_ray.tracking import flatten, mlflow_run, tracking_uri
from phi1_ray.train.checkpoints import RUN_FILE
from phi1_ray.train.deepspeed_config import merge
from phi1_ray.train.run import RUNTIME_MODEL_FIELDS

STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")  # pyarrow's filesystems
STAGES = (
    "tokenizer",
    "datagen",
    "decontaminate",
    "data",
    "pretrain",
    "tune",
    "finetune",
    "export",
    "evaluate",
    "serve",
)


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


# -- stage bookkeeping --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    deps: tuple[str, ...]
    outputs: list[str]
    """Directories or files (local or URIs) the stage writes; all must exist for it to count as done."""
    settings: Any
    """What the stage's result depends on besides its inputs (hashed; a change reruns it)."""
    run: Callable[[], dict[str, Any]]
    uses_ray: bool = False


def _remove(path: str) -> None:
    from pyarrow import fs

    filesystem, root = filesystem_of(path)
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.Directory:
        filesystem.delete_dir(root)
    elif kind == fs.FileType.File:
        filesystem.delete_file(root)


def upload(local: Path, uri: str) -> None:
    """Copy a local directory to ``uri`` (object storage, or a directory given as a URI)."""
    from pyarrow import fs

    filesystem, root = filesystem_of(uri)
    filesystem.create_dir(root, recursive=True)
    fs.copy_files(str(local), root, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)


def fingerprint(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stages:
    """Runs stages in order, skipping the finished ones whose inputs and settings did not change."""

    run_dir: Path
    rerun: set[str] = field(default_factory=set)
    start_ray: Callable[[], None] | None = None
    """Called before the first stage that uses Ray runs (a pipeline whose stages are all done starts none)."""
    ids: dict[str, str] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)

    def marker(self, name: str) -> Path:
        return self.run_dir / "stages" / f"{name}.json"

    def run(self, stage: Stage) -> dict[str, Any]:
        path = self.marker(stage.name)
        record = json.loads(path.read_text()) if path.is_file() else None
        inputs = {d: self.ids[d] for d in stage.deps if d in self.ids}
        settings = fingerprint(stage.settings)
        missing = [o for o in stage.outputs if not path_exists(o)]
        if (
            record is not None
            and record["status"] == "finished"
            and record["inputs"] == inputs
            and record["settings"] == settings
            and not missing
            and stage.name not in self.rerun
        ):
            where = ", ".join(stage.outputs) if stage.outputs else "nothing to write"
            log(f"{stage.name}: finished earlier ({where}), skipped")
            self.ids[stage.name] = record["id"]
            self.report[stage.name] = "skipped"
            return record["summary"]

        clear = True
        if stage.name in self.rerun:
            why = "rerun requested"
        elif record is None:
            clear = False  # a first run, or outputs of an earlier version: whatever is there is resumed
            why = "not run yet"
        elif record["inputs"] != inputs:
            changed = sorted(k for k in set(record["inputs"]) | set(inputs) if record["inputs"].get(k) != inputs.get(k))
            why = f"{', '.join(changed)} changed since it ran"
        elif record["settings"] != settings:
            why = "its settings changed"
        elif record["status"] != "finished":
            clear = False
            why = "interrupted last time, resuming"
        else:
            why = f"{', '.join(missing)} missing"
        if clear:
            for out in stage.outputs:
                if path_exists(out):
                    log(f"{stage.name}: removing {out} (stale)")
                    _remove(out)
        log(f"{stage.name}: running ({why})")
        path.parent.mkdir(parents=True, exist_ok=True)
        base = {"stage": stage.name, "inputs": inputs, "settings": settings, "outputs": stage.outputs}
        path.write_text(json.dumps({**base, "status": "running", "started": time.time()}, indent=2) + "\n")
        if stage.uses_ray and self.start_ray is not None:
            self.start_ray()
            self.start_ray = None
        start = time.perf_counter()
        summary = stage.run()
        seconds = time.perf_counter() - start
        record = {**base, "status": "finished", "id": uuid.uuid4().hex[:12], "seconds": round(seconds, 1)}
        record["summary"] = json.loads(json.dumps(summary, default=str))
        path.write_text(json.dumps(record, indent=2) + "\n")
        self.ids[stage.name] = record["id"]
        self.report[stage.name] = f"ran in {seconds:.1f} s"
        return record["summary"]

    def skip(self, name: str, why: str) -> None:
        log(f"{name}: not run ({why})")
        self.report[name] = f"not run ({why})"


# -- the plan -------------------------------------------------------------------------------------------------------


def enabled_stages(cfg: PipelineConfig) -> dict[str, bool]:
    """Which stages run: not in ``skip`` and their section enabled; a ConfigError when one needs a stage that
    does not."""
    on = {name: name not in cfg.skip for name in STAGES}
    on["datagen"] &= cfg.datagen.enabled
    on["decontaminate"] &= cfg.datagen.enabled
    on["tune"] &= cfg.tune.enabled
    on["evaluate"] &= cfg.evaluation.enabled
    on["serve"] &= cfg.serving.enabled
    problems = []
    if not on["tokenizer"] and not cfg.tokenizer.path:
        problems.append("tokenizer is skipped but tokenizer.path names none")
    if on["pretrain"] and not on["data"]:
        problems.append("pretrain needs the data stage")
    if on["tune"] and not on["finetune"]:
        problems.append("tune picks finetuning's hyperparameters but finetune is skipped")
    if not (on["pretrain"] or on["finetune"]):
        on["export"] = False
    for name in ("evaluate", "serve"):
        if on[name] and not on["export"]:
            problems.append(f"{name} needs the export stage (and a training stage before it)")
    if problems:
        raise ConfigError(f"pipeline stages: {'; '.join(problems)} (stages: {', '.join(STAGES)})")
    return on


def stage_job_data(cfg: PipelineConfig, stage: StageJobConfig, forced: dict[str, Any]) -> dict[str, Any]:
    data = read_yaml(stage.config) if stage.config else {}
    data = merge(merge(data, stage.overrides), forced)
    model = data.get("model", {})
    runtime = {k: model[k] for k in RUNTIME_MODEL_FIELDS if k in model}
    data["model"] = {**cfg.model.model_dump(mode="json"), **runtime}
    return data


def tune_job(cfg: PipelineConfig, finetune: dict[str, Any], run_dir: Path) -> TuneJobConfig:
    """The sweep's config: its file and overrides; its base is the pipeline's finetuning job (trials start from the
    pretraining checkpoint, on the finetuning data, with the pipeline's model, tokenizer, Ray and MLflow)."""
    data = merge(read_yaml(cfg.tune.config), cfg.tune.overrides)
    if not cfg.finetune.config:
        raise ConfigError("tune: the sweep's base is finetune.config, which is not set")
    overrides = {**flatten(cfg.finetune.overrides), **data.get("overrides", {})}
    for key in ("init_from", "storage_path", "data.sources", "data.tokenizer", "model", "mlflow", "seed"):
        value = finetune
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            overrides[key] = value
    data.update(
        run_dir=str(run_dir / "tune"), base=cfg.finetune.config, overrides=overrides, ray=cfg.ray.model_dump(),
        mlflow=finetune["mlflow"], seed=cfg.seed,
    )  # fmt: skip
    return build(TuneJobConfig, data, where="tune", source=cfg.tune.config)


@dataclass
class Plan:
    """Everything the stages need, resolved from the config before anything runs (bad settings fail here)."""

    cfg: PipelineConfig
    on: dict[str, bool]
    run_dir: Path
    store: str
    """Root of the large outputs: ``storage`` or ``run_dir``."""
    tokenizer_path: str
    corpora: dict[str, list[str]]
    jobs: dict[str, TrainJobConfig]
    fine_data: dict[str, Any]
    sweep: TuneJobConfig | None
    ckpt_root: str | None

    @property
    def gen(self) -> str:
        return f"{self.store}/datagen"

    @property
    def model_stage(self) -> str:
        return "finetune" if self.on["finetune"] else "pretrain"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def export_uri(self) -> str:
        """What replicas and evaluation actors load: the export on object storage when the storage is there."""
        return f"{self.store}/export" if "://" in self.store else str(self.export_dir)


def plan(cfg: PipelineConfig) -> Plan:
    run_dir = Path(cfg.run_dir).resolve()
    on = enabled_stages(cfg)
    store = cfg.storage.rstrip("/") if cfg.storage else str(run_dir)
    if "://" not in store:
        store = str(Path(store).expanduser().resolve())
    elif store.split("://", 1)[0] not in STORAGE_SCHEMES:  # checked without contacting the storage
        schemes = ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
        raise ConfigError(f"storage={cfg.storage}: unknown scheme (use {schemes} or a directory)")
    # a trained tokenizer goes beside the large outputs too: workers on every node load it
    tokenizer_path = cfg.tokenizer.path or (f"{store}/tokenizer" if "://" in store else str(run_dir / "tokenizer"))
    shared = {  # one Ray instance, one MLflow store, one tokenizer for the whole pipeline
        "ray": cfg.ray.model_dump(),
        "mlflow": {"tracking_uri": tracking_uri(cfg.mlflow, run_dir), "experiment": cfg.mlflow.experiment},
        "seed": cfg.seed,
        "export": False,  # the export stage writes the Hugging Face directory
    }
    if cfg.storage:
        shared["storage_path"] = f"{store}/checkpoints"

    corpora: dict[str, list[str]] = {"raw": [], "pretrain": [], "finetune": []}
    if cfg.datagen.enabled:  # the corpora come from the datagen stages
        check_datagen(cfg)
        corpora = datagen_corpora(cfg, f"{store}/datagen")
        cfg = cfg.model_copy(deep=True)
        cfg.data.sources = [SourceConfig(type="datagen", paths=corpora["pretrain"])]
    pre_forced = {
        **shared,
        "run_dir": str(run_dir / "pretrain"),
        "prepared": f"{store}/data",
        "data": {"tokenizer": tokenizer_path, "seq_len": cfg.data.seq_len},
    }
    pre_data = stage_job_data(cfg, cfg.pretrain, pre_forced)
    fine_forced: dict[str, Any] = {
        **shared,
        "run_dir": str(run_dir / "finetune"),
        "data": {"tokenizer": tokenizer_path},
    }
    if on["pretrain"]:
        fine_forced["init_from"] = str(run_dir / "pretrain")
    if corpora["finetune"]:  # prepared by the finetuning job itself from the generated exercises
        fine_forced["data"]["sources"] = [{"type": "datagen", "paths": corpora["finetune"]}]
        fine_forced["prepared"] = None
    fine_data = stage_job_data(cfg, cfg.finetune, fine_forced)
    jobs = {
        "pretrain": build(TrainJobConfig, pre_data, where="pretrain", source=cfg.pretrain.config),
        "finetune": build(TrainJobConfig, fine_data, where="finetune", source=cfg.finetune.config),
    }
    sweep = tune_job(cfg, fine_data, run_dir) if on["tune"] else None
    return Plan(cfg, on, run_dir, store, tokenizer_path, corpora, jobs, fine_data, sweep, shared.get("storage_path"))


def run(cfg: PipelineConfig) -> dict[str, Any]:
    p = plan(cfg)
    cfg, on, run_dir, jobs, sweep, gen = p.cfg, p.on, p.run_dir, p.jobs, p.sweep, p.gen
    store, tokenizer_path, ckpt_root, corpora, fine_data = (
        p.store,
        p.tokenizer_path,
        p.ckpt_root,
        p.corpora,
        p.fine_data,
    )
    model_stage, export_dir, export_uri = p.model_stage, p.export_dir, p.export_uri
    uri = tracking_uri(cfg.mlflow, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    need = max(job.train.num_workers for job in jobs.values()) + 2  # trainer workers + data tasks

    def start_ray() -> None:
        from phi1_ray.runtime import init_ray

        init_ray(cfg.ray, min_cpus=need)

    stages = Stages(run_dir, rerun=set(cfg.rerun), start_ray=start_ray)
    results: dict[str, dict[str, Any]] = {}
    with mlflow_run(cfg.mlflow, run_dir, "pipeline", cfg) as active:
        import mlflow

        run_id = active.info.run_id

        def step(stage: Stage) -> None:
            if on[stage.name]:
                results[stage.name] = stages.run(stage)
            else:
                stages.skip(stage.name, "skipped in the config")

        tok_out = [] if cfg.tokenizer.path else list(dict.fromkeys([str(run_dir / "tokenizer"), tokenizer_path]))
        step(
            Stage(
                "tokenizer",
                (),
                tok_out,
                cfg.tokenizer.model_dump(mode="json"),
                lambda: stage_tokenizer(cfg, run_dir, tokenizer_path),
            )
        )
        check_vocab(load_tokenizer(tokenizer_path), cfg.model.vocab_size)
        dg_settings = cfg.datagen.model_dump(mode="json", exclude={"served_items", "enabled"})
        step(
            Stage(
                "datagen",
                ("tokenizer",),
                corpora["raw"],
                {**dg_settings, "seed": cfg.seed},
                lambda: stage_datagen(cfg, gen, tokenizer_path),
                uses_ray=True,
            )
        )
        step(
            Stage(
                "decontaminate",
                ("datagen",),
                [f"{gen}/decontaminated", f"{gen}/dedup"],
                {"benchmarks": cfg.datagen.benchmarks, "dedup_threshold": cfg.datagen.dedup_threshold},
                lambda: stage_decontaminate(cfg, gen),
                uses_ray=True,
            )
        )
        step(
            Stage(
                "data",
                ("tokenizer", "decontaminate"),
                [f"{store}/data"],
                cfg.data.model_dump(mode="json"),
                lambda: stage_data(cfg, f"{store}/data", tokenizer_path),
                uses_ray=True,
            )
        )
        if "data" in results:
            mlflow.log_metrics({"data_tokens": results["data"]["tokens"], "data_blocks": results["data"]["blocks"]})
        step(
            Stage(
                "pretrain",
                ("data",),
                train_outputs(jobs["pretrain"], ckpt_root),
                jobs["pretrain"].model_dump(mode="json"),
                lambda: stage_train(jobs["pretrain"], "pretrain"),
                uses_ray=True,
            )
        )
        if sweep is None:
            stages.skip("tune", "skipped in the config")
        else:
            step(
                Stage(
                    "tune",
                    ("pretrain", "decontaminate", "tokenizer"),
                    [sweep.run_dir],
                    sweep.model_dump(mode="json"),
                    lambda: stage_tune(sweep),
                    uses_ray=True,
                )
            )
        if on["tune"]:
            for key, value in results["tune"]["best"].items():
                if key.startswith("param."):
                    set_dotted(fine_data, key.removeprefix("param."), value)
            jobs["finetune"] = build(TrainJobConfig, fine_data, where="finetune (with the sweep's best)")
            log(f"finetune: the sweep's best {json.dumps(results['tune']['best'])}")
        step(
            Stage(
                "finetune",
                ("pretrain", "tune", "decontaminate", "tokenizer"),
                train_outputs(jobs["finetune"], ckpt_root),
                jobs["finetune"].model_dump(mode="json"),
                lambda: stage_train(jobs["finetune"], "finetune"),
                uses_ray=True,
            )
        )
        trained = {name: run_dir / name for name in ("pretrain", "finetune") if on[name]}
        curves = plot_losses(run_dir, trained) if trained else None
        if curves is not None:
            mlflow.log_artifact(str(curves))
        export_outputs = [str(export_dir)] + ([export_uri] if export_uri != str(export_dir) else [])
        step(
            Stage(
                "export",
                (model_stage,),
                export_outputs,
                {"from": model_stage},
                lambda: stage_export(run_dir / model_stage, export_dir, export_uri, uri, run_id),
            )
        )
        if "export" in results:
            mlflow.log_metric("parameters", results["export"]["parameters"])
        step(
            Stage(
                "evaluate",
                ("export",),
                [str(run_dir / "eval")],
                {
                    **cfg.evaluation.model_dump(mode="json"),
                    "prompts": cfg.prompts,
                    "sampling": cfg.sampling.model_dump(mode="json"),
                },
                lambda: stage_evaluate(cfg, run_dir, export_uri, run_id, uri),
                uses_ray=True,
            )
        )
        step(
            Stage(
                "serve",
                ("export",),
                [str(run_dir / "serve" / "summary.json")],
                {**cfg.serving.model_dump(mode="json"), "served_items": cfg.datagen.served_items},
                lambda: stage_serve(cfg, export_uri, run_dir / "serve"),
                uses_ray=True,
            )
        )
    summary = pipeline_summary(cfg, run_dir, results, stages, curves, uri, run_id, export_dir)
    log("summary:\n" + json.dumps(summary, indent=2, default=str))
    print_overview(summary, export_dir)
    return summary


def train_outputs(job: TrainJobConfig, ckpt_root: str | None) -> list[str]:
    """A training stage's run directory, and its checkpoints (and prepared data) when they live elsewhere."""
    outputs = [str(job.run_dir)]
    if ckpt_root:
        name = job.name or Path(str(job.run_dir)).name
        outputs.append(f"{ckpt_root}/{name}")
        if not job.prepared:
            outputs.append(f"{ckpt_root}/{name}-data")
    return outputs


# -- the stages -----------------------------------------------------------------------------------------------------


def stage_tokenizer(cfg: PipelineConfig, run_dir: Path, shared_path: str) -> dict[str, Any]:
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        log(f"tokenizer: {cfg.tokenizer.path} ({len(tokenizer)} entries)")
        return {"path": cfg.tokenizer.path, "size": len(tokenizer)}
    out = run_dir / "tokenizer"
    names = ", ".join(s.label for s in cfg.tokenizer.sources)
    log(f"tokenizer: training a {cfg.tokenizer.vocab_size}-entry byte-level BPE on {names}")
    tokenizer = train_from_sources(cfg.tokenizer.sources, cfg.tokenizer.vocab_size, out)
    if shared_path != str(out):
        upload(out, shared_path)
        log(f"tokenizer: copied to {shared_path}")
    return {"path": shared_path, "size": len(tokenizer)}


def datagen_corpora(cfg: PipelineConfig, gen: str) -> dict[str, list[str]]:
    """Where the datagen stages write: raw outputs, and the deduplicated pretraining and finetuning corpora."""
    dg = cfg.datagen
    raw = [f"{gen}/filtered_code"]
    pretrain = ["filtered_code"]
    exercises = ["mined_exercises"] if dg.exercises else []
    if exercises:
        raw.append(f"{gen}/mined_exercises")
    for kind, files in (("textbooks", dg.generate.textbooks), ("exercises", dg.generate.exercises)):
        for file in files:
            name = Path(file).stem
            raw.append(f"{gen}/generated/{name}")
            (pretrain if kind == "textbooks" else exercises).append(name)
    names = pretrain + exercises
    if len(set(names)) != len(names):
        raise ConfigError(f"datagen.generate: two outputs share a name ({', '.join(names)}); rename a config file")
    return {
        "raw": raw,
        "pretrain": [f"{gen}/dedup/{n}" for n in pretrain],
        "finetune": [f"{gen}/dedup/{n}" for n in exercises],
    }


def check_datagen(cfg: PipelineConfig) -> None:
    """The datagen stage's generation files and teacher, validated before anything runs."""
    from phi1_ray.datagen.config import GenerateConfig, TeacherConfig

    for kind, files in (("textbooks", cfg.datagen.generate.textbooks), ("exercises", cfg.datagen.generate.exercises)):
        for file in files:
            build(GenerateConfig, {**read_yaml(file), "kind": kind}, where=f"datagen.generate.{kind}", source=file)
    if cfg.datagen.labels is None:
        build(TeacherConfig, cfg.datagen.teacher, where="datagen.teacher")


def stage_datagen(cfg: PipelineConfig, gen: str, tokenizer_path: str) -> dict[str, Any]:
    """Teacher generations (if any), exercises mined from code, code scored by the learned quality filter."""
    from phi1_ray.datagen.config import FilterConfig, GenerateConfig
    from phi1_ray.datagen.generate import run_generation
    from phi1_ray.datagen.quality import run_filter

    dg = cfg.datagen

    def say(msg: str) -> None:
        log(f"datagen: {msg}")

    out: dict[str, Any] = {}
    generate = [("textbooks", f) for f in dg.generate.textbooks] + [("exercises", f) for f in dg.generate.exercises]
    for kind, file in generate:
        data = {
            **read_yaml(file),
            "kind": kind,
            "out": f"{gen}/generated/{Path(file).stem}",
            "ray": cfg.ray.model_dump(),
        }
        manifest = run_generation(build(GenerateConfig, data, where=f"datagen.generate.{kind}", source=file), log=say)
        out[Path(file).stem] = {"kept": manifest["rows"], "rejected": manifest["rejected"],
                                "usage": manifest.get("usage")}  # fmt: skip
    if dg.exercises:
        mined = run_generation(
            GenerateConfig(kind="exercises", out=f"{gen}/mined_exercises", seed=cfg.seed,
                           exercises={"num_items": 0, "mine": [s.model_dump() for s in dg.exercises]}),
            log=say,
        )  # fmt: skip
        out["mined_exercises"] = mined["rows"]
    encoder = {"path": dg.encoder} if dg.encoder else {"random_init": "tiny", "tokenizer": tokenizer_path}
    filtered = run_filter(
        FilterConfig(sources=[s.model_dump() for s in dg.code], out=f"{gen}/filtered_code", seed=cfg.seed,
                     labels=dg.labels, annotate=dg.annotate, threshold=dg.threshold, encoder=encoder,
                     teacher=dg.teacher, ray=cfg.ray.model_dump(),
                     mlflow={"tracking_uri": tracking_uri(cfg.mlflow, cfg.run_dir),
                             "experiment": cfg.mlflow.experiment}),
        log=say,
    )  # fmt: skip
    out.update(filter=filtered.get("classifier"), filtered_code=filtered["rows"],
               code_documents=filtered["stages"][-1].get("documents"))  # fmt: skip
    return out


def stage_decontaminate(cfg: PipelineConfig, gen: str) -> dict[str, Any]:
    """Exercises checked against the benchmarks (n-grams, AST), then every corpus deduplicated together."""
    from phi1_ray.datagen.config import DecontamConfig, DedupConfig
    from phi1_ray.datagen.decontam import run_decontamination
    from phi1_ray.datagen.dedup import run_dedup

    def say(msg: str) -> None:
        log(f"decontaminate: {msg}")

    corpora = datagen_corpora(cfg, gen)
    benchmarks = [(b, None) if b in ("humaneval", "mbpp") else ("humaneval", b) for b in cfg.datagen.benchmarks]
    removed: dict[str, Any] = {}
    inputs = []
    for path in corpora["pretrain"] + corpora["finetune"]:
        name = Path(path).name
        raw = next(r for r in corpora["raw"] if Path(r).name == name)
        if path in corpora["finetune"]:
            clean = run_decontamination(raw, f"{gen}/decontaminated/{name}", benchmarks, DecontamConfig(), log=say)
            removed[name] = clean["stages"][-1].get("removed_by_test", {})
            raw = f"{gen}/decontaminated/{name}"
        inputs.append(raw)
    deduped = run_dedup(inputs, f"{gen}/dedup", DedupConfig(threshold=cfg.datagen.dedup_threshold), log=say)
    return {
        "removed_by_benchmark": removed,
        "after_dedup": {name: m["rows"] for name, m in deduped.items()},
        "pretrain_sources": corpora["pretrain"],
        "finetune_sources": corpora["finetune"],
    }


def stage_data(cfg: PipelineConfig, out: str, tokenizer_path: str) -> dict[str, Any]:
    from phi1_ray.data.ray_pipeline import prepare

    return prepare(cfg.data.model_copy(update={"tokenizer": tokenizer_path}), out, log=log)


def stage_train(job: TrainJobConfig, name: str) -> dict[str, Any]:
    """Run (or continue, from its last checkpoint) a training job; returns its summary."""
    from phi1_ray.train.run import loss_summary, run_training

    run_file = Path(str(job.run_dir)) / RUN_FILE
    if run_file.is_file():  # finished before the stage record existed
        return {**json.loads(run_file.read_text()), **loss_summary(run_file.parent / "metrics.jsonl")}
    log(f"{name}: {job.optim.max_steps} steps of {job.model.name or 'the model'} on {job.train.num_workers} workers")
    return run_training(job, log=lambda line: log(f"{name}: {line}"))


def stage_tune(sweep: TuneJobConfig) -> dict[str, Any]:
    from phi1_ray.tune.sweep import run_sweep

    log(f"tune: {sweep.num_samples} x the search space's grid, {sweep.max_concurrent_trials} trials at a time")
    return run_sweep(sweep)


def stage_export(trained: Path, out: Path, uri_out: str, tracking: str, run_id: str) -> dict[str, Any]:
    """The best checkpoint of the last training stage as a Hugging Face directory (copied to object storage when
    the pipeline's storage is there)."""
    from phi1_ray.train.checkpoints import find_checkpoint
    from phi1_ray.train.run import export

    checkpoint = find_checkpoint(trained)
    if checkpoint is None:
        raise ConfigError(f"export: {trained} has no checkpoint")
    path = export(checkpoint, out, tracking, run_id, log)
    if uri_out != str(out):
        upload(out, uri_out)
        log(f"export: copied to {uri_out}")
    from phi1_ray.hf import count_parameters

    return {"checkpoint": str(checkpoint), "hf": str(path), "uri": uri_out, "parameters": count_parameters(path)}


def stage_evaluate(cfg: PipelineConfig, run_dir: Path, checkpoint: str, run_id: str, tracking: str) -> dict[str, Any]:
    """Completions of the config's prompts, then the benchmark: completions from Ray Data actors, each run in the
    sandbox, pass@k logged to the pipeline's MLflow run."""
    import mlflow

    from phi1_ray.checkpoint import load_model
    from phi1_ray.evals.generation import EvalSampling
    from phi1_ray.evals.run import evaluate
    from phi1_ray.evals.sandbox import Limits
    from phi1_ray.generate import generate

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(checkpoint)
    start = time.perf_counter()
    completions = generate(model, tokenizer, cfg.prompts, cfg.sampling)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c.token_ids) for c in completions)
    for prompt, c in zip(cfg.prompts, completions):
        log(f"generate ({c.finish_reason}, {len(c.token_ids)} tokens):\n{prompt}{c.text}")
    records = [{"prompt": p, **c.__dict__} for p, c in zip(cfg.prompts, completions)]
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mlflow.log_metric("generate_tokens_per_s", new_tokens / seconds)
    mlflow.log_artifact(str(out / "completions.jsonl"))
    summary: dict[str, Any] = {"generated_tokens": new_tokens, "generate_tokens_per_s": round(new_tokens / seconds, 1)}
    del model
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
        tracking_uri=tracking,
        log=log,
    )
    log(
        f"evaluate: {scores['benchmark']} pass@1 {scores['pass@1']:.3f} over {scores['problems']} problems "
        f"({scores['passed']} passed, {scores['failed']} failed, {scores['timed_out']} timed out; "
        f"sandbox: {scores['isolation']}) -> {out}"
    )
    keep = ("benchmark", "pass@1", "problems", "samples", "passed", "failed", "timed_out")
    return {**summary, **{k: scores[k] for k in keep if k in scores}}


def stage_serve(cfg: PipelineConfig, checkpoint: str, out: Path) -> dict[str, Any]:
    """Deploy the Serve app on the pipeline's Ray instance, send one completion request over HTTP, run a short
    exercise generation with the served model as the teacher, shut down."""
    import urllib.request

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
        body = json.dumps({"prompt": sv.prompt, "max_tokens": sv.max_tokens, "temperature": 0}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        latency = time.perf_counter() - start
        model_name = Path(checkpoint.rstrip("/")).name
        generated = served_generation(cfg, model_name, f"http://{sv.host}:{sv.port}/v1", out / "served_exercises")
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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


# -- the summary ----------------------------------------------------------------------------------------------------


def pipeline_summary(
    cfg: PipelineConfig,
    run_dir: Path,
    results: dict[str, dict[str, Any]],
    stages: Stages,
    curves: Path | None,
    uri: str,
    run_id: str,
    export_dir: Path,
) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_dir": str(run_dir), "stages": stages.report}
    if "datagen" in results:
        summary["datagen"] = {**results["datagen"], **results.get("decontaminate", {})}
    if "data" in results:
        data = results["data"]
        summary.update(data_documents=data["documents"], data_tokens=data["tokens"], data_blocks=data["blocks"],
                       data_quarantined=data["quarantined"])  # fmt: skip
    for name in ("pretrain", "finetune"):
        if name in results:
            r = results[name]
            summary[f"{name}_loss"] = [r.get("first_loss"), r.get("last_loss")]
            summary[f"{name}_val_loss"] = [
                r.get("first_val_loss"),
                r.get("best_val_loss" if name == "finetune" else "last_val_loss"),
            ]
    if "finetune" in results:
        summary["finetune_best_checkpoint"] = results["finetune"].get("best")
    if "tune" in results:
        summary["tune"] = {k: results["tune"].get(k) for k in ("trials", "finished", "stopped_early", "best")}
    summary["loss_curves"] = str(curves) if curves else None
    if "export" in results:
        summary.update(parameters=results["export"]["parameters"], hf_export=str(export_dir),
                       export_uri=results["export"]["uri"])  # fmt: skip
    if "evaluate" in results:
        ev = results["evaluate"]
        summary.update(generated_tokens=ev["generated_tokens"], generate_tokens_per_s=ev["generate_tokens_per_s"])
    summary.update(mlflow_uri=uri, mlflow_run_id=run_id)
    if "serve" in results:
        summary["serving"] = results["serve"]
    if "evaluate" in results:  # last: the summary ends with the score
        ev = results["evaluate"]
        summary["evaluation"] = {k: ev[k] for k in ("problems", "samples", "passed", "failed", "timed_out")}
        summary[f"{ev['benchmark']}_pass@1"] = ev["pass@1"]
    return summary


def _pair(values: list[Any] | None) -> str:
    if not values or values[0] is None:
        return "-"
    return " -> ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)


def print_overview(summary: dict[str, Any], export_dir: Path) -> None:
    """The summary a person reads: what was made, how training went, the score, where things are, what next."""
    lines = ["", "=" * 100, "phi1_ray pipeline: " + summary["run_dir"]]
    lines += [f"  {name:<14} {state}" for name, state in summary["stages"].items()]
    if "data_tokens" in summary:
        lines.append(f"  tokens prepared      {summary['data_tokens']:,} ({summary['data_documents']:,} documents)")
    for name in ("pretrain", "finetune"):
        if f"{name}_loss" in summary:
            lines.append(
                f"  {name} loss{' ' * (9 - len(name))}    train {_pair(summary[f'{name}_loss'])}, "
                f"validation {_pair(summary[f'{name}_val_loss'])}"
            )
    score = next((k for k in summary if k.endswith("_pass@1")), None)
    if score:
        ev = summary["evaluation"]
        lines.append(f"  {score:<20} {summary[score]:.3f} ({ev['passed']} of {ev['samples']} samples passed)")
    if summary.get("loss_curves"):
        lines.append(f"  loss curves          {summary['loss_curves']}")
    lines.append(f"  MLflow runs          {summary['mlflow_uri']} (run {summary['mlflow_run_id']})")
    if summary.get("hf_export"):
        lines.append(f"  exported model       {summary['hf_export']} (Hugging Face format)")
        lines.append(f"  serve it             serve run serve_apps.phi1:app_builder checkpoint={export_dir}")
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def plot_losses(run_dir: Path, runs: dict[str, Path]) -> Path | None:
    """``loss_curves.png``: training and validation loss of each training stage against its step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("loss curves: matplotlib is not installed, no picture")
        return None
    runs = {name: path for name, path in runs.items() if (path / "metrics.jsonl").is_file()}
    if not runs:
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
