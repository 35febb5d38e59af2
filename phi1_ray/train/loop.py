"""The training step shared by the Ray Train worker and the one-GPU benchmark: no Ray in this module.

One optimizer step is ``grad_accum`` micro-batches through a DeepSpeed engine. DeepSpeed skips a step whose
gradients are not finite (fp16 overflow, and with ZeRO any precision) and counts it in ``engine.skipped_steps``;
:class:`NonFiniteGuard` turns a run of such steps into an error instead of a silent stall.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from phi1_ray.errors import Phi1Error


class NonFiniteLossError(Phi1Error):
    """Too many consecutive non-finite losses (or the fp16 loss scale reached its floor)."""


@dataclass
class StepOutput:
    loss: float
    """Mean next-token loss of the step's micro-batches over all ranks (NaN/inf when any was not finite)."""
    tokens: int
    """Tokens this step consumed over all ranks."""
    lr: float
    grad_norm: float | None
    loss_scale: float | None
    skipped: bool
    """DeepSpeed did not apply the update (non-finite gradients)."""


def block_loss(model: Any, block: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of predicting ``block[:, 1:]`` from ``block[:, :-1]``.

    Packed blocks hold ``seq_len + 1`` tokens, so the model sees exactly ``seq_len`` positions (2048, not 2049:
    the kernels' favourite sizes). ``loss_mask`` is aligned with ``block``; a 0 excludes that target token.
    """
    logits = model(block[:, :-1])
    targets = block[:, 1:]
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask[:, 1:].bool(), -100)
        # a block with no target left (a long prompt) adds 0, not 0/0
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return total / (targets != -100).sum().clamp(min=1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
    return values


def _loss_scale(engine: Any) -> float | None:
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def optimizer_step(engine: Any, batches: Iterator[dict[str, torch.Tensor]], grad_accum: int) -> StepOutput:
    """Forward + loss + backward of ``grad_accum`` micro-batches and the optimizer step at their end.

    Batches hold ``tokens`` (B, T+1) and optionally ``loss_mask``. Losses stay on the device until the end of
    the step, so the only host synchronisation is one small all-reduce per optimizer step.
    """
    skipped_before = engine.skipped_steps
    total = None
    tokens = 0
    for _ in range(grad_accum):
        batch = next(batches)
        ids = batch["tokens"].to(engine.device, non_blocking=True)
        mask = batch.get("loss_mask")
        if mask is not None:
            mask = mask.to(engine.device, non_blocking=True)
        loss = block_loss(engine, ids, mask)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        tokens += ids[:, 1:].numel()
    stats = _all_reduce_sum(torch.stack([total / grad_accum, total.new_tensor(float(tokens)), total.new_tensor(1.0)]))
    world = float(stats[2])
    norm = engine.get_global_grad_norm()
    return StepOutput(
        loss=float(stats[0]) / world,
        tokens=int(stats[1]),
        lr=float(engine.get_lr()[0]),
        grad_norm=float(norm) if norm is not None and math.isfinite(float(norm)) else None,
        loss_scale=_loss_scale(engine),
        skipped=engine.skipped_steps > skipped_before,
    )


@torch.no_grad()
def evaluate(engine: Any, batches: Iterable[dict[str, torch.Tensor]]) -> float | None:
    """Mean next-token loss over ``batches`` on every rank together (token-weighted); None if no rank had any."""
    engine.eval()
    loss_sum = torch.zeros((), device=engine.device, dtype=torch.float64)
    count = torch.zeros((), device=engine.device, dtype=torch.float64)
    for batch in batches:
        ids = batch["tokens"].to(engine.device)
        mask = batch.get("loss_mask")
        mask = mask.to(engine.device) if mask is not None else None
        n = float(mask[:, 1:].sum()) if mask is not None else float(ids[:, 1:].numel())
        loss_sum += block_loss(engine, ids, mask).double() * n
        count += n
    engine.train()
    totals = _all_reduce_sum(torch.stack([loss_sum, count]))
    return float(totals[0] / totals[1]) if float(totals[1]) > 0 else None


@dataclass
class NonFiniteGuard:
    """Counts steps whose loss is not finite or whose update DeepSpeed skipped; raises after ``limit`` in a row."""

    limit: int
    min_loss_scale: float = 1.0
    consecutive: int = 0
    skipped_total: int = 0

    def update(self, out: StepOutput, step: int) -> None:
        bad = out.skipped or not math.isfinite(out.loss)
        self.skipped_total += int(out.skipped)
        self.consecutive = self.consecutive + 1 if bad else 0
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or skipped update "
                f"(train.max_nonfinite_steps={self.limit}; last loss {out.loss}); stopping. The last good "
                "checkpoint is kept: lower optim.lr or raise optim.warmup_steps and resume from it"
            )
        if out.skipped and out.loss_scale is not None and out.loss_scale <= self.min_loss_scale:
            raise NonFiniteLossError(
                f"step {step}: fp16 loss scale reached its floor ({out.loss_scale}) and the step still overflowed; "
                "stopping. The last good checkpoint is kept: try train.precision=bf16 or a lower optim.lr"
            )


@dataclass
class BatchStream:
    """Micro-batches over epochs of a data shard, with the position a checkpoint records.

    ``epoch_batches(epoch)`` gives one epoch's micro-batches. Resuming at (``epoch``, ``batch``) skips the
    batches of that epoch already trained on, so a restarted run sees the same data as an uninterrupted one.
    """

    epoch_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]]
    epoch: int = 0
    batch: int = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            seen = 0
            for item in self.epoch_batches(self.epoch):
                seen += 1
                if seen <= self.batch:
                    continue  # trained on before the checkpoint this run resumed from
                self.batch = seen
                yield item
            if seen == 0:
                raise Phi1Error(f"the training data has no batch in epoch {self.epoch}: is the train split empty?")
            self.epoch += 1
            self.batch = 0


@dataclass
class Throughput:
    """Tokens/s over the last logging interval and an ETA from the run's average pace."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    last_time: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def interval(self, step: int, total_steps: int) -> tuple[float, float]:
        """(tokens/s since the previous call, seconds left)."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.last_time, 1e-9)
        done = step - self.start_step
        eta_s = (now - self.started) / done * (total_steps - step) if done > 0 else float("inf")
        self.tokens, self.last_time = 0, now
        return rate, eta_s
