"""The Tune sweep job on the `tiny` preset, as a user runs it: 4 finetuning trials (Ray Train + DeepSpeed), 2 at a
time, ASHA on the validation loss; interrupted once 2 trials ended and resumed by the same command."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from phi1_ray.checkpoint import save_checkpoint
from phi1_ray.config import load_config
from phi1_ray.train.config import TrainJobConfig
from tests.conftest import ROOT, assert_user_error, random_model, run_job


def _sweep_config(tmp_path: Path, init: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs/tune/tiny.yaml").read_text())
    # relative to where the job runs, as the README's command has it: each trial runs in a directory of its own
    data["overrides"]["init_from"] = os.path.relpath(init, ROOT)
    data["overrides"]["data.sources"] = [{"type": "stdlib", "exercises": True, "max_bytes": 300_000}]
    data["overrides"]["data.seq_len"] = 64
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_search_spaces_fail_before_any_trial_naming_the_key(tmp_path):
    cases = {
        "optim.lrr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}": ["space.optim.lrr", "did you mean 'lr'"],
        "optim.lr: {type: uniform, low: 0.1, high: 0.01}": ["space.optim.lr", "low (0.1) must be below high"],
        "optim.warmup_steps: {type: choice, values: []}": ["space.optim.warmup_steps", "non-empty list"],
        "train.effective_batch: {type: grid, values: [8, 7]}": ["space.train.effective_batch", "multiple of"],
    }
    for space, fragments in cases.items():
        config = tmp_path / "bad.yaml"
        config.write_text(f"base: configs/finetune/tiny.yaml\nspace:\n  {space}\n")
        result = run_job("jobs/tune_finetune.py", "--config", str(config), "--run-dir", str(tmp_path / "run"))
        assert_user_error(result, *fragments)
        assert not (tmp_path / "run").exists()  # nothing started, nothing written


def _started(run_dir: Path) -> int:
    return len(list((run_dir / "trials").glob("*/starts.log"))) if (run_dir / "trials").is_dir() else 0


def test_sweep_stops_poor_trials_early_logs_to_mlflow_and_resumes(tmp_path, tokenizer):
    init = save_checkpoint(random_model(seed=1), tmp_path / "init", tokenizer)
    config = _sweep_config(tmp_path, init)
    run_dir = tmp_path / "sweep"
    command = [sys.executable, "jobs/tune_finetune.py", "--config", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    # 1. interrupted (Ctrl-C) as soon as the third and fourth trials started: the first two have ended
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    deadline = time.time() + 900
    while _started(run_dir) < 4:
        assert first.poll() is None, first.stdout.read()[-4000:]
        assert time.time() < deadline, "the sweep did not start its fourth trial"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment's state and stops
    try:
        out, _ = first.communicate(timeout=180)
        assert "run the same command again to resume" in out, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    trials = sorted(p.parent for p in (run_dir / "trials").glob("*/starts.log"))
    ended_first = {t.name for t in trials if (t / "summary.json").is_file()}
    before = {t.name: (t / "summary.json").stat().st_mtime for t in trials if (t / "summary.json").is_file()}

    # 2. the same command again: restores the sweep; trials that ended are not run again
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    assert "resuming the sweep" in second.stdout and "rungs restored" in second.stdout
    summary = json.loads([line for line in second.stdout.splitlines() if line.startswith('{"run_dir"')][-1])
    starts = {t.name: (t / "starts.log").read_text().count("start") for t in trials}
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == 4 and summary["trials"] == 4
    resumed = {name for name, n in starts.items() if n == 2}
    assert resumed and all(n in (1, 2) for n in starts.values()), starts
    for name in ended_first:  # a trial that had finished kept its result and was not started again
        assert starts[name] == 1 and (run_dir / "trials" / name / "summary.json").stat().st_mtime == before[name]

    # ASHA stopped at least one trial early: it trained fewer steps (and reported fewer times) than its 40
    finished = [r for r in rows if r["status"] == "finished"]
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert finished and stopped, rows
    assert all(int(r["last_step"]) == 40 for r in finished) and all(int(r["last_step"]) < 40 for r in stopped), rows
    assert all(int(r["reports"]) < 8 for r in stopped), rows
    assert rows[0]["status"] == "finished" and float(rows[0]["best_val_loss"]) == min(
        float(r["best_val_loss"]) for r in finished
    )
    assert (run_dir / "sweep.png").stat().st_size > 5_000 and Path(summary["best_hf"], "config.json").is_file()

    # MLflow: one parent run for the sweep, one child per trial
    client = mlflow.tracking.MlflowClient(summary["mlflow_uri"])
    experiment = client.get_experiment_by_name("phi1_ray-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("phi1_ray.job") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_parent_run_id"]]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow_parent_run_id"]
    assert sorted(c.data.tags["phi1_ray.trial"] for c in children) == sorted(starts)
    assert all("optim.lr" in c.data.params for c in children)

    # the best config is a finetuning config that loads and runs
    best = load_config(TrainJobConfig, summary["best_config"], ["optim.max_steps=4", f"run_dir={tmp_path / 'best'}"])
    assert best.job == "finetune" and best.optim.lr == float(rows[0]["param.optim.lr"])
    again = run_job("jobs/finetune.py", "--config", summary["best_config"], "optim.max_steps=4",
                    "train.checkpoint_every=4", "--run-dir", str(tmp_path / "best"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads([line for line in again.stdout.splitlines() if line.startswith('{"run_dir"')][-1])["steps"] == 4


@pytest.fixture(autouse=True)
def _no_session_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
