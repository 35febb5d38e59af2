"""Tokenize and pack a corpus once into Parquet shards + manifest.json, for many training runs and epochs.

    python jobs/prepare_data.py --config configs/data/code_textbook.yaml [key=value ...]
    python jobs/prepare_data.py --input PATH [--input PATH ...] --tokenizer DIR --seq-len N --out DIR [--shuffle]

The quick form gives every input the same weight and keeps stream order (no shuffle) unless asked: each
``--input`` is a source of ``data.sources`` (JSONL or Parquet by extension, else a tree of files).
"""

from typing import Any

from phi1_ray.cli import Flag, config_from_argv, run_main
from phi1_ray.data.config import PrepareDataConfig
from phi1_ray.data.ray_pipeline import prepare
from phi1_ray.data.read import source_for_path
from phi1_ray.runtime import init_ray


def sources(paths: list[str]) -> list[dict[str, Any]]:
    """``--input`` paths as ``data.sources`` entries."""
    return [source_for_path(p).model_dump(exclude_defaults=True) for p in paths]


FLAGS = {
    "--input": Flag("data.sources", kind="append", convert=sources, metavar="PATH",
                    help="JSONL / Parquet file or a tree of files (repeatable)"),
    "--tokenizer": Flag("data.tokenizer", metavar="DIR"),
    "--seq-len": "data.seq_len",
    "--val-fraction": "data.val_fraction",
    "--shuffle": Flag("data.shuffle", kind="switch"),
    "--strict": Flag("data.strict", kind="switch"),
}  # fmt: skip


def main() -> None:
    cfg = config_from_argv(PrepareDataConfig, __doc__, flags=FLAGS)
    init_ray(cfg.ray)
    prepare(cfg.data, cfg.out or f"{cfg.run_dir}/data")


if __name__ == "__main__":
    run_main(main)
