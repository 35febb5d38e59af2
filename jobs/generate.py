"""Complete a prompt: ``python jobs/generate.py --checkpoint PATH --prompt TEXT [--json]``.

PATH is a phi1_ray checkpoint or a Hugging Face directory (or hub id when online). Plain output is the completion
text; ``--json`` prints ``{"completion": str, "token_ids": [int, ...]}`` with the new tokens only. Every flag sets
a key of the config (listed below; ``sampling.top_k=50`` is ``--top-k 50``); nothing else goes to stdout.
"""

import json
import sys

from phi1_ray.checkpoint import load_model
from phi1_ray.cli import Flag, config_from_argv, run_main, unescape
from phi1_ray.errors import CheckpointError
from phi1_ray.generate import GenerateJobConfig, generate, stream
from phi1_ray.tokenizer import load_tokenizer

FLAGS = {
    "--checkpoint": "checkpoint",
    "--prompt": "prompt",
    "--max-new-tokens": "sampling.max_new_tokens",
    "--temperature": "sampling.temperature",
    "--top-p": "sampling.top_p",
    "--top-k": "sampling.top_k",
    "--seed": "sampling.seed",
    "--stop": Flag(
        "sampling.stop",
        kind="append",
        convert=unescape,
        help=r"stop sequence (repeatable; '\ndef' is a newline, then def)",
    ),
    "--tokenizer": "tokenizer",
    "--stream": Flag("stream", kind="switch"),
    "--json": Flag("json_output", kind="switch"),
}


def main() -> None:
    cfg = config_from_argv(GenerateJobConfig, __doc__, flags=FLAGS, echo=False)  # stdout: the completion only
    model, tokenizer = load_model(cfg.checkpoint)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise CheckpointError(f"{cfg.checkpoint} holds no tokenizer files; pass --tokenizer DIR_OR_HUB_ID")
    if cfg.stream and not cfg.json_output:
        for delta in stream(model, tokenizer, cfg.prompt, cfg.sampling):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    completion = generate(model, tokenizer, [cfg.prompt], cfg.sampling)[0]
    if cfg.json_output:
        print(json.dumps({"completion": completion.text, "token_ids": completion.token_ids}))
    else:
        print(completion.text)


if __name__ == "__main__":
    run_main(main)
