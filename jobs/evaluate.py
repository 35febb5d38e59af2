"""Score a model on HumanEval, MBPP or a custom JSONL benchmark; completions run in the sandbox.

    python jobs/evaluate.py --checkpoint PATH --benchmark humaneval [--n N] [--temperature T] [--out DIR]
    python jobs/evaluate.py --benchmark humaneval --samples FILE.jsonl [--out DIR]
    python jobs/evaluate.py --endpoint http://127.0.0.1:8000/v1 --model phi-1 --benchmark humaneval
    python jobs/evaluate.py --config FILE [key.path=value ...]     # e.g. sampling.n=20 limits.timeout_s=5

Every flag sets a key of the config (listed below); the last line of stdout is the summary as JSON, e.g.
{"benchmark": "humaneval", "pass@1": 0.5, ...}.
"""

import json

from phi1_ray.cli import Flag, config_from_argv, run_main, unescape
from phi1_ray.evals.run import EvalJobConfig, run_eval

FLAGS = {
    "--checkpoint": "checkpoint",
    "--samples": "samples",
    "--endpoint": "endpoint",
    "--model": "model",
    "--benchmark": "benchmark",
    "--benchmark-file": "benchmark_file",
    "--n": "sampling.n",
    "--temperature": "sampling.temperature",
    "--top-p": "sampling.top_p",
    "--max-new-tokens": "sampling.max_new_tokens",
    "--stop": Flag("sampling.stop", kind="list", convert=unescape),
    "--seed": "sampling.seed",
    "--batch-size": "sampling.batch_size",
    "--limit": "limit",
    "--actors": "actors",
    "--gpu": Flag("use_gpu", kind="switch"),
    "--workers": "workers",
    "--timeout": "limits.timeout_s",
    "--memory-mb": "limits.memory_mb",
    "--mlflow-run-id": "mlflow_run_id",
    "--tracking-uri": "tracking_uri",
}


def main() -> None:
    cfg = config_from_argv(EvalJobConfig, __doc__, flags=FLAGS)
    print(json.dumps(run_eval(cfg)))


if __name__ == "__main__":
    run_main(main)
