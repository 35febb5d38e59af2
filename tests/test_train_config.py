"""Training settings that need no workers: batch arithmetic, precision fallback, LR schedule, DeepSpeed config,
the masked loss."""

import pytest
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from phi1_ray.config import build
from phi1_ray.errors import ConfigError
from phi1_ray.model import next_token_loss
from phi1_ray.train.config import OptimConfig, TrainConfig, resolve_precision
from phi1_ray.train.deepspeed_config import deepspeed_config
from phi1_ray.train.schedule import lr_at, lr_lambda


def test_schedule_matches_transformers_linear_warmup():
    cfg = OptimConfig(lr=1e-3, warmup_steps=75, max_steps=400)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    reference = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    ours = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), lr_lambda(cfg)
    )
    for step in range(cfg.max_steps + 5):
        assert lr_at(step, cfg) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        assert ours.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        opt.step()
        reference.step()
        ours.optimizer.step()
        ours.step()
    floor = OptimConfig(lr=1e-3, warmup_steps=0, max_steps=10, min_lr=1e-4)
    assert (
        lr_at(0, floor) == 1e-3 and lr_at(10, floor) == pytest.approx(1e-4) and lr_at(50, floor) == pytest.approx(1e-4)
    )


def test_gradient_accumulation_is_derived_and_checked():
    assert TrainConfig(effective_batch=1024, micro_batch=8, num_workers=8).grad_accum == 16
    with pytest.raises(ConfigError) as exc:
        build(TrainConfig, {"effective_batch": 1000, "micro_batch": 8, "num_workers": 8}, where="train")
    assert "effective_batch (1000) must be a multiple of micro_batch x num_workers (8 x 8 = 64)" in str(exc.value)
    with pytest.raises(ConfigError, match=r"train.zero_stage: Input should be 0, 1, 2 or 3 \(got 5\)"):
        build(TrainConfig, {"zero_stage": 5}, where="train")
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        build(TrainConfig, {"offload_params": True, "zero_stage": 2}, where="train")
    with pytest.raises(ConfigError, match="warmup_steps must be in"):
        build(OptimConfig, {"warmup_steps": 10, "max_steps": 5}, where="optim")


def test_fp16_without_a_gpu_falls_back_to_fp32_with_one_line():
    assert resolve_precision("fp16", has_gpu=True) == ("fp16", None)
    precision, note = resolve_precision("fp16", has_gpu=False)
    assert precision == "fp32" and "\n" not in note and "fp16" in note
    assert resolve_precision("fp32", has_gpu=False) == ("fp32", None)
    assert resolve_precision("bf16", has_gpu=False) == ("bf16", None)


def test_deepspeed_config_batch_arithmetic():
    train = TrainConfig(effective_batch=256, micro_batch=4, num_workers=8, zero_stage=3, offload_params=True)
    ds = deepspeed_config(train, OptimConfig(grad_clip=1.0), "fp16")
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 1.0


def test_masked_next_token_loss():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    picked = [(b, t) for b in range(2) for t in range(5) if mask[b, t + 1]]
    expected = torch.stack([F.cross_entropy(logits[b, t], ids[b, t + 1]) for b, t in picked]).mean()
    torch.testing.assert_close(next_token_loss(logits, ids, mask), expected)
    full = torch.stack([F.cross_entropy(logits[b, t], ids[b, t + 1]) for b in range(2) for t in range(5)]).mean()
    torch.testing.assert_close(next_token_loss(logits, ids), full)
