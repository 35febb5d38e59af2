"""A DeepSpeed engine around the phi-1 model: our AdamW and LR schedule, the run's ZeRO and precision settings.

The only module of ``phi1_ray.train`` that imports DeepSpeed. Ray Train workers build it after Ray Train has set up
``torch.distributed``; a single process can too (see :func:`init_single_process`).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch

from phi1_ray.model import Phi1ForCausalLM, next_token_loss
from phi1_ray.train.config import OptimConfig, TrainConfig
from phi1_ray.train.deepspeed_config import deepspeed_config
from phi1_ray.train.schedule import lr_lambda


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, LayerNorms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process(backend: str = "gloo") -> None:
    """torch.distributed with one process (tests, one-GPU benchmarks): what Ray Train does for its workers."""
    import deepspeed

    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(_free_port())),
    ):
        os.environ.setdefault(key, value)
    skip_cpu_shm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)


def environment_tools_first() -> None:
    """Put this interpreter's ``bin`` first on ``PATH`` so DeepSpeed builds its ops with the environment's ``ninja``.

    The op cache (``~/.cache/torch_extensions``) records each build's command under a hash that differs between ninja
    releases; a process finding the system's ninja and another the environment's would rebuild the op every time.
    """
    bin_dir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in parts if p != bin_dir)])


def skip_cpu_shm_op() -> None:
    """Without a GPU, leave out DeepSpeed's shared-memory all-reduce op: gloo's all-reduce does the job.

    DeepSpeed compiles that op with the machine's C++ compiler the first time a CPU engine starts (80-110 s on a
    2-core machine, again for every new environment path), which would be most of a CPU demo's training time.
    GPU runs use NCCL and never build it.
    """
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: Phi1ForCausalLM, train: TrainConfig, optim: OptimConfig, precision: str) -> Any:
    """``deepspeed.initialize`` with AdamW over :func:`param_groups` and the warmup/decay schedule."""
    environment_tools_first()
    skip_cpu_shm_op()
    import deepspeed

    config = deepspeed_config(train, optim, precision)
    config["zero_allow_untested_optimizer"] = True  # torch's AdamW, so the schedule and groups are ours exactly
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    if train.compile:
        model.compile()  # in place: parameter and state-dict names stay those of the model
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def micro_step(engine: Any, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, loss and backward of one micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
    tokens = tokens.to(engine.device)
    mask = loss_mask.to(engine.device) if loss_mask is not None else None
    loss = next_token_loss(engine(tokens), tokens, mask)
    engine.backward(loss)
    engine.step()
    return loss.detach()
