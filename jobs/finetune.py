"""Finetune phi-1 from a pretraining run or checkpoint, or from Hugging Face weights, with Ray Train + DeepSpeed.

    python jobs/finetune.py --config configs/finetune/tiny.yaml [--run-dir DIR] [key=value ...]
    python jobs/finetune.py --config configs/finetune/phi-1.yaml init_from=microsoft/phi-1   # released weights

The model's sizes come from ``init_from``; dropout and attention settings from the config. With
``train.keep_best`` the checkpoint with the lowest validation loss is kept and exported.
"""

import json

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.train.config import TrainJobConfig
from phi1_ray.train.run import run_training


def main() -> None:
    cfg = config_from_argv(TrainJobConfig, __doc__, fixed=["job=finetune"])
    print(json.dumps(run_training(cfg), default=str))


if __name__ == "__main__":
    run_main(main)
