"""Exact and near-duplicate removal (MinHash LSH) across generated and filtered datasets; the first occurrence
of a document, in the order of the inputs, stays.

    python jobs/dedup.py --input DIR_OR_FILE [--input ...] --out DIR [--threshold 0.8] [--num-perm 128]

Each input's survivors go to DIR/<name>/ (Parquet shards + manifest.json, a ``datagen`` corpus source); every
removed record is listed in DIR/report.jsonl with the record it duplicates and the test (exact / near).
"""

import argparse
import json

from phi1_ray.cli import run_main
from phi1_ray.config import RayConfig, build
from phi1_ray.datagen.config import DedupConfig
from phi1_ray.datagen.dedup import run_dedup
from phi1_ray.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--shingle", type=int, default=5)
    args = parser.parse_args()
    cfg = build(DedupConfig, {"threshold": args.threshold, "num_perm": args.num_perm, "shingle": args.shingle})
    init_ray(RayConfig())
    manifests = run_dedup(args.input, args.out, cfg)
    print(json.dumps({"out": args.out, "kept": {k: m["rows"] for k, m in manifests.items()}}), flush=True)


if __name__ == "__main__":
    run_main(main)
