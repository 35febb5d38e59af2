"""Benchmarks are scripts, not timed tests; these only check that they run and keep their output contract."""

import json

import pytest
import torch

from tests.conftest import run_job


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the benchmark itself")
def test_gpu_benchmark_skips_cleanly_without_a_gpu():
    result = run_job("benchmarks/gpu_model.py", "--quick")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"benchmark": "gpu_model", "skipped": "no CUDA device"}
