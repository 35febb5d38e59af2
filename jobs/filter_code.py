"""The learned quality filter of CodeTextbook: teacher labels ("educational value") on a sample of a code corpus,
a random forest on document embeddings, held-out precision / recall / ROC-AUC, then the whole corpus scored on
Ray Data and the documents above the threshold kept with their score.

    python jobs/filter_code.py --config configs/datagen/filter_code.yaml [--out DIR] [key=value ...]

``labels=FILE`` (JSONL of text + label 0/1) trains on given labels instead of asking the teacher.
"""

import json

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.datagen.config import FilterConfig
from phi1_ray.datagen.quality import run_filter
from phi1_ray.runtime import init_ray


def main() -> None:
    cfg = config_from_argv(FilterConfig, __doc__)
    init_ray(cfg.ray)
    manifest = run_filter(cfg)
    print(json.dumps({"out": cfg.out, "kept": manifest["rows"], "classifier": manifest["classifier"]}), flush=True)


if __name__ == "__main__":
    run_main(main)
