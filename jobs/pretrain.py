"""Pretrain phi-1 with Ray Train + DeepSpeed.

    python jobs/pretrain.py --config configs/pretrain/tiny.yaml [--run-dir DIR] [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain/phi-1.yaml

Without a cluster a local Ray instance starts. Running the same command again with the same run directory (or
``name`` + ``storage_path``) continues a stopped run from its latest checkpoint.
"""

import json

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.train.config import TrainJobConfig
from phi1_ray.train.run import run_training


def main() -> None:
    cfg = config_from_argv(TrainJobConfig, __doc__, fixed=["job=pretrain"])
    print(json.dumps(run_training(cfg), default=str))


if __name__ == "__main__":
    run_main(main)
