"""The pipeline's plan: everything the stages need, resolved from the config before anything runs.

Which stages are on (and whether each has what it needs), where the large outputs go (``storage`` or the run
directory), the tokenizer every stage shares, the datagen corpora, and the typed configs of the training jobs and
the sweep: a bad setting fails here, before a stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.config import build, merge, read_yaml
from phi1_ray.data.config import SourceConfig
from phi1_ray.errors import ConfigError, StorageError
from phi1_ray.pipeline.config import PipelineConfig, StageJobConfig
from phi1_ray.tracking import flatten, tracking_uri
from phi1_ray.train.config import TrainJobConfig
from phi1_ray.train.run import RUNTIME_MODEL_FIELDS
from phi1_ray.tune.config import TuneJobConfig

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
    """A training stage's job: its file, its overrides, then what the pipeline forces; the model's sizes are the
    pipeline's, its runtime options the job's."""
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
        return f"{self.store}/export" if storage.is_uri(self.store) else str(self.export_dir)

    @property
    def tracking_uri(self) -> str:
        return tracking_uri(self.cfg.mlflow, self.run_dir)


def _store(cfg: PipelineConfig, run_dir: Path) -> str:
    try:
        storage.check_scheme(cfg.storage or "", "storage")
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    return storage.resolve(cfg.storage.rstrip("/") if cfg.storage else run_dir)


def _train_jobs(
    cfg: PipelineConfig, on: dict[str, bool], run_dir: Path, store: str, tokenizer_path: str, corpora: dict
) -> tuple[dict[str, TrainJobConfig], dict[str, Any], str | None]:
    """(the pretraining and finetuning jobs, the finetuning job's data before building, the checkpoints' root)."""
    shared = {  # one Ray instance, one MLflow store, one tokenizer for the whole pipeline
        "ray": cfg.ray.model_dump(),
        "mlflow": {"tracking_uri": tracking_uri(cfg.mlflow, run_dir), "experiment": cfg.mlflow.experiment},
        "seed": cfg.seed,
        "export": False,  # the export stage writes the Hugging Face directory
    }
    if cfg.storage:
        shared["storage_path"] = f"{store}/checkpoints"
    pre_forced = {
        **shared,
        "run_dir": str(run_dir / "pretrain"),
        "prepared": f"{store}/data",
        "data": {"tokenizer": tokenizer_path, "seq_len": cfg.data.seq_len},
    }
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
    pre_data = stage_job_data(cfg, cfg.pretrain, pre_forced)
    fine_data = stage_job_data(cfg, cfg.finetune, fine_forced)
    jobs = {
        "pretrain": build(TrainJobConfig, pre_data, where="pretrain", source=cfg.pretrain.config),
        "finetune": build(TrainJobConfig, fine_data, where="finetune", source=cfg.finetune.config),
    }
    return jobs, fine_data, shared.get("storage_path")


def plan(cfg: PipelineConfig) -> Plan:
    run_dir = Path(cfg.run_dir).resolve()
    on = enabled_stages(cfg)
    store = _store(cfg, run_dir)
    # a trained tokenizer goes beside the large outputs too: workers on every node load it
    default_tokenizer = f"{store}/tokenizer" if storage.is_uri(store) else str(run_dir / "tokenizer")
    tokenizer_path = cfg.tokenizer.path or default_tokenizer
    corpora: dict[str, list[str]] = {"raw": [], "pretrain": [], "finetune": []}
    if cfg.datagen.enabled:  # the corpora come from the datagen stages
        check_datagen(cfg)
        corpora = datagen_corpora(cfg, f"{store}/datagen")
        cfg = cfg.model_copy(deep=True)
        cfg.data.sources = [SourceConfig(type="datagen", paths=corpora["pretrain"])]
    jobs, fine_data, ckpt_root = _train_jobs(cfg, on, run_dir, store, tokenizer_path, corpora)
    sweep = tune_job(cfg, fine_data, run_dir) if on["tune"] else None
    return Plan(cfg, on, run_dir, store, tokenizer_path, corpora, jobs, fine_data, sweep, ckpt_root)


def train_outputs(job: TrainJobConfig, ckpt_root: str | None) -> list[str]:
    """A training stage's run directory, and its checkpoints (and prepared data) when they live elsewhere."""
    outputs = [str(job.run_dir)]
    if ckpt_root:
        name = job.name or Path(str(job.run_dir)).name
        outputs.append(f"{ckpt_root}/{name}")
        if not job.prepared:
            outputs.append(f"{ckpt_root}/{name}-data")
    return outputs


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
