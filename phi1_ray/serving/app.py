"""The Ray Serve deployment around :class:`~phi1_ray.serving.engine.InferenceEngine` and its typed builder.

``serve_apps/phi1.py`` exposes :func:`app_builder` and ``app`` to Ray's CLI; the pipeline and the tests call them
directly. Replica count or autoscaling, GPUs per replica and the request limits come from :class:`AppArgs` (the
``args`` of a Serve config file, or ``key=value`` pairs after ``serve run ...:app_builder``).
"""

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from phi1_ray import storage
from phi1_ray.config import Section, build
from phi1_ray.errors import ConfigError
from phi1_ray.runtime import gpus_per_replica

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = ROOT / "runs" / "demo" / "export"  # what `make demo` exports
CHECKPOINT_ENV = "PHI1_CHECKPOINT"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
"""Set to 1 in the environment of the Ray processes (``ray start``, ``serve run``; cluster/ does it), Serve puts
HAProxy on the HTTP port, forwarding straight to each replica's own HTTP server instead of through Serve's Python
proxy actor: a request that does nothing takes 1-2 ms instead of 5-10 (benchmarks/RESULTS.md, serve_overhead)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AppArgs(Section):
    """Arguments of the serving app (``serve run serve_apps.phi1:app_builder key=value ...``)."""

    checkpoint: str | None = None
    """A phi1_ray checkpoint, training run directory, Hugging Face directory or hub id. Default: $PHI1_CHECKPOINT,
    else the export of `make demo` (runs/demo/export)."""
    model_name: str | None = None
    """The model id clients send and /v1/models lists. Default: the checkpoint directory's name."""
    num_replicas: int | None = Field(None, ge=1)
    """A fixed replica count; unset: autoscaling between min_replicas and max_replicas."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling aims at this many requests in progress per replica."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica works on at once (its engine batches them)."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a replica; past this clients get a quick 503. -1: unbounded."""
    num_gpus: float | Literal["auto"] = "auto"
    """GPUs per replica. ``auto``: 1 when the Ray cluster has GPUs (or, outside Ray, this machine has one), else 0:
    the same Serve config runs on a laptop and on GPU nodes."""
    num_cpus: float = Field(1.0, ge=0)
    device: str = "auto"
    """``auto``: the replica's GPU when it has one, else the CPU."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """``auto``: fp16 on GPUs, fp32 on CPUs."""
    max_batch_size: int = Field(16, ge=1)
    """Sequences decoded together per replica (KV-cache slots)."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies get 413."""
    api_key_env: str = "PHI1_API_KEY"
    """Environment variable holding the API key; when it is set, /v1/* needs `Authorization: Bearer <key>`."""

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.num_gpus != "auto" and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or auto, got {self.num_gpus}")
        if self.num_replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


def parse_args(args: dict[str, Any] | None) -> AppArgs:
    """The app's arguments (strings from ``serve run ... key=value`` are read as the fields' types), validated like
    every config: a bad one raises ConfigError naming the key (an unknown one: the valid keys)."""
    return build(AppArgs, dict(args or {}), source="the serving app's arguments")


def resolve_checkpoint(value: str | None) -> str:
    """An absolute checkpoint path (or a hub id); ConfigError saying how to get or name one when there is none."""
    source = "checkpoint=" if value else f"${CHECKPOINT_ENV}" if os.environ.get(CHECKPOINT_ENV) else "the default"
    chosen = value or os.environ.get(CHECKPOINT_ENV) or str(DEFAULT_CHECKPOINT)
    if storage.is_uri(chosen):
        return chosen  # object storage: each replica copies it once (phi1_ray.storage.localize)
    path = Path(chosen).expanduser()
    if path.exists():
        return str(path.resolve())
    if value and _HUB_ID.match(value) and not value.startswith((".", "/")):
        return value  # a Hugging Face hub id: the replicas download it
    raise ConfigError(
        f"no checkpoint to serve: {path} ({source}) does not exist. Run `make demo` to train and export one to "
        f"{DEFAULT_CHECKPOINT.relative_to(ROOT)}, or name one: `serve run serve_apps.phi1:app_builder "
        f"checkpoint=DIR`, or set {CHECKPOINT_ENV}=DIR"
    )


def deployment_options(args: AppArgs, env: dict[str, str] | None = None) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": args.num_cpus, "num_gpus": gpus_per_replica(args.num_gpus)}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": actor,
    }
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    return options


def _deployment() -> Any:
    """The deployment class (built on first use: importing this module needs neither Ray nor FastAPI).

    No ``from __future__ import annotations`` in this module: FastAPI reads the routes' ``Request`` annotations at
    run time, and they name a class imported here, not at module level."""
    from fastapi import FastAPI, Request
    from ray import serve

    from phi1_ray.serving.engine import InferenceEngine
    from phi1_ray.serving.openai_api import CompletionsAPI

    api = FastAPI(title="phi1_ray completions", docs_url=None, redoc_url=None)

    @serve.deployment(name="Phi1Completions", health_check_period_s=10)
    @serve.ingress(api)
    class Phi1Completions:
        def __init__(self, args: dict[str, Any]) -> None:
            settings = parse_args(args)
            engine = InferenceEngine.from_checkpoint(
                settings.checkpoint,
                device=settings.device,
                dtype=settings.dtype,
                max_batch_size=settings.max_batch_size,
                model_name=settings.model_name,
            )
            self.api = CompletionsAPI.from_env(engine, settings.api_key_env, max_body_bytes=settings.max_body_bytes)

        def check_health(self) -> None:
            if not self.api.engine.alive:
                raise RuntimeError("the inference engine's thread stopped")

        @api.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            return await self.api.completions(request)

        @api.get("/v1/models")
        async def models(self, request: Request) -> Any:
            return await self.api.models(request)

        @api.get("/health")
        async def health(self, request: Request) -> Any:
            return await self.api.health(request)

        @api.get("/stats")
        async def stats(self, request: Request) -> Any:
            return await self.api.stats(request)

    return Phi1Completions


def app_builder(args: dict[str, Any] | None = None) -> Any:
    """The Serve application for ``args`` (see :class:`AppArgs`); fails at once, with what to do, without a
    checkpoint. The API key variable, when set here, is passed on to the replicas."""
    settings = parse_args(args)
    settings.checkpoint = resolve_checkpoint(settings.checkpoint)
    env = {settings.api_key_env: os.environ[settings.api_key_env]} if os.environ.get(settings.api_key_env) else None
    deployment = _deployment().options(**deployment_options(settings, env))
    return deployment.bind(settings.model_dump())
