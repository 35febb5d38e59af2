"""The decontaminate stage: generated exercises checked against the benchmarks (n-grams, AST), then every corpus
deduplicated together (exact + MinHash-LSH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.plan import datagen_corpora
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context

NAME = "decontaminate"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    outputs = [f"{p.gen}/decontaminated", f"{p.gen}/dedup"]
    settings = {"benchmarks": p.cfg.datagen.benchmarks, "dedup_threshold": p.cfg.datagen.dedup_threshold}
    return Stage(NAME, ("datagen",), outputs, settings, lambda: make(p.cfg, p.gen), uses_ray=True)


def make(cfg: PipelineConfig, gen: str) -> dict[str, Any]:
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
