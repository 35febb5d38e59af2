"""``ray job submit`` of the pretraining job against a cluster started with ``ray start --head``, as a user does;
``ray job stop`` mid-run and the same submission again continue the run from its checkpoint.

Ray 2.60 clusters started this way use token authentication: the submitting shell sets ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, loss_steps, metrics, registered_checkpoints


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_ray_job_submit_then_stop_and_resubmit_continues(tmp_path, tokenizer):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    gcs_port = _free_port()
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            # the session's local Ray instance already holds the default agent and metrics ports
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version", head)
        run_dir = tmp_path / "run"
        job = [
            "python",
            "jobs/pretrain.py",
            "--config",
            "configs/pretrain/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.tokenizer={tokenizer.name_or_path}",
            "model.vocab_size=512",
            "data.seq_len=64",
            "data.sources=[{type: stdlib, max_bytes: 300000}]",
            "data.val_fraction=0.2",
            "optim.max_steps=100",
            "optim.warmup_steps=2",
            "train.checkpoint_every=10",
            "train.eval_every=50",
            "train.log_every=5",
        ]

        def ray_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
            for _ in range(12):  # the job agent may still be starting (each try waits 10 s for it)
                done = subprocess.run(
                    [str(bin_dir / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
                )
                if "No available agent" not in done.stdout + done.stderr:
                    return done
                time.sleep(2)
            agent_log = Path("/tmp/ray/session_latest/logs/dashboard_agent.log")
            tail = agent_log.read_text(errors="replace")[-3000:] if agent_log.is_file() else "(no agent log)"
            raise AssertionError(f"the head's job agent never registered; dashboard_agent.log:\n{tail}")

        # 1. submitted, then stopped by the user once a checkpoint exists
        first = ray_cli(
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            "pretrain-1",
            "--no-wait",
            "--working-dir",
            ".",
            "--",
            *job,
        )
        assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
        deadline = time.time() + 600
        while not (max(loss_steps(metrics(run_dir)), default=0) >= 10 and registered_checkpoints(run_dir) >= 1):
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.3)
        stop = ray_cli("job", "stop", "--address", address, "pretrain-1")
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-3000:]
        stopped_at = max(loss_steps(metrics(run_dir)))
        assert stopped_at < 100

        # 2. the same command again continues the run from its checkpoint
        second = ray_cli(
            "job", "submit", "--address", address, "--submission-id", "pretrain-2", "--working-dir", ".", "--", *job
        )
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-4000:]
        assert "succeeded" in out
        assert "training in fp32 instead" in out and "step 100/100" in out
        starts = [int(r["resumed_from_step"]) for r in metrics(run_dir) if "resumed_from_step" in r]
        assert starts[0] == 0 and starts[-1] >= 10 and starts[-1] % 10 == 0, starts
        assert f"resumed from the checkpoint of step {starts[-1]}" in out
        summary = json.loads([line for line in out.splitlines() if line.startswith('{"run_dir"')][-1])
        assert summary["steps"] == 100 and Path(summary["hf"], "config.json").is_file()
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        # as `ray stop` does: later Ray processes on this machine must not find the dead cluster's address
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()
