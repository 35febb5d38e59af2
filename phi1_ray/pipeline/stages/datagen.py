"""The datagen stage: teacher generations (textbooks, exercises), exercises mined from code, and code scored by
the learned quality filter; outputs under ``<store>/datagen``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi1_ray.config import build as build_config
from phi1_ray.config import read_yaml
from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context
from phi1_ray.tracking import tracking_uri

NAME = "datagen"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    settings = {**p.cfg.datagen.model_dump(mode="json", exclude={"served_items", "enabled"}), "seed": p.cfg.seed}
    run = lambda: make(p.cfg, p.gen, p.tokenizer_path)  # noqa: E731
    return Stage(NAME, ("tokenizer",), p.corpora["raw"], settings, run, uses_ray=True)


def say(msg: str) -> None:
    log(f"datagen: {msg}")


def _generate(cfg: PipelineConfig, gen: str) -> dict[str, Any]:
    """The configured teacher generations, one output per generation file."""
    from phi1_ray.datagen.config import GenerateConfig
    from phi1_ray.datagen.generate import run_generation

    dg, out = cfg.datagen, {}
    generate = [("textbooks", f) for f in dg.generate.textbooks] + [("exercises", f) for f in dg.generate.exercises]
    for kind, file in generate:
        data = {
            **read_yaml(file),
            "kind": kind,
            "out": f"{gen}/generated/{Path(file).stem}",
            "ray": cfg.ray.model_dump(),
        }
        job = build_config(GenerateConfig, data, where=f"datagen.generate.{kind}", source=file)
        manifest = run_generation(job, log=say)
        out[Path(file).stem] = {"kept": manifest["rows"], "rejected": manifest["rejected"],
                                "usage": manifest.get("usage")}  # fmt: skip
    return out


def make(cfg: PipelineConfig, gen: str, tokenizer_path: str) -> dict[str, Any]:
    """Teacher generations (if any), exercises mined from code, code scored by the learned quality filter."""
    from phi1_ray.datagen.config import FilterConfig, GenerateConfig
    from phi1_ray.datagen.generate import run_generation
    from phi1_ray.datagen.quality import run_filter

    dg = cfg.datagen
    out = _generate(cfg, gen)
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
