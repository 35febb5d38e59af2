"""Remove records that overlap HumanEval / MBPP (13-gram overlap, AST match with identifiers renamed, embedding
similarity), as in the paper's section 5.

    python jobs/decontaminate.py --input PATH --out DIR [--benchmark humaneval] [--benchmark mbpp=FILE]
        [--tau 0.9] [--ngram 13] [--encoder DIR --embedding-similarity 0.95]

PATH: JSONL or Parquet records (``text``, or ``prompt`` + ``completion``) or a data-generation output directory.
Writes the surviving records to DIR (Parquet shards + manifest.json, a ``datagen`` corpus source) and
DIR/report.jsonl: one line per removed record with its index in the input, the matched ``task_id`` and the test.
"""

import argparse
import json

from phi1_ray.cli import run_main
from phi1_ray.config import RayConfig, build
from phi1_ray.datagen.config import DecontamConfig
from phi1_ray.datagen.decontam import run_decontamination
from phi1_ray.errors import ConfigError
from phi1_ray.runtime import init_ray

BENCHMARKS = ("humaneval", "mbpp")


def parse_benchmark(value: str) -> tuple[str, str | None]:
    name, _, path = value.partition("=")
    if name not in BENCHMARKS:
        raise ConfigError(f"--benchmark {value!r}: use humaneval, humaneval=FILE or mbpp=FILE")
    if name == "mbpp" and not path:
        raise ConfigError("--benchmark mbpp needs a file in MBPP's schema: --benchmark mbpp=FILE (no download)")
    return name, path or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--benchmark", action="append", default=[], help="humaneval (default) or mbpp=FILE")
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--encoder", help="phi1_ray checkpoint or Hugging Face model directory for embeddings")
    parser.add_argument("--embedding-similarity", type=float, default=0.95)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()
    benchmarks = [parse_benchmark(b) for b in args.benchmark] or [("humaneval", None)]
    cfg = build(
        DecontamConfig,
        {"ngram": args.ngram, "tau": args.tau, "embedding_similarity": args.embedding_similarity,
         "encoder": {"path": args.encoder}},
    )  # fmt: skip
    if args.actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {args.actors}")
    init_ray(RayConfig())
    manifest = run_decontamination(args.input, args.out, benchmarks, cfg, actors=args.actors)
    print(json.dumps({"out": args.out, "kept": manifest["rows"], "removed": manifest["rejected"]}), flush=True)


if __name__ == "__main__":
    run_main(main)
