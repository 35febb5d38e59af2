"""The whole phi-1 recipe as resumable stages: tokenizer, datagen, decontaminate, data, pretrain, tune (optional),
finetune, export, evaluate, serve.

    python jobs/pipeline.py --config configs/pipeline/demo.yaml [--run-dir DIR] [key=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline/phi-1.yaml

A rerun skips the stages whose outputs exist and whose inputs and settings did not change; `rerun=[finetune]` or
deleting a stage's output runs it and the stages after it again; `skip=[serve]` leaves a stage out.
"""

from phi1_ray.cli import config_from_argv, run_main
from phi1_ray.pipeline import run
from phi1_ray.pipeline.config import PipelineConfig

if __name__ == "__main__":
    run_main(lambda: run(config_from_argv(PipelineConfig, __doc__)))
