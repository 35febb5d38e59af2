"""DeepSpeed training steps on one GPU with the worker loop's own step: tokens/s and MFU, beside transformers.

The Ray Train worker runs :func:`phi1_ray.train.loop.optimizer_step` on a DeepSpeed engine from
:func:`phi1_ray.train.engine.build_engine`; this script runs the same two functions without Ray (torch +
deepspeed + the project only), so it works on a bare GPU box. Settings come from a pretraining preset
(default ``configs/pretrain/phi-1-small.yaml``: fp16, ZeRO-2, sequence 2048, dropout 0.1), with one worker.
The comparison runs transformers' ``PhiForCausalLM`` (SDPA attention) through the same engine and step.

    python benchmarks/gpu_train.py [--quick] [--config FILE] [--micro-batch 8 16] [--accum 4]

MFU = tokens/s x (6 N + 12 L d T) / peak, N without the input embedding. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from phi1_ray.config import load_config
from phi1_ray.train.config import TrainJobConfig


def run_case(job, model: torch.nn.Module, steps: int, warmup: int, device: str) -> dict:
    from phi1_ray.train.engine import build_engine
    from phi1_ray.train.loop import optimizer_step

    engine = build_engine(model, job.train, job.optim, job.train.precision)
    B, T = job.train.micro_batch, job.data.seq_len
    vocab = job.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randint(0, vocab, (B, T + 1), device=device, generator=gen) for _ in range(4)]

    def batches():
        i = 0
        while True:
            yield {"tokens": pool[i % len(pool)]}
            i += 1

    stream = batches()
    for _ in range(warmup):
        optimizer_step(engine, stream, job.train.grad_accum)
    _sync(device)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        out = optimizer_step(engine, stream, job.train.grad_accum)
        tokens += out.tokens
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / steps,
        "loss": out.loss,
        "loss_scale": out.loss_scale,
        "skipped_steps": engine.skipped_steps,
        "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
    }
    engine.destroy()
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default="configs/pretrain/phi-1-small.yaml")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--precision", default=None, help="override the preset's (fp16)")
    parser.add_argument("--zero-stage", type=int, default=None)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. model.name=phi-1")
    parser.add_argument("--cpu", action="store_true", help="smoke-run the script on CPU (gloo, bf16)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        print(json.dumps({"benchmark": "gpu_train", "skipped": "no CUDA device"}))
        return

    from transformers import PhiConfig, PhiForCausalLM

    from phi1_ray.hf import config_to_hf
    from phi1_ray.model import FLASH_ATTN_AVAILABLE, Phi1ForCausalLM
    from phi1_ray.train.engine import init_single_process
    from phi1_ray.train.metrics import flops_per_token, mfu, peak_tflops

    device = "cpu" if args.cpu else "cuda"
    init_single_process("gloo" if args.cpu else "nccl")
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = "cpu" if args.cpu else torch.cuda.get_device_name()
    peak = peak_tflops(gpu)
    steps, warmup = (3, 2) if args.quick else (8, 3)
    rows = []
    for micro in args.micro_batch:
        overrides = [
            "train.num_workers=1",
            f"train.micro_batch={micro}",
            f"train.effective_batch={micro * args.accum}",
            "optim.warmup_steps=10",
            "optim.max_steps=1000",
        ]
        if args.precision:
            overrides.append(f"train.precision={args.precision}")
        if args.zero_stage is not None:
            overrides.append(f"train.zero_stage={args.zero_stage}")
        if not FLASH_ATTN_AVAILABLE:
            overrides.append("model.attn_impl=sdpa")
        job = load_config(TrainJobConfig, args.config, overrides + args.set)
        cfg = job.model
        fpt = flops_per_token(cfg, job.data.seq_len)
        row = {
            "model": cfg.name,
            "precision": job.train.precision,
            "zero_stage": job.train.zero_stage,
            "attn": cfg.attn_impl,
            "micro_batch": micro,
            "accum": args.accum,
            "seq": job.data.seq_len,
        }
        for who in ("ours",) if args.no_hf else ("ours", "hf"):
            torch.manual_seed(0)
            try:
                if who == "ours":
                    model = Phi1ForCausalLM(cfg)
                else:
                    hf_kwargs = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
                    model = _Logits(PhiForCausalLM(PhiConfig(**hf_kwargs, attn_implementation="sdpa")))
                res = run_case(job, model, steps, warmup, device)
                row[f"{who}_tokens_per_s"] = round(res["tokens_per_s"])
                row[f"{who}_mfu"] = round(mfu(res["tokens_per_s"], fpt, peak) or 0.0, 4) if peak else None
                row[f"{who}_step_s"] = round(res["step_s"], 4)
                row[f"{who}_max_mem_gib"] = res["max_mem_gib"]
                row[f"{who}_loss_scale"] = res["loss_scale"]
                row[f"{who}_skipped"] = res["skipped_steps"]
            except torch.cuda.OutOfMemoryError:
                row[f"{who}_tokens_per_s"] = "OOM"
            finally:
                model = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
        if isinstance(row.get("hf_tokens_per_s"), int) and isinstance(row.get("ours_tokens_per_s"), int):
            row["ratio"] = round(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = max(
        (r for r in rows if isinstance(r.get("ours_tokens_per_s"), int)),
        key=lambda r: r["ours_tokens_per_s"],
        default={},
    )
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    print(
        json.dumps(
            {
                "benchmark": "gpu_train",
                "gpu": gpu,
                "peak_tflops": peak,
                "mfu": best.get("ours_mfu"),
                "tokens_per_s": best.get("ours_tokens_per_s"),
                "ratio": min(ratios) if ratios else None,
                "rows": rows,
                "torch": torch.__version__,
                "deepspeed": __import__("deepspeed").__version__,
            }
        )
    )


class _Logits(torch.nn.Module):
    """transformers' model as a plain ``ids -> logits`` module, the interface the training step calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids).logits


if __name__ == "__main__":
    main()
