"""Export a checkpoint to a Hugging Face directory: ``python jobs/export.py --checkpoint PATH --out DIR``.

PATH may be a training run directory (its best, else latest checkpoint) or one training checkpoint: the ZeRO
shards are consolidated into fp32 weights first.

The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (no trust_remote_code) and vLLM.
"""

import argparse

from phi1_ray.checkpoint import load_model
from phi1_ray.cli import run_main
from phi1_ray.hf import export_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training run or checkpoint, phi1_ray checkpoint, or Hugging Face directory / hub id",
    )
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    model, tokenizer = load_model(args.checkpoint)
    out = export_hf(model, args.out, tokenizer)
    print(f"exported {model.num_parameters():,} parameters to {out}")


if __name__ == "__main__":
    run_main(main)
