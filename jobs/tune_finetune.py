"""A Ray Tune sweep over the finetuning config: every trial is a Ray Train + DeepSpeed finetuning run.

    python jobs/tune_finetune.py --config configs/tune/tiny.yaml [--run-dir DIR] [--resume] [key=value ...]

Running the same command again resumes an interrupted sweep (finished trials are kept); ``--resume`` insists on
it. Outputs in the run directory: results.csv, sweep.png, best.yaml (ready for jobs/finetune.py), best_hf/, the
MLflow store (one parent run, one child run per trial). The last line of stdout is the summary as JSON.
"""

import json
import sys

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.tune.config import TuneJobConfig
from phi1_ray.tune.sweep import run_sweep


def main() -> None:
    argv = sys.argv[1:]
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    cfg = config_from_argv(TuneJobConfig, __doc__, argv=argv)
    print(json.dumps(run_sweep(cfg, resume=resume), default=str))


if __name__ == "__main__":
    run_main(main)
