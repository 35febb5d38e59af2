"""Exact and near-duplicate removal (MinHash LSH) across generated and filtered datasets; the first occurrence
of a document, in the order of the inputs, stays.

    python jobs/dedup.py --input DIR_OR_FILE [--input ...] --out DIR [--threshold 0.8] [--num-perm 128]

Each input's survivors go to DIR/<name>/ (Parquet shards + manifest.json, a ``datagen`` corpus source); every
removed record is listed in DIR/report.jsonl with the record it duplicates and the test (exact / near).
"""

import json

from phi1_ray.cli import Flag, config_from_argv, run_main
from phi1_ray.datagen.config import DedupJobConfig
from phi1_ray.datagen.dedup import run_dedup
from phi1_ray.runtime import init_ray

FLAGS = {
    "--input": Flag("inputs", kind="append", metavar="DIR_OR_FILE"),
    "--threshold": "dedup.threshold",
    "--num-perm": "dedup.num_perm",
    "--shingle": "dedup.shingle",
}


def main() -> None:
    cfg = config_from_argv(DedupJobConfig, __doc__, flags=FLAGS)
    init_ray(cfg.ray)
    manifests = run_dedup(cfg.inputs, cfg.out, cfg.dedup)
    print(json.dumps({"out": cfg.out, "kept": {k: m["rows"] for k, m in manifests.items()}}), flush=True)


if __name__ == "__main__":
    run_main(main)
