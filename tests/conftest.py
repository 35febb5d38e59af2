"""Shared fixtures: tiny models with weights random enough that greedy decoding is not degenerate, a tokenizer
trained offline once per session, and helpers to run the jobs as a user does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from phi1_ray.model import ModelConfig, Phi1ForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def random_model(seed: int = 0, **overrides) -> Phi1ForCausalLM:
    """A tiny phi-1 whose weights have std 0.1 (init's 0.02 makes nearly uniform logits and argmax ties)."""
    torch.manual_seed(seed)
    fields = {"n_layer": 2, "vocab_size": 512, "eos_token_id": 0, "bos_token_id": 0, **overrides}
    model = Phi1ForCausalLM(ModelConfig.from_name("tiny", **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from phi1_ray.data.config import SourceConfig
    from phi1_ray.tokenizer import train_from_sources

    out = tmp_path_factory.mktemp("tokenizer")
    return train_from_sources([SourceConfig(type="stdlib", max_bytes=1_000_000)], 512, out)


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (all held open while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def start_local_ray(env: dict[str, str] | None = None) -> None:
    """A local Ray instance with 4 logical CPUs on 2 cores, so a 2-worker TorchTrainer and the data pipeline's
    actors fit at once. ``env``: variables for the Ray processes only (what ``VAR=1 ray start`` gives a cluster);
    this process's environment is left as it was."""
    import ray
    import ray.data

    with mock.patch.dict(os.environ, env or {}):  # the Ray processes inherit it; restored afterwards
        ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance per test module, shut down at the module's end.

    Not one per session: in full-suite runs an instance that had lived through the long subprocess tests
    (`ray job submit` to a `ray start` cluster, the pipeline job's own instance) stopped hearing about new actors:
    the driver saw the training module's data-packing actor, and later the Serve controller, stay in
    PENDING_CREATION although their processes had started and were serving (the driver's core-worker log holds
    no ALIVE notification). A fresh instance per module costs a few seconds."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


def run_job(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python jobs/...`` the way a user does; the result keeps stdout and stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad input ends with exit status 2 and one readable ``error:`` message, not a traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def loss_steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if "loss" in r]


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered for the run (its checkpoint manager snapshot lists them)."""
    snapshots = list((run_dir / "checkpoints").glob("*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return 0
    try:
        return snapshots[0].read_text().count("checkpoint_dir_name")
    except OSError:
        return 0
