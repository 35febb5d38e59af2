"""The demo job end to end, as `make demo` runs it, with a smaller tokenizer corpus."""

import json
import socket

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi1_ray.checkpoint import load_model
from phi1_ray.evals.generation import EvalSampling, complete_with_model, requests
from phi1_ray.evals.problems import load_benchmark
from tests.conftest import run_job


def test_demo_pipeline_runs_and_resumes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        "jobs/pipeline.py",
        "--config",
        "configs/pipeline/demo.yaml",
        "--run-dir",
        str(tmp_path),
        "tokenizer.sources=[{type: stdlib, max_bytes: 400000}]",
        "datagen.code=[{type: stdlib, max_bytes: 1200000}]",
        "datagen.exercises=[{type: stdlib, max_bytes: 2000000}]",
        "datagen.annotate=120",
        "datagen.served_items=4",
        "sampling.max_new_tokens=8",
        "evaluation.limit=6",
        "evaluation.max_new_tokens=24",
        f"serving.port={port}",
        "pretrain.overrides={optim: {max_steps: 20, warmup_steps: 2}, train: {checkpoint_every: 10, eval_every: 10}}",
        "finetune.overrides={optim: {max_steps: 10, warmup_steps: 2}, train: {checkpoint_every: 5, eval_every: 5}}",
    ]
    first = run_job(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "# resolved config" in first.stdout and "name: tiny" in first.stdout
    summary = json.loads(first.stdout.split("[pipeline] summary:\n")[1].split("\n[pipeline]")[0])
    assert summary["parameters"] > 1_000_000 and summary["generated_tokens"] > 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokens"] == summary["data_tokens"] > 30_000

    # The data-generation stage made both corpora: filtered code for pretraining, decontaminated exercises for
    # finetuning, deduplicated together.
    datagen = summary["datagen"]
    assert 0 < datagen["filtered_code"] < datagen["code_documents"] and datagen["filter"]["held_out"] > 0
    assert datagen["mined_exercises"] > 150 and datagen["after_dedup"]["exercises"] > 150
    assert manifest["documents"] == datagen["after_dedup"]["filtered_code"]
    fine_sources = json.loads((tmp_path / "finetune" / "data" / "manifest.json").read_text())["sources"]
    assert fine_sources[0]["type"] == "datagen" and fine_sources[0]["paths"] == [
        str(tmp_path / "datagen/dedup/exercises")
    ]
    assert set(manifest["splits"]) == {"train", "val"} and manifest["block_len"] == 129
    pre_loss, fine_val = summary["pretrain_loss"], summary["finetune_val_loss"]
    assert pre_loss[1] < pre_loss[0] and fine_val[1] <= fine_val[0], summary
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000

    records = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["finish_reason"] in ("stop", "length") for r in records)

    # The export of the best finetuning checkpoint is a plain transformers model that agrees with it.
    ours, tokenizer = load_model(tmp_path / "finetune")
    theirs = AutoModelForCausalLM.from_pretrained(summary["hf_export"]).eval()
    assert len(AutoTokenizer.from_pretrained(summary["hf_export"])) == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)

    # The HumanEval stage: completions from a Ray Data actor, scored in the sandbox, logged to the pipeline's run.
    scores = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert scores["benchmark"] == "humaneval" and scores["problems"] == 6 and scores["samples"] == 6
    assert summary["humaneval_pass@1"] == scores["pass@1"] and "evaluate: humaneval pass@1" in first.stdout
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(6)]
    assert all(s["status"] in ("passed", "failed", "timed_out") for s in samples)
    # the Ray Data actor's greedy completions are those of the same model in this process
    here = complete_with_model(
        ours, tokenizer, requests(load_benchmark("humaneval", limit=6), 1), EvalSampling(max_new_tokens=24)
    )
    assert [s["completion"] for s in samples] == [h.completion for h in here]

    mlflow.set_tracking_uri(summary["mlflow_uri"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.name"] == "tiny"
    assert run.data.metrics["parameters"] == summary["parameters"]
    assert run.data.metrics["eval/humaneval/pass_at_1"] == scores["pass@1"]

    # The serving stage: the export behind the Serve app answered one request over HTTP, then was shut down.
    served = summary["serving"]
    assert served["url"] == f"http://127.0.0.1:{port}/v1/completions" and served["usage"]["completion_tokens"] >= 1
    assert "then shut down" in first.stdout and list(summary)[-1] == "humaneval_pass@1"
    generated = served["generated_exercises"]  # the served checkpoint as a teacher: every item answered
    assert (
        generated["kept"] + sum(generated["rejected"].values()) == 4 and "request_failed" not in generated["rejected"]
    )
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    second = run_job(*args, "serving.enabled=false")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tokenizer: " in second.stdout and "exists, skipped" in second.stdout
    assert second.stdout.count("exists, skipped") == 5  # tokenizer, data, pretrain, finetune, evaluation
    assert second.stdout.count("already done") == 4  # datagen: mined, decontaminated, filtered code, dedup
    assert (tmp_path / "completions.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in records)
