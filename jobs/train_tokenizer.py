"""Train a codegen-style byte-level BPE offline (GPT-2 pre-tokenization, whitespace-run tokens, <|endoftext|>).

    python jobs/train_tokenizer.py --config configs/tokenizer/offline.yaml [tokenizer.vocab_size=8192 ...]

The directory it writes loads with transformers.AutoTokenizer and serves as data.tokenizer for the other jobs.
"""

from pathlib import Path

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.tokenizer import TrainTokenizerConfig, train_from_sources


def main() -> None:
    cfg = config_from_argv(TrainTokenizerConfig, __doc__)
    out = Path(cfg.out or Path(cfg.run_dir) / "tokenizer")
    tokenizer = train_from_sources(cfg.tokenizer.sources, cfg.tokenizer.vocab_size, out)
    print(f"tokenizer: {len(tokenizer)} entries, <|endoftext|> = {tokenizer.eos_token_id}, saved to {out}")


if __name__ == "__main__":
    run_main(main)
