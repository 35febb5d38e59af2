"""Configs of a training run: the optimizer and LR schedule, the trainer (workers, precision, ZeRO, batches,
checkpoints), and the whole job of ``jobs/pretrain.py`` / ``jobs/finetune.py`` (``TrainJobConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from phi1_ray.config import Section
from phi1_ray.data.config import DataConfig
from phi1_ray.model import ModelConfig
from phi1_ray.runtime import RayConfig
from phi1_ray.tracking import MlflowConfig

Precision = Literal["fp16", "bf16", "fp32"]


class OptimConfig(Section):
    """AdamW with linear warmup then linear decay (the paper's recipe; defaults are pretraining's)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 750
    max_steps: int = 36_000
    min_lr: float = 0.0
    """LR reached at ``max_steps`` by the linear decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables it."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        return self


class TrainConfig(Section):
    """Batch arithmetic, precision and ZeRO settings of a DeepSpeed training run on Ray Train."""

    effective_batch: int = 1024
    """Sequences per optimizer step = micro_batch x num_workers x gradient accumulation."""
    micro_batch: int = 8
    """Sequences per worker per forward/backward."""
    num_workers: int = 8
    use_gpu: bool = True
    resources_per_worker: dict[str, float] = {}
    precision: Precision = "fp16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    """ZeRO-3 only: parameters offloaded to CPU."""
    log_every: int = 10
    eval_every: int = 1000
    eval_batches: int = 50
    checkpoint_every: int = 1000
    num_to_keep: int | None = 3
    keep_best: bool = False
    """Keep the checkpoint with the lowest validation loss (finetuning)."""
    max_failures: int = 3
    max_nonfinite_steps: int = 20
    """Consecutive non-finite losses that stop the run (the last good checkpoint stays)."""
    compile: bool = False
    """``torch.compile`` the model in each worker (GPUs: fuses dropout, GELU, LayerNorm and rotary kernels)."""
    deepspeed: dict[str, Any] = {}
    """Extra DeepSpeed config keys, merged over the generated ones (e.g. ``{zero_optimization: {overlap_comm:
    false}}``)."""
    peak_tflops: float | None = None
    """Dense fp16/bf16 peak of one accelerator for MFU; None: looked up for A100/H100/H200, else MFU is n/a."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for key in ("effective_batch", "micro_batch", "num_workers", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        per_step = self.micro_batch * self.num_workers
        if self.effective_batch % per_step:
            raise ValueError(
                f"effective_batch ({self.effective_batch}) must be a multiple of micro_batch x num_workers "
                f"({self.micro_batch} x {self.num_workers} = {per_step}); e.g. effective_batch="
                f"{max(per_step, self.effective_batch // per_step * per_step)}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.effective_batch // (self.micro_batch * self.num_workers)


def resolve_precision(requested: str, has_gpu: bool) -> tuple[str, str | None]:
    """The precision a run can use, and the one line saying why it differs from the one asked for.

    DeepSpeed refuses fp16 without a GPU; there the run trains in fp32 instead of failing. fp32, not bf16:
    on CPUs without bf16 matrix units a bf16 step is about 15 times slower than fp32 (measured on a 2-core EPYC:
    0.91 s vs 0.06 s for the tiny model). Asking for ``bf16`` explicitly still gets bf16.
    """
    if requested == "fp16" and not has_gpu:
        return "fp32", "train.precision=fp16 needs a GPU (DeepSpeed refuses it on CPU); training in fp32 instead"
    return requested, None


class TrainJobConfig(Section):
    """``jobs/pretrain.py`` and ``jobs/finetune.py``: a Ray Train ``TorchTrainer`` of DeepSpeed workers."""

    job: Literal["pretrain", "finetune"] = "pretrain"
    run_dir: str | None = None
    """Checkpoints, MLflow store, logs and exports; default ``runs/<job>-<timestamp>``."""
    name: str | None = None
    """Ray Train run name (default: the run directory's name). Same name + storage continues a stopped run."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints: a local directory, ``s3://`` or ``gs://`` (default ``run_dir``)."""
    init_from: str | None = None
    """Finetuning: a pretraining run directory or checkpoint, a phi1_ray model directory, or a Hugging Face
    directory / hub id (e.g. the released phi-1 base weights)."""
    prepared: str | None = None
    """Prepared shards (``jobs/prepare_data.py``); None: ``data`` is prepared into ``run_dir/data`` first."""
    seed: int = 0
    model: ModelConfig = ModelConfig(name="phi-1", attn_pdrop=0.1, resid_pdrop=0.1)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    export: bool = True
    """Consolidate the final (or best) checkpoint into a Hugging Face directory ``run_dir/hf``."""
