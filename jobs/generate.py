"""Complete a prompt: ``python jobs/generate.py --checkpoint PATH --prompt TEXT [--json]``.

PATH is a phi1_ray checkpoint or a Hugging Face directory (or hub id when online). Plain output is the completion
text; ``--json`` prints ``{"completion": str, "token_ids": [int, ...]}`` with the new tokens only.
"""

import argparse
import json
import sys

from phi1_ray.checkpoint import load_model
from phi1_ray.cli import run_main
from phi1_ray.config import SamplingConfig, build
from phi1_ray.errors import CheckpointError
from phi1_ray.generate import generate, stream
from phi1_ray.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id, when the checkpoint has none")
    parser.add_argument("--stream", action="store_true", help="print text as it is decoded")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    params = build(
        SamplingConfig,
        {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed,
            "stop": args.stop,
        },
        where="generate",
    )
    model, tokenizer = load_model(args.checkpoint)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} holds no tokenizer files; pass --tokenizer DIR_OR_HUB_ID")
    if args.stream and not args.json:
        for delta in stream(model, tokenizer, args.prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    completion = generate(model, tokenizer, [args.prompt], params)[0]
    if args.json:
        print(json.dumps({"completion": completion.text, "token_ids": completion.token_ids}))
    else:
        print(completion.text)


if __name__ == "__main__":
    run_main(main)
