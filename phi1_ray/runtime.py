"""Where a job runs: Ray start-up (join the cluster it was submitted to, else a local instance) and device / GPU
detection (does the cluster have GPUs, which torch device a process uses).

Every job and stage starts Ray through :func:`init_ray`; nothing else calls ``ray.init``.
"""

from __future__ import annotations

import os
from typing import Any

from phi1_ray.config import Section


class RayConfig(Section):
    address: str | None = None
    """None: the cluster this job was submitted to, else a new local instance."""
    num_cpus: int | None = None
    """Local instance only: CPUs it may use (default: all)."""


def on_cluster(cfg: RayConfig | None = None) -> bool:
    """Whether this job joins an existing cluster (``ray.address`` or ``RAY_ADDRESS``) instead of starting one."""
    return bool((cfg is not None and cfg.address) or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: RayConfig, min_cpus: int = 0) -> None:
    """Join the cluster this job was submitted to (or ``cfg.address``), else start a local instance.

    A local instance gets at least ``min_cpus`` logical CPUs: trainer workers hold one each, and the data
    pipeline's read tasks need CPUs beside them (on a 2-core laptop they share the cores).
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if cfg.address:
        kwargs["address"] = cfg.address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = "local"  # a new instance, even where `ray start` left one running
        kwargs["num_cpus"] = cfg.num_cpus if cfg.num_cpus is not None else max(os.cpu_count() or 1, min_cpus)
    ray.init(**kwargs)


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when Ray is not started)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def gpus_for_training(use_gpu: bool, cfg: RayConfig) -> bool:
    """Whether a job asking for ``use_gpu`` gets GPUs: the cluster has some, or it is a cluster that may still
    add GPU nodes (a local instance never will)."""
    return use_gpu and (cluster_gpus() > 0 or on_cluster(cfg))


def local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def gpus_per_replica(value: float | str) -> float:
    """``auto``: one GPU per replica when the connected Ray cluster has GPUs (outside Ray: when this machine has
    a CUDA device), else none."""
    if value != "auto":
        return float(value)
    try:
        import ray

        if ray.is_initialized():
            return 1.0 if cluster_gpus() >= 1 else 0.0
    except ImportError:
        pass
    return 1.0 if local_gpu() else 0.0


def default_device(device: str = "auto") -> str:
    """``auto``: ``cuda`` when this process sees a CUDA device, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    return "cuda" if local_gpu() else "cpu"


def device_name(use_gpu: bool) -> str:
    """The CUDA device's name (for its peak FLOP/s) when training on one, else ``cpu``."""
    import torch

    return torch.cuda.get_device_name() if use_gpu and torch.cuda.is_available() else "cpu"
