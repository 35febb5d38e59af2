"""The whole phi-1 recipe as resumable stages: ``python jobs/pipeline.py --config configs/pipeline/demo.yaml``."""

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.config import PipelineConfig
from phi1_ray.pipeline import run

if __name__ == "__main__":
    run_main(lambda: run(config_from_argv(PipelineConfig, __doc__)))
