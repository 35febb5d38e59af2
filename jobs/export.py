"""Export a checkpoint to a Hugging Face directory: ``python jobs/export.py --checkpoint PATH --out DIR``.

PATH may be a training run directory (its best, else latest checkpoint) or one training checkpoint: the ZeRO
shards are consolidated into fp32 weights first.

The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (no trust_remote_code) and vLLM.
"""

from phi1_ray.checkpoint import load_model
from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.hf import ExportJobConfig, export_hf


def main() -> None:
    cfg = config_from_argv(ExportJobConfig, __doc__, flags={"--checkpoint": "checkpoint"})
    model, tokenizer = load_model(cfg.checkpoint)
    out = export_hf(model, cfg.out, tokenizer)
    print(f"exported {model.num_parameters():,} parameters to {out}")


if __name__ == "__main__":
    run_main(main)
