"""Ray Train + DeepSpeed runs of the tiny model on CPU: learning, MLflow, export, faults, resume, finetuning.

One pretraining run (module fixture) feeds several tests; the fault and resume tests run ``jobs/pretrain.py`` as
a user does, against the session's Ray instance, and kill processes from outside.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from phi1_ray.config import ConfigError, load_config
from phi1_ray.train.config import OptimConfig, TrainJobConfig
from phi1_ray.train.schedule import lr_at
from tests.conftest import (
    ROOT,
    assert_user_error,
    loss_steps,
    metrics,
    registered_checkpoints,
    run_job,
)

BASE = [
    "model.name=tiny",
    "model.vocab_size=512",
    "model.attn_pdrop=0.1",
    "model.resid_pdrop=0.1",
    "data.seq_len=64",
    "data.val_fraction=0.2",
    "data.shuffle=true",
    "data.sources=[{type: stdlib, max_bytes: 400000}]",
    "optim.lr=3e-3",
    "optim.warmup_steps=5",
    "optim.weight_decay=0.1",
    "train.effective_batch=16",
    "train.micro_batch=4",
    "train.num_workers=2",
    "train.use_gpu=false",
    "train.zero_stage=2",
    "train.log_every=5",
    "train.eval_every=20",
    "train.eval_batches=4",
    "train.checkpoint_every=20",
    "train.num_to_keep=2",
]


def job_config(tmp: Path, tokenizer_dir: str, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, [*BASE, f"data.tokenizer={tokenizer_dir}", f"run_dir={tmp}", *overrides])


@pytest.fixture(scope="module")
def pretrained(ray_local, tokenizer, tmp_path_factory):
    """120 steps on 2 workers; from outside, one worker process is killed once step 25 and the step-20 checkpoint
    are there (max_failures=1), early enough that the run is far from its end."""
    import threading

    run_dir = tmp_path_factory.mktemp("pretrain")
    lines: list[str] = []
    cfg = job_config(
        run_dir, tokenizer.name_or_path, "optim.max_steps=120", "train.precision=fp16", "train.max_failures=1"
    )
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            if max(loss_steps(metrics(run_dir)), default=0) >= 25 and registered_checkpoints(run_dir) >= 1:
                workers = _training_workers()
                if len(workers) == 2:
                    os.kill(workers[1], signal.SIGKILL)
                    killed.append(workers[1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    from phi1_ray.train.run import run_training

    summary = run_training(cfg, log=lines.append)
    killer.join(timeout=1)
    return run_dir, summary, lines, killed


def test_pretrain_zero2_learns_logs_to_mlflow_and_exports(pretrained):
    from mlflow.tracking import MlflowClient

    run_dir, summary, lines, _ = pretrained
    # fp16 asked for on a machine without GPUs: one line, then fp32
    assert [line for line in lines if "fp16" in line] == [
        "train.precision=fp16 needs a GPU (DeepSpeed refuses it on CPU); training in fp32 instead"
    ]
    assert summary["steps"] == 120
    assert summary["last_loss"] < 0.75 * summary["first_loss"], summary
    assert summary["last_val_loss"] < summary["first_val_loss"], summary

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.n_layer"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps[0] == 1 and steps[-1] == 120 and set(range(5, 121, 5)) <= set(steps)
    for name in ("lr", "grad_norm", "tokens_seen", "tokens_per_s", "val_loss", "skipped_steps"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "hf"} <= artifacts
    hf_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "hf")}
    assert {"config.json", "model.safetensors"} <= hf_files

    # Ray Train kept num_to_keep=2 checkpoints (steps 100 and 120), each with every rank's ZeRO shard
    storage = Path(summary["storage"])
    kept = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2
    assert {json.loads((c / "phi1_ray_train.json").read_text())["step"] for c in kept} == {100, 120}
    shards = sorted(p.name for p in (kept[-1] / "ds").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_export_loads_in_transformers_with_our_logits(pretrained):
    from transformers import AutoModelForCausalLM

    from phi1_ray.checkpoint import load_model

    run_dir, summary, _, _ = pretrained
    ours, _ = load_model(run_dir)  # the run directory: its latest checkpoint, ZeRO shards consolidated
    hf = AutoModelForCausalLM.from_pretrained(summary["hf"], torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    out = run_dir / "export-again"
    result = run_job("jobs/export.py", "--checkpoint", summary["latest"], "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_bf16_finetune_on_exercises_keeps_the_best_checkpoint_without_mlflow(
    pretrained, ray_local, tmp_path, monkeypatch
):
    """Finetuning from the fp32 pretraining checkpoint, in bf16, while the MLflow server is unreachable."""
    from phi1_ray.train.run import run_training

    pre_dir, _, _, _ = pretrained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    lines: list[str] = []
    cfg = load_config(
        TrainJobConfig,
        ROOT / "configs/finetune/tiny.yaml",
        [
            f"run_dir={tmp_path}",
            f"init_from={pre_dir}",
            "data.seq_len=64",
            "data.sources=[{type: stdlib, exercises: true, max_bytes: 1500000}]",
            "data.val_fraction=0.1",
            "optim.max_steps=24",
            "optim.lr=2e-3",
            "train.precision=bf16",
            "train.eval_every=8",
            "train.checkpoint_every=8",
            "train.num_to_keep=1",
            "train.eval_batches=8",
        ],
    )
    with pytest.warns(UserWarning, match="unreachable"):
        summary = run_training(cfg, log=lines.append)
    assert any(line.startswith("init: ") for line in lines), lines
    assert summary["steps"] == 24 and summary["mlflow_run_id"] is None
    assert any(line.startswith("train: ") and ", bf16, " in line for line in lines), lines
    assert cfg.data.loss_on == "completion" and cfg.train.keep_best
    assert summary["last_val_loss"] < summary["first_val_loss"], summary
    best = json.loads((Path(summary["best"]) / "phi1_ray_train.json").read_text())
    assert best["metrics"]["val_loss"] == pytest.approx(summary["best_val_loss"])
    # the latest checkpoint is kept for resuming besides the best one
    assert Path(summary["latest"]).is_dir() and Path(summary["best"]).is_dir()
    assert Path(summary["hf"], "config.json").is_file()


def _training_workers() -> list[int]:
    import psutil

    return [
        p.pid for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]


def test_killed_worker_resumes_from_the_last_checkpoint(pretrained):
    run_dir, summary, _, killed = pretrained
    assert len(killed) == 1, "the worker was not killed mid-run"
    rows = metrics(run_dir)
    starts = [int(r["resumed_from_step"]) for r in rows if "resumed_from_step" in r]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (20, 40, 60, 80), starts
    steps = loss_steps(rows)
    restart = steps.index(starts[1] + 1, 1)
    assert steps[restart - 1] > starts[1]  # trained past the checkpoint, went back to it, not to step 0
    assert steps[-1] == 120 and steps[restart:] == sorted(steps[restart:])
    # the LR schedule continued too: the first step after the restart has that step's LR, not warmup's
    after = next(r for r in rows if r.get("step") == starts[1] + 1 and "lr" in r)
    optim = OptimConfig(lr=3e-3, warmup_steps=5, max_steps=120)
    assert after["lr"] == pytest.approx(lr_at(starts[1] + 1, optim))


def test_bad_configs_fail_before_any_worker_starts(tmp_path, tokenizer):
    from phi1_ray.train.run import check

    with pytest.raises(ConfigError, match=r"effective_batch \(10\) must be a multiple of micro_batch x num_workers"):
        job_config(tmp_path, tokenizer.name_or_path, "train.effective_batch=10")
    with pytest.raises(ConfigError, match="zero_stage"):
        job_config(tmp_path, tokenizer.name_or_path, "train.zero_stage=4")
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(ConfigError, match=str(missing)):
        check(job_config(tmp_path, tokenizer.name_or_path, f"data.sources=[{{type: jsonl, paths: [{missing}]}}]"))
    with pytest.raises(ConfigError, match="init_from is not set"):
        check(job_config(tmp_path, tokenizer.name_or_path, "job=finetune"))
    # the same through the command line: one error line, exit status 2, nothing written
    result = run_job(
        "jobs/pretrain.py",
        "--config",
        "configs/pretrain/tiny.yaml",
        "--run-dir",
        str(tmp_path / "r"),
        "train.effective_batch=10",
    )
    assert_user_error(result, "configs/pretrain/tiny.yaml", "effective_batch (10) must be a multiple")
    assert not (tmp_path / "r").exists()
