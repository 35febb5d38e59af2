"""The inference engine behind the Serve app: continuous batching on phi1_ray's one decoding loop, testable
without Ray.

The decoding itself (slot KV cache, prefill, decode step, sampling, stop sequences) is
:class:`phi1_ray.decoding.Decoder`, the same loop :mod:`phi1_ray.generate` drives for batch generation. This
module adds what a server needs around it: one background thread owns the decoder and steps it; each request's
sequences (``n`` per prompt) take slots of its cache, with their own sampling parameters, seed (``seed + choice
index``) and stop conditions. A new request is prefilled between two steps and joins the running batch at the
next; every decode step runs all running sequences in one forward pass; a finished or cancelled sequence frees its
slot at once for whoever waits (in arrival order).

Callers talk to it through :class:`Request`: ``engine.submit(...)`` returns one, whose events (text deltas, then one
``done`` per choice) arrive on a thread queue or, from async code, on an ``asyncio`` queue. ``request.cancel()``
stops its sequences at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from phi1_ray.config import SamplingConfig
from phi1_ray.decoding import Completion, Decoder, DecodeSequence, Event, check_prompt_lengths, seeded
from phi1_ray.errors import GenerationError
from phi1_ray.model import Phi1ForCausalLM


@dataclass
class Request:
    """One submitted request: ``n`` sequences per prompt. Iterate its events, or wait for :meth:`result`."""

    prompts: list[list[int]]
    params: SamplingConfig
    n: int
    id: int
    loop: asyncio.AbstractEventLoop | None = None
    stream: bool = True  # False: only the final events (no per-token wake-ups of the caller)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    remaining: int = 0
    texts: dict[int, Completion] = field(default_factory=dict)
    error: str | None = None
    _sync: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _async: asyncio.Queue | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) if self.prompts else 0

    def cancel(self) -> None:
        """Stop generating: the engine drops this request's sequences at its next step."""
        self.cancelled = True

    def _emit(self, event: tuple) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                self.cancelled = True
        else:
            self._sync.put(event)

    def events(self) -> Iterator[tuple]:
        """("delta", index, text) and ("done", index, Completion) events, then ("end",); ("error", message)."""
        while True:
            event = self._sync.get()
            yield event
            if event[0] in ("end", "error"):
                return

    async def aevents(self) -> AsyncIterator[tuple]:
        while True:
            event = await self._async.get()
            yield event
            if event[0] in ("end", "error"):
                return

    def result(self) -> list[Completion]:
        """Block until every choice finished; completions ordered by choice index."""
        for event in self.events():
            if event[0] == "error":
                raise GenerationError(event[1])
        return [self.texts[i] for i in sorted(self.texts)]


@dataclass
class EngineStats:
    """Counters the app exposes at ``/stats`` (per replica)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    max_batch: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return out


class InferenceEngine:
    """Continuous-batching text completion for one phi1_ray model (see the module docstring).

    ``max_batch_size`` sequences run together at most (the cache holds that many slots of the full context);
    requests that need more slots than are free wait in arrival order.
    """

    def __init__(
        self,
        model: Phi1ForCausalLM,
        tokenizer: Any,
        max_batch_size: int = 16,
        model_name: str = "phi-1",
    ) -> None:
        if tokenizer is None:
            raise GenerationError("the checkpoint has no tokenizer: serving needs one beside the weights")
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.context = model.config.n_positions
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = model.config.eos_token_id if eos is None else int(eos)
        self.decoder = Decoder(model, max_batch_size, self.context, tokenizer, self.eos)
        self.device, self.dtype = self.decoder.device, self.decoder.dtype
        self.stats = EngineStats()
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="phi1-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        model_name: str | None = None,
    ) -> InferenceEngine:
        """Load a phi1_ray checkpoint, training run directory or Hugging Face directory / hub id."""
        from phi1_ray.checkpoint import load_model
        from phi1_ray.runtime import default_device

        device = default_device(device)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype == "auto":
            dtype = "fp16" if device.startswith("cuda") else "fp32"
        if dtype not in dtypes:
            raise GenerationError(f"dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
        model, tokenizer = load_model(path, dtype=dtypes[dtype])
        name = model_name or Path(str(path).rstrip("/")).name or "phi-1"
        return cls(model.to(device), tokenizer, max_batch_size=max_batch_size, model_name=name)

    # -- the caller's side -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the decoding thread runs (False after :meth:`close`, or if it died)."""
        return self._thread.is_alive()

    @property
    def free_slots(self) -> list[int]:
        """The cache slots no sequence holds (all of them when the engine is idle)."""
        return self.decoder.free_slots

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def check(self, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
        """Raise GenerationError (naming the limit) if the prompts cannot be served as asked."""
        check_prompt_lengths([len(p) for p in prompts], self.context)
        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens > self.context:
                raise GenerationError(
                    f"prompt {i} is {len(p)} tokens; with max_tokens={max_new_tokens} it exceeds the model's "
                    f"context of {self.context} tokens"
                )

    def submit(
        self,
        prompts: str | Sequence[str],
        params: SamplingConfig,
        n: int = 1,
        loop: asyncio.AbstractEventLoop | None = None,
        stream: bool = True,
    ) -> Request:
        """Queue ``n`` completions of each prompt. With ``loop``, events arrive on that loop (``aevents``).
        ``stream=False``: no ("delta", ...) or ("done", ...) events, only the end (the texts are in ``texts``)."""
        if self._closed:
            raise GenerationError("the engine is shut down")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise GenerationError("no prompt given")
        if n < 1 or n * len(texts) > self.max_batch_size:
            raise GenerationError(
                f"n x prompts = {n * len(texts)} sequences; this engine runs 1 to {self.max_batch_size} per request"
            )
        ids = [self.encode(t) for t in texts]
        self.check(ids, params.max_new_tokens)
        request = Request(ids, params, n, next(self._ids), loop=loop, stream=stream)
        if loop is not None:
            request._async = asyncio.Queue()
        request.remaining = n * len(ids)
        with self._wake:
            self.stats.requests += 1
            self.stats.prompt_tokens += request.prompt_tokens
            self._pending.append(request)
            self._wake.notify()
        return request

    def generate(self, prompts: str | Sequence[str], params: SamplingConfig, n: int = 1) -> list[Completion]:
        return self.submit(prompts, params, n, stream=False).result()

    async def agenerate(self, prompts: str | Sequence[str], params: SamplingConfig, n: int = 1) -> list[Completion]:
        request = self.submit(prompts, params, n, loop=asyncio.get_running_loop(), stream=False)
        try:
            async for event in request.aevents():
                if event[0] == "error":
                    raise GenerationError(event[1])
        finally:
            request.cancel()  # no-op when done; stops the work when the caller went away
        return [request.texts[i] for i in sorted(request.texts)]

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.decoder.running and not self._admissible(self._free_count()):
                    self._wake.wait()
                if self._closed:
                    break
                admitted, free = [], self._free_count()
                while self._admissible(free):
                    admitted.append(self._pending.popleft())
                    free -= admitted[-1].remaining
            for request in admitted:
                self._guarded(self._prefill, request)
            self._drop_cancelled()
            if self.decoder.running:
                self._guarded(self._step)
        for seq in self.decoder.running:
            seq.owner._emit(("error", "the engine shut down"))

    def _free_count(self) -> int:
        return len(self.decoder.free_slots)

    def _admissible(self, free: int) -> bool:
        while self._pending and self._pending[0].cancelled:
            request = self._pending.popleft()
            self.stats.cancelled += 1
            request._emit(("error", "cancelled"))
        return bool(self._pending) and self._pending[0].remaining <= free

    def _guarded(self, fn: Any, *args: Any) -> None:
        """A failing step fails its requests, not the engine."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported to every affected caller; the loop goes on
            affected = {id(s.owner): s.owner for s in self.decoder.clear()}
            if fn == self._prefill:
                affected[id(args[0])] = args[0]
            for request in affected.values():
                self.stats.failed += 1
                request._emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _prefill(self, request: Request) -> None:
        """Add the request's sequences to the decoder: choice j of each prompt samples with ``seed + j``."""
        params = request.params
        seeds = [None if params.seed is None else params.seed + j for _ in request.prompts for j in range(request.n)]
        generators = [seeded(seed, params, self.device) for seed in seeds]
        self._deliver(self.decoder.add(request.prompts, params, generators, n=request.n, owner=request))

    def _step(self) -> None:
        size = len(self.decoder.running)
        events = self.decoder.step()
        self.stats.decode_steps += 1
        self.stats.batch_sizes[size] += 1
        self.stats.max_batch = max(self.stats.max_batch, size)
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Stream each new token's text to its request; finish the sequences that ended."""
        for seq, delta in events:
            request = seq.owner
            if seq.produced:  # a sequence without budget ends with no token
                self.stats.generated_tokens += 1
            if delta and request.stream:
                request._emit(("delta", seq.index, delta))
            if seq.finished:
                self._finish(seq)

    def _finish(self, seq: DecodeSequence) -> None:
        request = seq.owner
        request.texts[seq.index] = seq.completion()
        if request.stream:
            request._emit(("done", seq.index, request.texts[seq.index]))
        request.remaining -= 1
        if request.remaining == 0:
            self.stats.finished += 1
            request._emit(("end",))

    def _drop_cancelled(self) -> None:
        dropped = {}
        for seq in [s for s in self.decoder.running if s.owner.cancelled]:
            self.decoder.remove(seq)
            dropped[id(seq.owner)] = seq.owner
        for request in dropped.values():
            self.stats.cancelled += 1
            request._emit(("error", "cancelled"))
