"""The tokenizer stage: the configured tokenizer (``tokenizer.path``, a hub id or directory), or a codegen-style
byte-level BPE trained offline on the configured sources and copied beside the large outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.pipeline.config import PipelineConfig
from phi1_ray.pipeline.records import Stage, log
from phi1_ray.pipeline.stages import Context
from phi1_ray.tokenizer import check_vocab, load_tokenizer, train_from_sources

NAME = "tokenizer"


def build(ctx: Context) -> Stage:
    p = ctx.plan
    outputs = [] if p.cfg.tokenizer.path else list(dict.fromkeys([str(p.run_dir / "tokenizer"), p.tokenizer_path]))
    settings = p.cfg.tokenizer.model_dump(mode="json")
    return Stage(NAME, (), outputs, settings, lambda: make(p.cfg, p.run_dir, p.tokenizer_path))


def after(ctx: Context) -> None:
    """The model must have an embedding row for every token the shared tokenizer emits."""
    check_vocab(load_tokenizer(ctx.plan.tokenizer_path), ctx.plan.cfg.model.vocab_size)


def make(cfg: PipelineConfig, run_dir: Path, shared_path: str) -> dict[str, Any]:
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        log(f"tokenizer: {cfg.tokenizer.path} ({len(tokenizer)} entries)")
        return {"path": cfg.tokenizer.path, "size": len(tokenizer)}
    out = run_dir / "tokenizer"
    names = ", ".join(s.label for s in cfg.tokenizer.sources)
    log(f"tokenizer: training a {cfg.tokenizer.vocab_size}-entry byte-level BPE on {names}")
    tokenizer = train_from_sources(cfg.tokenizer.sources, cfg.tokenizer.vocab_size, out)
    if shared_path != str(out):
        storage.upload(out, shared_path)
        log(f"tokenizer: copied to {shared_path}")
    return {"path": shared_path, "size": len(tokenizer)}
