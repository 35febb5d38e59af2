"""Calls to a teacher LLM behind any OpenAI-compatible endpoint, made from Ray Data.

- :class:`ReplyCache`: replies on disk keyed by (model, API, prompt, sampling parameters); a rerun or a resumed job
  never pays twice for an item that already has a reply.
- :class:`RateLimiter`: one Ray actor per job, a token bucket every caller draws from (the cluster-wide rate).
- :class:`TeacherClient`: an async ``openai`` client with a concurrency limit, retries with exponential backoff and
  full jitter on 429, 5xx, timeouts and dropped connections (``Retry-After`` honoured), usage counted per call.
- :class:`TeacherCaller`: the ``map_batches`` actor: the rows' ``prompt`` column in, reply columns out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi1_ray.datagen.config import TeacherConfig

REPLY_COLUMNS = ("reply", "finish_reason", "prompt_tokens", "completion_tokens", "attempts", "cached", "error")
RETRY_KINDS = ("429", "5xx", "timeout", "connection")
BATCHES_PER_ACTOR = 4
"""Batches one actor works on at once (threads feeding its event loop)."""


def request_params(cfg: TeacherConfig) -> dict[str, Any]:
    """The sampling parameters of every request, in the OpenAI API's names; ``seed`` and ``stop`` only when set
    (so replies cached before they existed keep their keys)."""
    params: dict[str, Any] = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.seed is not None:
        params["seed"] = cfg.seed
    if cfg.stop:
        params["stop"] = list(cfg.stop)
    return params


def cache_key(cfg: TeacherConfig, prompt: str) -> str:
    params = {"model": cfg.model, "api": cfg.api, "prompt": prompt, **request_params(cfg)}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


class ReplyCache:
    """One JSON file per reply under ``root/ab/abcd....json``, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None  # absent, or a torn file from a killed writer: asked again

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)


class TokenBucket:
    """``rate`` requests per second on average, bursts of at most ``burst``; :meth:`reserve` says how long the
    caller waits before its request may go."""

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        self.interval = 1.0 / rate
        self.burst = max(1.0, burst)
        self.next_free = time.monotonic()

    def reserve(self) -> float:
        now = time.monotonic()
        earliest = now - (self.burst - 1.0) * self.interval
        start = max(self.next_free, earliest)
        self.next_free = start + self.interval
        return max(0.0, start - now)


def rate_limiter_actor(rate: float) -> Any:
    """A Ray actor holding the job's :class:`TokenBucket`; every :class:`TeacherCaller` draws from it."""
    import ray

    @ray.remote(num_cpus=0)
    class RateLimiter:
        def __init__(self, rate: float) -> None:
            self.bucket = TokenBucket(rate)

        def reserve(self) -> float:
            return self.bucket.reserve()

    return RateLimiter.remote(rate)


@dataclass
class CallResult:
    reply: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    retries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RETRY_KINDS, 0))


def _retry_kind(exc: BaseException) -> str | None:
    import openai

    if isinstance(exc, openai.RateLimitError):
        return "429"
    if isinstance(exc, openai.InternalServerError) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500
    ):
        return "5xx"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class TeacherClient:
    """Async calls with ``concurrency`` in flight; create and use it inside one event loop."""

    def __init__(self, cfg: TeacherConfig, concurrency: int, cache: ReplyCache | None, limiter: Any = None) -> None:
        import openai

        self.cfg = cfg
        self.cache = cache
        self.limiter = limiter
        self.semaphore = asyncio.Semaphore(concurrency)
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.client = openai.AsyncOpenAI(
            base_url=cfg.base_url,
            api_key=key or "none",
            max_retries=0,  # ours: counted, with jitter, and the cache in between
            timeout=cfg.timeout_s,
        )
        self.rng = random.Random()

    async def _wait_for_rate(self) -> None:
        if self.limiter is not None:
            delay = await self.limiter.reserve.remote()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _request(self, prompt: str) -> tuple[str, str | None, int, int]:
        cfg = self.cfg
        params = {"model": cfg.model, **request_params(cfg)}
        if cfg.api == "chat":
            out = await self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **params)
            text = out.choices[0].message.content or ""
        else:
            out = await self.client.completions.create(prompt=prompt, **params)
            text = out.choices[0].text or ""
        usage = out.usage
        return (
            text,
            out.choices[0].finish_reason,
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def complete(self, prompt: str) -> CallResult:
        result = CallResult()
        key = cache_key(self.cfg, prompt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return CallResult(
                hit["reply"], hit.get("finish_reason"), hit.get("prompt_tokens", 0), hit.get("completion_tokens", 0),
                attempts=0, cached=True,
            )  # fmt: skip
        for attempt in range(self.cfg.max_retries + 1):
            result.attempts = attempt + 1
            async with self.semaphore:
                await self._wait_for_rate()
                try:
                    text, finish, p_tokens, c_tokens = await self._request(prompt)
                except Exception as exc:  # noqa: BLE001 - classified below; one bad item never kills the job
                    kind = _retry_kind(exc)
                    if kind is None:
                        result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                        return result
                    result.retries[kind] += 1
                    result.error = f"{kind}: {type(exc).__name__}: {str(exc)[:200]}"
                    wait = _retry_after(exc) if kind == "429" else None
                else:
                    result.reply, result.finish_reason = text, finish
                    result.prompt_tokens, result.completion_tokens = p_tokens, c_tokens
                    result.error = None
                    if self.cache is not None:
                        self.cache.put(key, {"reply": text, "finish_reason": finish, "prompt_tokens": p_tokens,
                                             "completion_tokens": c_tokens})  # fmt: skip
                    return result
            if attempt < self.cfg.max_retries:  # backoff outside the semaphore: the slot serves others meanwhile
                cap = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt)
                await asyncio.sleep(wait if wait is not None else self.rng.uniform(0, cap))
        result.error = f"gave up after {result.attempts} attempts: {result.error}"
        return result

    async def close(self) -> None:
        await self.client.close()


class TeacherCaller:
    """Ray Data ``map_batches`` class: adds :data:`REPLY_COLUMNS` and ``retry_*`` counts to rows with a ``prompt``.

    Each actor runs one event loop in a thread; the prompts of the batches it holds go out together, ``concurrency``
    at a time (one semaphore per actor).
    """

    def __init__(self, cfg: dict[str, Any], concurrency: int, cache_dir: str | None, limiter: Any = None) -> None:
        self.cfg = TeacherConfig(**cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cache = ReplyCache(cache_dir) if cache_dir else None

        async def make() -> TeacherClient:
            return TeacherClient(self.cfg, concurrency, cache, limiter)

        self.client = asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        prompts = table.column("prompt").to_pylist()

        async def run() -> list[CallResult]:
            return await asyncio.gather(*(self.client.complete(p) for p in prompts))

        results = asyncio.run_coroutine_threadsafe(run(), self.loop).result()
        rows = [asdict(r) for r in results]
        for name in REPLY_COLUMNS:
            table = table.append_column(name, pa.array([r[name] for r in rows]))
        for kind in RETRY_KINDS:
            table = table.append_column(f"retry_{kind}", pa.array([r["retries"][kind] for r in rows], pa.int64()))
        return table


def teacher_blocks(rows: int, cfg: TeacherConfig, max_rows_per_block: int = 10_000) -> int:
    """How many blocks to cut ``rows`` prompts into: one per batch slot of the actor pool (each actor holds
    ``BATCHES_PER_ACTOR`` tasks), so every slot is busy from the start and no task boundary falls mid-run (measured:
    16 blocks over 8 slots left the server idle for ~1 s between waves, 8 blocks kept it at 92% of the ideal rate);
    more only when blocks would exceed ``max_rows_per_block``."""
    slots = cfg.actors * BATCHES_PER_ACTOR
    waves = max(1, math.ceil(rows / (slots * max_rows_per_block)))
    return max(1, min(rows, slots * waves))


def call_teacher(ds: Any, cfg: TeacherConfig, cache_dir: str | None, batch_size: int | None = None) -> Any:
    """``ds`` (rows with ``prompt``) with the teacher's reply columns: ``cfg.actors`` actors, the job's
    concurrency split between them, one shared rate limit."""
    limiter = rate_limiter_actor(cfg.requests_per_s) if cfg.requests_per_s else None
    per_actor = math.ceil(cfg.concurrency / cfg.actors)
    return ds.map_batches(
        TeacherCaller,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(),
            "concurrency": per_actor,
            "cache_dir": cache_dir,
            "limiter": limiter,
        },
        batch_size=batch_size or max(per_actor, 8),
        batch_format="pyarrow",
        compute=_actor_pool(cfg.actors),
        num_cpus=0.25,  # the actors wait on the network
    )


def _actor_pool(size: int) -> Any:
    """Each actor runs several batches at once (threads feeding its one event loop), so a batch's last slow
    replies never leave the actor's other slots idle."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(
        size=size,
        max_tasks_in_flight_per_actor=BATCHES_PER_ACTOR,
        max_concurrent_calls_per_actor=BATCHES_PER_ACTOR,
        enable_true_multi_threading=True,
    )
