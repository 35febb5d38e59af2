"""``jobs/pipeline.py`` at its smallest size, submitted with ``ray job submit`` to a cluster started with
``ray start --head`` as a user does: stopped mid-pretraining with ``ray job stop``, submitted again (the finished
stages skipped, pretraining continued from its checkpoint, the rest run), again (everything skipped), and once more
after one stage's output was deleted (that stage and the ones after it run again, the earlier ones do not).

Its large outputs go to ``storage=file://...``: the URI path a cluster takes with ``s3://`` or ``gs://`` (pyarrow's
filesystems, Ray Train's ``storage_path``, checkpoints and the tokenizer loaded through a local copy).

Ray 2.60 clusters started this way use token authentication: the submitting shell sets ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi1_ray.checkpoint import load_model
from phi1_ray.evals.generation import EvalSampling, complete_with_model, requests
from phi1_ray.evals.problems import load_benchmark
from tests.conftest import ROOT, free_port, loss_steps, metrics, registered_checkpoints


def _wait_http(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited: {head.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the cluster's token)
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer")


class Cluster:
    """``ray start --head --block`` on free ports, and the ``ray`` CLI against it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            **env,
        }
        self.env.pop("RAY_ADDRESS", None)
        dashboard = free_port()
        self.gcs_port = free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self.head = subprocess.Popen(
            [
                str(self.bin / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={self.gcs_port}",
                "--num-cpus=4",
                "--include-dashboard=true",
                f"--dashboard-port={dashboard}",
                # another Ray instance of the test session may hold the default agent and metrics ports
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        _wait_http(f"{self.address}/api/version", self.head)

    def ray(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        for _ in range(12):  # the job agent may still be starting (each try waits 10 s for it)
            done = subprocess.run(
                [str(self.bin / "ray"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
            )
            if "No available agent" not in done.stdout + done.stderr:
                return done
            time.sleep(2)
        agent_log = Path("/tmp/ray/session_latest/logs/dashboard_agent.log")
        tail = agent_log.read_text(errors="replace")[-3000:] if agent_log.is_file() else "(no agent log)"
        raise AssertionError(f"the head's job agent never registered; dashboard_agent.log:\n{tail}")

    def submit(self, submission_id: str, job: list[str], wait: bool = True) -> subprocess.CompletedProcess:
        flags = [] if wait else ["--no-wait"]
        done = self.ray("job", "submit", "--address", self.address, "--submission-id", submission_id, *flags,
                        "--working-dir", ".", "--", *job)  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        if wait:
            assert "succeeded" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
        return done

    def stop(self) -> None:
        try:
            os.killpg(self.head.pid, signal.SIGTERM)
            self.head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.head.pid, signal.SIGKILL)
        # as `ray stop` does: later Ray processes on this machine must not find the dead cluster's address
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{self.gcs_port}"):
            current.unlink()


def _summary(out: str) -> dict:
    return json.loads(out.split("[pipeline] summary:\n")[1].split("\n[pipeline]")[0].split("\n\n===")[0])


def test_pipeline_submitted_stopped_resubmitted_and_rerun_stage_by_stage(tmp_path, monkeypatch):
    port = free_port()
    run_dir = tmp_path / "run"
    bucket = tmp_path / "bucket"  # object storage, through its URI
    cache = tmp_path / "cache"  # where checkpoints and tokenizers on object storage are copied
    monkeypatch.setenv("PHI1_CACHE", str(cache))
    job = [
        "python",
        "jobs/pipeline.py",
        "--config",
        "configs/pipeline/demo.yaml",
        "--run-dir",
        str(run_dir),
        f"storage={bucket.as_uri()}",
        "tokenizer.sources=[{type: stdlib, max_bytes: 400000}]",
        "datagen.code=[{type: stdlib, max_bytes: 1200000}]",
        "datagen.exercises=[{type: stdlib, max_bytes: 2000000}]",
        "datagen.annotate=120",
        "datagen.served_items=4",
        "sampling.max_new_tokens=8",
        "evaluation.limit=6",
        "evaluation.max_new_tokens=24",
        f"serving.port={port}",
        "pretrain.overrides={optim: {max_steps: 120, warmup_steps: 2}, train: {checkpoint_every: 10, eval_every: 60}}",
        "finetune.overrides={optim: {max_steps: 10, warmup_steps: 2}, train: {checkpoint_every: 5, eval_every: 5}}",
    ]
    cluster = Cluster({"PHI1_CACHE": str(cache)})
    try:
        # 1. submitted, then stopped by the user during pretraining, once a checkpoint exists
        cluster.submit("pipeline-1", job, wait=False)
        pretrain = run_dir / "pretrain"
        deadline = time.time() + 900
        polls = 0
        while not (max(loss_steps(metrics(pretrain)), default=0) >= 10 and registered_checkpoints(bucket) >= 1):
            assert time.time() < deadline, "no pretraining checkpoint within 15 minutes"
            polls += 1
            if polls % 50 == 0:  # a job that failed on the way ends the test at once, with its log
                status = cluster.ray("job", "status", "--address", cluster.address, "pipeline-1")
                if "FAILED" in status.stdout + status.stderr:
                    logs = cluster.ray("job", "logs", "--address", cluster.address, "pipeline-1")
                    raise AssertionError(f"the submission failed:\n{logs.stdout[-5000:]}")
            time.sleep(0.3)
        stop = cluster.ray("job", "stop", "--address", cluster.address, "pipeline-1")
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-3000:]
        stopped_at = max(loss_steps(metrics(pretrain)))
        assert stopped_at < 120
        record = json.loads((run_dir / "stages" / "pretrain.json").read_text())
        assert record["status"] == "running"

        # 2. the same submission again: the stages before pretraining are skipped, pretraining continues from its
        #    checkpoint, the rest runs
        second = cluster.submit("pipeline-2", job)
        out = second.stdout + second.stderr
        for stage in ("tokenizer", "datagen", "decontaminate", "data"):
            assert f"[pipeline] {stage}: finished earlier" in out, stage
        assert "[pipeline] pretrain: running (interrupted last time, resuming)" in out
        starts = [int(r["resumed_from_step"]) for r in metrics(pretrain) if "resumed_from_step" in r]
        assert starts[0] == 0 and starts[-1] >= 10 and starts[-1] % 10 == 0, starts
        assert f"resumed from the checkpoint of step {starts[-1]}" in out and "step 120/120" in out
        assert "training in fp32 instead" in out  # the configs' fp16, on CPUs
        summary = _summary(out)
        assert summary["stages"]["tokenizer"] == "skipped" and summary["stages"]["serve"].startswith("ran in")
        check_first_full_run(run_dir, bucket, summary, out, port)
        # the tokenizer and the export were loaded from the storage through local copies
        copies = sorted(p.name.rsplit("-", 1)[0] for p in (cache / "checkpoints").iterdir())
        assert "tokenizer" in copies and "export" in copies, copies

        # 3. again: every stage finished, nothing runs
        quiet = [*job, "serving.enabled=false"]
        third = cluster.submit("pipeline-3", quiet)
        out = third.stdout + third.stderr
        summary = _summary(out)
        assert set(summary["stages"].values()) == {"skipped", "not run (skipped in the config)"}, summary["stages"]
        assert out.count("finished earlier") == 8 and "running (" not in out
        assert (run_dir / "eval" / "completions.jsonl").is_file()

        # 4. one stage's output deleted: that stage and the ones after it run again, the earlier ones do not
        shutil.rmtree(run_dir / "export")
        evaluated = (run_dir / "eval" / "summary.json").stat().st_mtime
        fourth = cluster.submit("pipeline-4", quiet)
        out = fourth.stdout + fourth.stderr
        stages = _summary(out)["stages"]
        assert [s for s, state in stages.items() if state.startswith("ran in")] == ["export", "evaluate"], stages
        assert all(stages[s] == "skipped" for s in ("tokenizer", "datagen", "decontaminate", "data", "pretrain"))
        assert stages["finetune"] == "skipped" and (run_dir / "export" / "config.json").is_file()
        assert "export: running (" in out and "evaluate: running (export changed since it ran)" in out
        assert (run_dir / "eval" / "summary.json").stat().st_mtime > evaluated
    finally:
        cluster.stop()


def check_first_full_run(run_dir: Path, bucket: Path, summary: dict, out: str, port: int) -> None:
    """What the finished pipeline made: corpora, prepared data, both training stages, the export, the benchmark
    score, the served request and the summary a person reads."""
    manifest = json.loads((bucket / "data" / "manifest.json").read_text())
    assert manifest["tokens"] == summary["data_tokens"] > 30_000
    assert summary["parameters"] > 1_000_000 and summary["generated_tokens"] > 0

    # The data-generation stages made both corpora: filtered code for pretraining, decontaminated exercises for
    # finetuning, deduplicated together.
    datagen = summary["datagen"]
    assert 0 < datagen["filtered_code"] < datagen["code_documents"] and datagen["filter"]["held_out"] > 0
    assert datagen["mined_exercises"] > 150 and datagen["after_dedup"]["mined_exercises"] > 150
    assert manifest["documents"] == datagen["after_dedup"]["filtered_code"]
    fine_sources = json.loads((bucket / "checkpoints" / "finetune-data" / "manifest.json").read_text())["sources"]
    assert fine_sources[0]["type"] == "datagen"
    assert fine_sources[0]["paths"] == [f"{bucket.as_uri()}/datagen/dedup/mined_exercises"]
    for name in ("tokenizer", "datagen/filtered_code", "datagen/dedup", "checkpoints/pretrain", "export"):
        assert (bucket / name).is_dir(), name  # the large outputs are on the storage
    assert not (run_dir / "data").exists() and not (run_dir / "pretrain" / "checkpoints").exists()
    assert set(manifest["splits"]) == {"train", "val"} and manifest["block_len"] == 129
    pre_loss, fine_val = summary["pretrain_loss"], summary["finetune_val_loss"]
    assert pre_loss[1] < pre_loss[0] and fine_val[1] <= fine_val[0], summary
    assert (run_dir / "loss_curves.png").stat().st_size > 10_000

    records = [json.loads(line) for line in (run_dir / "eval" / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["finish_reason"] in ("stop", "length") for r in records)

    # The export of the best finetuning checkpoint is a plain transformers model that agrees with it.
    ours, tokenizer = load_model(run_dir / "finetune")
    export = summary["hf_export"]
    assert export == str(run_dir / "export") and summary["export_uri"] == f"{bucket.as_uri()}/export"
    theirs = AutoModelForCausalLM.from_pretrained(export).eval()
    assert len(AutoTokenizer.from_pretrained(export)) == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)

    # The HumanEval stage: completions of the export from a Ray Data actor, scored in the sandbox, logged.
    scores = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert scores["benchmark"] == "humaneval" and scores["problems"] == 6 and scores["samples"] == 6
    assert summary["humaneval_pass@1"] == scores["pass@1"] and "evaluate: humaneval pass@1" in out
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(6)]
    assert all(s["status"] in ("passed", "failed", "timed_out") for s in samples)
    # the Ray Data actor's greedy completions are those of the finetuned model in this process
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
    assert "then shut down" in out and list(summary)[-1] == "humaneval_pass@1"
    generated = served["generated_exercises"]  # the served checkpoint as a teacher: every item answered
    assert (
        generated["kept"] + sum(generated["rejected"].values()) == 4 and "request_failed" not in generated["rejected"]
    )
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    # The summary a person reads: tokens, losses, the score, where the runs and the model are, how to serve it.
    overview = out.split("phi1_ray pipeline: ")[1]
    for line in ("tokens prepared", "pretrain loss", "finetune loss", "humaneval_pass@1", "MLflow runs",
                 "exported model", f"serve run serve_apps.phi1:app_builder checkpoint={export}"):  # fmt: skip
        assert line in overview, line
