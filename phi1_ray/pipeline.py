"""The end-to-end job behind ``make demo``. Stages so far: tokenizer, data preparation, model, export, generation.

Each stage writes its outputs under ``run_dir`` and is skipped, with a line saying so, when they already exist.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from phi1_ray.checkpoint import MANIFEST, load_model, save_checkpoint
from phi1_ray.config import PipelineConfig
from phi1_ray.generate import generate
from phi1_ray.hf import export_hf
from phi1_ray.model import Phi1ForCausalLM
from phi1_ray.tokenizer import check_vocab, load_tokenizer, train_from_sources
from phi1_ray.tracking import mlflow_run, tracking_uri


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


def stage_data(cfg: PipelineConfig, run_dir: Path, tokenizer_path: str) -> dict[str, Any]:
    from phi1_ray.data.ray_pipeline import init_ray, prepare

    data = cfg.data.model_copy(update={"tokenizer": tokenizer_path})
    init_ray(cfg.ray)
    return prepare(data, run_dir / "data", log=log)


def stage_model(cfg: PipelineConfig, run_dir: Path, tokenizer: Any) -> tuple[Phi1ForCausalLM, Path]:
    out = run_dir / "checkpoint"
    if (out / MANIFEST).is_file():
        log(f"model: {out} exists, skipped")
        model, _ = load_model(out)
        return model, out
    torch.manual_seed(cfg.seed)
    eos = tokenizer.eos_token_id
    model_cfg = cfg.model.model_copy(update={"eos_token_id": eos, "bos_token_id": eos})
    model = Phi1ForCausalLM(model_cfg).eval()
    log(f"model: built {cfg.model.name or 'custom'} ({model.num_parameters():,} parameters), saved to {out}")
    save_checkpoint(model, out, tokenizer)
    return model, out


def run(cfg: PipelineConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    with mlflow_run(cfg.mlflow, run_dir, "pipeline", cfg) as run:
        import mlflow

        tokenizer = stage_tokenizer(cfg, run_dir)
        check_vocab(tokenizer, cfg.model.vocab_size)
        manifest = stage_data(cfg, run_dir, cfg.tokenizer.path or str(run_dir / "tokenizer"))
        mlflow.log_metrics({"data_tokens": manifest["tokens"], "data_blocks": manifest["blocks"]})
        model, ckpt = stage_model(cfg, run_dir, tokenizer)
        hf_dir = export_hf(model, run_dir / "hf", tokenizer)
        log(f"export: Hugging Face directory at {hf_dir}")

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
        summary.update(
            data_documents=manifest["documents"],
            data_tokens=manifest["tokens"],
            data_blocks=manifest["blocks"],
            data_quarantined=manifest["quarantined"],
            parameters=model.num_parameters(),
            checkpoint=str(ckpt),
            hf_export=str(hf_dir),
            generated_tokens=new_tokens,
            generate_tokens_per_s=round(new_tokens / seconds, 1),
            mlflow_uri=tracking_uri(cfg.mlflow, run_dir),
            mlflow_run_id=run.info.run_id,
        )
    log("summary:\n" + json.dumps(summary, indent=2))
    log(f"generate again with: python jobs/generate.py --checkpoint {ckpt} --prompt 'def add(a, b):'")
    return summary
