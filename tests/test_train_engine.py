"""A real DeepSpeed engine (ZeRO-2, bf16, CPU, gloo) in one process: the worker's step, without Ray."""

import pytest
import torch

from phi1_ray.model import ModelConfig, Phi1ForCausalLM
from phi1_ray.train.config import OptimConfig, TrainConfig, resolve_precision
from phi1_ray.train.engine import build_engine, init_single_process, micro_step
from phi1_ray.train.schedule import lr_at


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One gloo group for the module: DeepSpeed caches its groups, so they live as long as the tests."""
    init_single_process()
    yield
    torch.distributed.destroy_process_group()


def test_zero2_bf16_engine_learns_on_cpu():
    torch.manual_seed(0)
    model = Phi1ForCausalLM(ModelConfig.from_name("tiny", vocab_size=512, eos_token_id=0, bos_token_id=0))
    precision, _ = resolve_precision("bf16", has_gpu=torch.cuda.is_available())
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


def test_nonfinite_losses_skip_updates_then_stop_the_run():
    from phi1_ray.train.loop import NonFiniteGuard, NonFiniteLossError, optimizer_step

    torch.manual_seed(0)
    model = Phi1ForCausalLM(ModelConfig.from_name("tiny", vocab_size=512, eos_token_id=0, bos_token_id=0))
    train = TrainConfig(effective_batch=4, micro_batch=4, num_workers=1, use_gpu=False, zero_stage=2)
    engine = build_engine(model, train, OptimConfig(lr=1e-3, warmup_steps=0, max_steps=10), "fp32")
    batch = {"tokens": torch.randint(1, 512, (4, 17))}
    batches = iter(lambda: batch, None)
    guard = NonFiniteGuard(limit=3)
    out = optimizer_step(engine, batches, 1)
    guard.update(out, 1)
    assert not out.skipped and guard.consecutive == 0
    with torch.no_grad():
        engine.module.lm_head.bias.fill_(float("nan"))  # every later loss is NaN
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        for step in range(2, 10):
            out = optimizer_step(engine, batches, 1)
            assert out.skipped  # DeepSpeed found non-finite gradients and applied no update
            guard.update(out, step)
    assert guard.skipped_total == 3 and engine.skipped_steps == 3
    for old, new in zip(before, engine.module.parameters()):
        torch.testing.assert_close(old, new.detach(), equal_nan=True)
