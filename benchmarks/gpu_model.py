"""Training-step throughput and MFU of phi1_ray's model on one GPU, beside transformers' PhiForCausalLM.

At the ``phi-1-small`` and ``phi-1`` sizes, sequence 2048, bf16 and fp16 weights: forward + next-token loss +
backward + AdamW step, tokens/s and MFU (model FLOPs 6·N per token plus attention 12·L·d·T, over the GPU's dense
peak). Needs torch, transformers and the project; without a CUDA device it prints a skip line and exits 0.

    python benchmarks/gpu_model.py [--quick] [--presets phi-1-small phi-1] [--micro-batch 4]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from phi1_ray.train.metrics import peak_tflops


def measure(step, steps: int, tokens: int) -> float:
    step()  # warm-up (kernel selection, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--presets", nargs="+", default=["phi-1-small", "phi-1"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_model", "skipped": "no CUDA device"}))
        return

    from transformers import PhiConfig, PhiForCausalLM

    from phi1_ray.hf import config_to_hf
    from phi1_ray.model import FLASH_ATTN_AVAILABLE, ModelConfig, Phi1ForCausalLM, next_token_loss

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    peak = peak_tflops(gpu)
    steps = 3 if args.quick else 10
    rows = []
    for preset in args.presets:
        for dtype_name in args.dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
            impl = "flash_attn" if FLASH_ATTN_AVAILABLE else "sdpa"
            cfg = ModelConfig.from_name(preset, attn_impl=impl)
            B, T = args.micro_batch, args.seq
            ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
            row = {"preset": preset, "dtype": dtype_name, "attn": impl, "micro_batch": B, "seq": T}
            flops_per_token = None
            for who in ("ours", "hf") if not args.no_hf else ("ours",):
                torch.cuda.empty_cache()
                try:
                    if who == "ours":
                        model = Phi1ForCausalLM(cfg).to(device=device, dtype=dtype).train()

                        def loss_fn(model=model, ids=ids):
                            return next_token_loss(model(ids), ids)
                    else:
                        skip = ("architectures", "model_type")
                        hf_kwargs = {k: v for k, v in config_to_hf(cfg).items() if k not in skip}
                        model = PhiForCausalLM(PhiConfig(**hf_kwargs, attn_implementation="sdpa"))
                        model = model.to(device=device, dtype=dtype).train()

                        def loss_fn(model=model, ids=ids):
                            return model(input_ids=ids, labels=ids).loss

                    n_params = sum(p.numel() for p in model.parameters())
                    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * T
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

                    def step(loss_fn=loss_fn, opt=opt):
                        loss_fn().backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                    tps = measure(step, steps, B * T)
                    row[f"{who}_tokens_per_s"] = round(tps)
                    if peak:
                        row[f"{who}_mfu"] = round(tps * flops_per_token / (peak * 1e12), 4)
                    row[f"{who}_max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                except torch.cuda.OutOfMemoryError:
                    row[f"{who}_tokens_per_s"] = "OOM"
                finally:
                    model = opt = None
                    torch.cuda.reset_peak_memory_stats()
            if isinstance(row.get("ours_tokens_per_s"), int) and isinstance(row.get("hf_tokens_per_s"), int):
                row["ratio"] = round(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    print(
        json.dumps(
            {
                "benchmark": "gpu_model",
                "gpu": gpu,
                "peak_tflops": peak,
                "ratio": min(ratios) if ratios else None,
                "rows": rows,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
