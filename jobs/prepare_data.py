"""Tokenize and pack a corpus once into Parquet shards + manifest.json, for many training runs and epochs.

    python jobs/prepare_data.py --config configs/data/code_textbook.yaml [key=value ...]
    python jobs/prepare_data.py --input PATH [--input PATH ...] --tokenizer DIR --seq-len N --out DIR [--shuffle]

The quick form gives every input the same weight and keeps stream order (no shuffle) unless asked.
"""

import argparse

from phi1_ray.cli import run_main
from phi1_ray.config import PrepareDataConfig, apply_overrides, build, read_yaml, to_yaml
from phi1_ray.data.ray_pipeline import prepare
from phi1_ray.data.read import source_for_path
from phi1_ray.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/data/")
    parser.add_argument("--run-dir")
    parser.add_argument("--input", action="append", default=[], help="JSONL / Parquet file or a tree of files")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--out", help="output directory (local, s3://, gs://)")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=1024")
    args = parser.parse_args()

    data = read_yaml(args.config) if args.config else {}
    section = data.setdefault("data", {})
    if args.input:
        section["sources"] = [source_for_path(p).model_dump(exclude_defaults=True) for p in args.input]
    for key, value in (("tokenizer", args.tokenizer), ("seq_len", args.seq_len), ("val_fraction", args.val_fraction)):
        if value is not None:
            section[key] = value
    if args.shuffle:
        section["shuffle"] = True
    if args.strict:
        section["strict"] = True
    if args.out:
        data["out"] = args.out
    if args.run_dir:
        data["run_dir"] = args.run_dir
    cfg = build(PrepareDataConfig, apply_overrides(data, args.overrides), source=args.config)
    print("# resolved config\n" + to_yaml(cfg), flush=True)
    init_ray(cfg.ray)
    prepare(cfg.data, cfg.out or f"{cfg.run_dir}/data")


if __name__ == "__main__":
    run_main(main)
