"""phi1_ray's model against transformers' PhiForCausalLM, same weights, same machine, one run.

Measures training-step tokens/s (forward + next-token loss + backward + AdamW step) and greedy generation
tokens/s at batch 1 and 8 (KV cache, new tokens only). Rounds alternate between the two implementations and the
median of the per-round ratios counts, so background load hits both alike.

    python benchmarks/model_vs_hf.py [--quick] [--preset tiny] [model.n_layer=4 ...]

Targets (issue 2): training ratio >= 1.0, generation at batch 1 >= 1.5. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from phi1_ray.config import SamplingConfig, apply_overrides, build
from phi1_ray.generate import generate_ids
from phi1_ray.hf import export_hf
from phi1_ray.model import ModelConfig, Phi1ForCausalLM, next_token_loss


def median_rounds(ours: Callable[[], float], theirs: Callable[[], float], rounds: int) -> dict[str, float]:
    """Run both once per round, back to back; medians of tokens/s and of the per-round ratio.

    A round's two runs see the same background load, so the per-round ratio is steadier than a ratio of medians.
    """
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(theirs())
    ratio = statistics.median(x / y for x, y in zip(a, b))
    return {"ours": statistics.median(a), "hf": statistics.median(b), "ratio": ratio}


def train_steps(step: Callable[[torch.Tensor], None], batch: torch.Tensor, steps: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        return steps * batch.numel() / (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of a minute or less")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="model overrides, e.g. n_layer=4")
    args = parser.parse_args()
    rounds, steps = (3, 3) if args.quick else (9, 6)

    torch.manual_seed(0)
    fields = apply_overrides({"name": args.preset}, args.overrides)
    cfg = build(ModelConfig, fields, where="model")
    ours = Phi1ForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    theirs.generation_config.eos_token_id = None  # both run the full number of new tokens

    # Training step.
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours(ids: torch.Tensor) -> None:
        next_token_loss(ours(ids), ids).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs(ids: torch.Tensor) -> None:
        theirs(input_ids=ids, labels=ids).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    for step in (step_ours, step_theirs):  # warm-up
        step(batch)
    train = median_rounds(train_steps(step_ours, batch, steps), train_steps(step_theirs, batch, steps), rounds)

    # Greedy generation with a KV cache.
    ours.eval()
    theirs.eval()
    gen: dict[int, dict[str, float]] = {}
    for bsz in (1, 8):
        prompts = torch.randint(1, cfg.vocab_size, (bsz, 32))
        params = SamplingConfig(max_new_tokens=args.new_tokens)
        hf_gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        def run_ours(prompts: torch.Tensor = prompts, params: SamplingConfig = params) -> float:
            start = time.perf_counter()
            out = generate_ids(ours, prompts.tolist(), params, eos_token_id=-1)
            return sum(map(len, out)) / (time.perf_counter() - start)

        def run_theirs(prompts: torch.Tensor = prompts, hf_gen: GenerationConfig = hf_gen, bsz: int = bsz) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=hf_gen)
            return (out.size(1) - prompts.size(1)) * bsz / (time.perf_counter() - start)

        run_ours()
        run_theirs()
        gen[bsz] = median_rounds(run_ours, run_theirs, rounds)

    result = {
        "benchmark": "model_vs_hf",
        "ratio": round(min(train["ratio"], gen[1]["ratio"] / 1.5), 3),
        "train_ratio": round(train["ratio"], 3),
        "generate_b1_ratio": round(gen[1]["ratio"], 3),
        "generate_b8_ratio": round(gen[8]["ratio"], 3),
        "train_tokens_per_s": {k: round(train[k]) for k in ("ours", "hf")},
        "generate_b1_tokens_per_s": {k: round(gen[1][k], 1) for k in ("ours", "hf")},
        "generate_b8_tokens_per_s": {k: round(gen[8][k], 1) for k in ("ours", "hf")},
        "rounds": rounds,
        "model": {"preset": args.preset, "parameters": ours.num_parameters(), "overrides": args.overrides},
        "train_shape": [args.batch, args.seq],
        "new_tokens": args.new_tokens,
        "quick": args.quick,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(
        f"train {result['train_ratio']}x  generate b1 {result['generate_b1_ratio']}x  "
        f"b8 {result['generate_b8_ratio']}x (ours / transformers; 'ratio' is min(train, b1/1.5), target >= 1)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
