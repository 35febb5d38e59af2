"""The function each Ray Train worker runs: a DeepSpeed engine over its shard of the packed stream.

Every rank builds the same model, joins the DeepSpeed engine (Ray Train has set up ``torch.distributed``), and
resumes from ``ray.train.get_checkpoint()`` when there is one: weights, optimizer, LR schedule, loss scaler (all
DeepSpeed's) and the step and data position (ours, in the checkpoint's client state). Every decision to log,
evaluate, checkpoint or stop depends only on the step and on all-reduced values, so the ranks never disagree.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from phi1_ray.checkpoint import DS_TAG, write_train_manifest
from phi1_ray.model import Phi1ForCausalLM
from phi1_ray.runtime import device_name
from phi1_ray.tracking import tracked, try_log
from phi1_ray.train.config import TrainJobConfig
from phi1_ray.train.engine import build_engine
from phi1_ray.train.loop import BatchStream, NonFiniteGuard, NonFiniteLossError, Throughput, evaluate, optimizer_step
from phi1_ray.train.metrics import flops_per_token, mfu, peak_tflops, progress_line


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver once. (Ray Train patches ``print`` to
    log as well as print, so a printed line would reach the driver twice.)"""
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class MetricsSink:
    """Rank 0's metric log: a JSONL file in the run directory always, MLflow when reachable (one warning if not)."""

    def __init__(self, jsonl: str | None, tracking_uri: str | None, run_id: str | None) -> None:
        self.path = Path(jsonl) if jsonl else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = tracked(tracking_uri, run_id)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.run is None:
            return
        # an unreachable tracking server must not stop training: one warning, then the JSONL file alone
        if not try_log(f"step {step}'s metrics; they continue in {self.path} only", self.run.log_metrics, values, step):
            self.run = None


def _batches(shard: Any, micro_batch: int, drop_last: bool) -> Callable[[int], Iterable[dict[str, torch.Tensor]]]:
    from phi1_ray.data.ray_pipeline import tokens_tensor

    def epoch(_: int) -> Iterator[dict[str, torch.Tensor]]:
        for table in shard.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=drop_last):
            batch = {"tokens": tokens_tensor(table)}
            if "loss_mask" in table.column_names:
                batch["loss_mask"] = tokens_tensor(table, "loss_mask")
            yield batch

    return epoch


def _initial_model(job: TrainJobConfig, init_state: Any) -> Phi1ForCausalLM:
    torch.manual_seed(job.seed)  # the same initialization on every rank
    model = Phi1ForCausalLM(job.model)
    if init_state is not None:
        import ray

        state = ray.get(init_state) if isinstance(init_state, ray.ObjectRef) else init_state
        model.load_state_dict(state, strict=True)
    return model.train()


def _save_checkpoint(
    engine: Any, job: TrainJobConfig, rank: int, client_state: dict[str, Any], metrics: dict[str, Any], tokenizer: Any
) -> None:
    import ray.train

    tmp = tempfile.mkdtemp(prefix="phi1_ray-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state=client_state)
        if rank == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(Path(tmp) / "tokenizer"))
            write_train_manifest(
                tmp,
                {
                    "format": "phi1_ray.train",
                    "step": client_state["step"],
                    "job": job.job,
                    "model": job.model.model_dump(mode="json"),
                    "metrics": metrics,
                    "precision": client_state["precision"],
                    "zero_stage": job.train.zero_stage,
                },
            )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resume(engine: Any, rank: int) -> tuple[int, dict[str, int], float]:
    """(step, data position, best validation loss) from Ray Train's checkpoint, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {"epoch": 0, "batch": 0}, math.inf
    with checkpoint.as_directory() as directory:
        _, client = engine.load_checkpoint(directory, tag=DS_TAG)
    step, position = client["step"], client["data"]
    if rank == 0:
        say(f"resumed from the checkpoint of step {step} (epoch {position['epoch']}, batch {position['batch']})")
    return step, position, client.get("best_val", math.inf)


def _rank0_outputs(config: dict[str, Any], rank: int) -> tuple[MetricsSink | None, Any]:
    """Rank 0's metric sink and the tokenizer it saves with each checkpoint; (None, None) on other ranks."""
    if rank != 0:
        return None, None
    sink = MetricsSink(config.get("metrics_file"), config.get("tracking_uri"), config.get("mlflow_run_id"))
    tokenizer = None
    if config.get("tokenizer"):
        from phi1_ray.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config["tokenizer"])
    return sink, tokenizer


def _val_batches(config: dict[str, Any], job: TrainJobConfig) -> list[Any]:
    """The first ``eval_batches`` micro-batches of this worker's validation shard, kept for every evaluation."""
    import ray.train

    if not config.get("has_val"):
        return []
    shard = ray.train.get_dataset_shard("val")
    return list(islice(_batches(shard, job.train.micro_batch, False)(0), job.train.eval_batches))


class _Progress:
    """Rank 0's view of the run: logs a step's metrics and progress line every ``log_every`` steps."""

    def __init__(self, job: TrainJobConfig, sink: MetricsSink | None, step: int, world: int) -> None:
        self.job, self.sink, self.world = job, sink, world
        self.peak = peak_tflops(device_name(job.train.use_gpu), job.train.peak_tflops)
        self.fpt = flops_per_token(job.model, job.data.seq_len)
        self.meter = Throughput(start_step=step)
        self.tokens_seen = step * job.train.effective_batch * job.data.seq_len

    def step(self, step: int, out: Any, skipped: int) -> None:
        self.tokens_seen += out.tokens
        self.meter.add(out.tokens)
        max_steps = self.job.optim.max_steps
        if not (step % self.job.train.log_every == 0 or step == max_steps or step == self.meter.start_step + 1):
            return
        rate, eta_s = self.meter.interval(step, max_steps)
        util = mfu(rate, self.fpt, self.peak, self.world)
        if self.sink is not None:
            values = {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "loss_scale": out.loss_scale,
                      "skipped_steps": skipped, "tokens_seen": self.tokens_seen, "tokens_per_s": rate,
                      "mfu": util}  # fmt: skip
            self.sink.log(step, values)
            say(progress_line(step, max_steps, out.loss, out.lr, rate, util, eta_s))

    def validation(self, step: int, loss: float | None) -> None:
        if loss is not None and self.sink is not None:
            self.sink.log(step, {"val_loss": loss})
            say(f"step {step}/{self.job.optim.max_steps} | val_loss {loss:.4f}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    job = TrainJobConfig.model_validate(config["job"])
    precision: str = config["precision"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_cfg, optim = job.train, job.optim

    engine = build_engine(_initial_model(job, config.get("init_state")), train_cfg, optim, precision)
    step, position, best_val = _resume(engine, rank)
    sink, tokenizer = _rank0_outputs(config, rank)
    if sink is not None:
        sink.log(step, {"resumed_from_step": step})
    stream = BatchStream(_batches(ray.train.get_dataset_shard("train"), train_cfg.micro_batch, True), **position)
    val_batches = _val_batches(config, job)
    progress = _Progress(job, sink, step, world)
    guard = NonFiniteGuard(train_cfg.max_nonfinite_steps)
    batches = iter(stream)
    last_val: float | None = None
    while step < optim.max_steps:
        out = optimizer_step(engine, batches, train_cfg.grad_accum)
        step += 1
        try:
            guard.update(out, step)
        except NonFiniteLossError as exc:
            # Not a worker failure (a retry would diverge again): every rank stops here; the driver raises.
            ray.train.report({"step": step, "error": str(exc)})
            return
        progress.step(step, out, guard.skipped_total)
        save = step % train_cfg.checkpoint_every == 0 or step == optim.max_steps
        if val_batches and (step % train_cfg.eval_every == 0 or save):
            last_val = evaluate(engine, val_batches)
            progress.validation(step, last_val)
        if save and guard.consecutive == 0:  # a checkpoint is only ever a good state
            if last_val is not None:
                best_val = min(best_val, last_val)
            metrics = {"step": step, "loss": out.loss, "tokens_seen": progress.tokens_seen}
            if last_val is not None:
                metrics["val_loss"] = last_val
            state = {"step": step, "data": stream.state(), "best_val": best_val, "precision": precision}
            _save_checkpoint(engine, job, rank, state, metrics, tokenizer)
