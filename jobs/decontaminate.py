"""Remove records that overlap HumanEval / MBPP (13-gram overlap, AST match with identifiers renamed, embedding
similarity), as in the paper's section 5.

    python jobs/decontaminate.py --input PATH --out DIR [--benchmark humaneval] [--benchmark mbpp=FILE]
        [--tau 0.9] [--ngram 13] [--encoder DIR --embedding-similarity 0.95]

PATH: JSONL or Parquet records (``text``, or ``prompt`` + ``completion``) or a data-generation output directory.
Writes the surviving records to DIR (Parquet shards + manifest.json, a ``datagen`` corpus source) and
DIR/report.jsonl: one line per removed record with its index in the input, the matched ``task_id`` and the test.
"""

import json

from phi1_ray.cli import Flag, config_from_argv, run_main
from phi1_ray.datagen.config import DecontamJobConfig
from phi1_ray.datagen.decontam import run_decontamination
from phi1_ray.runtime import init_ray

FLAGS = {
    "--input": Flag("input", metavar="PATH"),
    "--benchmark": Flag("benchmarks", kind="append", metavar="NAME[=FILE]"),
    "--ngram": "decontam.ngram",
    "--tau": "decontam.tau",
    "--encoder": Flag("decontam.encoder.path", metavar="DIR"),
    "--embedding-similarity": "decontam.embedding_similarity",
    "--actors": "actors",
}


def main() -> None:
    cfg = config_from_argv(DecontamJobConfig, __doc__, flags=FLAGS)
    init_ray(cfg.ray)
    manifest = run_decontamination(cfg.input, cfg.out, cfg.benchmark_files, cfg.decontam, actors=cfg.actors)
    print(json.dumps({"out": cfg.out, "kept": manifest["rows"], "removed": manifest["rejected"]}), flush=True)


if __name__ == "__main__":
    run_main(main)
