"""A real DeepSpeed engine (ZeRO-2, bf16, CPU, gloo) in one process: the worker's step, without Ray."""

import pytest
import torch

from phi1_ray.config import ModelConfig, OptimConfig, TrainConfig, resolve_precision
from phi1_ray.model import Phi1ForCausalLM
from phi1_ray.train.engine import build_engine, init_single_process, micro_step
from phi1_ray.train.schedule import lr_at


def test_zero2_bf16_engine_learns_on_cpu():
    init_single_process()
    torch.manual_seed(0)
    model = Phi1ForCausalLM(ModelConfig.from_name("tiny", vocab_size=512, eos_token_id=0, bos_token_id=0))
    precision, note = resolve_precision("fp16", has_gpu=torch.cuda.is_available())
    assert precision == ("fp16" if torch.cuda.is_available() else "bf16")
    train = TrainConfig(effective_batch=8, micro_batch=4, num_workers=1, use_gpu=False, zero_stage=2)
    optim = OptimConfig(lr=3e-3, warmup_steps=5, max_steps=40, weight_decay=0.01)
    engine = build_engine(model, train, optim, precision)
    batch = torch.randint(1, 512, (8, 33))
    losses = []
    for step in range(30):
        for micro in (batch[:4], batch[4:]):
            losses.append(float(micro_step(engine, micro)))
        assert engine.global_steps == step + 1  # one optimizer step per 2 micro-batches
        assert engine.get_lr()[0] == pytest.approx(lr_at(step + 1, optim), rel=1e-9)
    assert losses[-1] < 0.5 * losses[0], losses[::6]
    torch.distributed.destroy_process_group()
