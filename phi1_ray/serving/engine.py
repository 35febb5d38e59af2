"""The inference engine behind the Serve app: continuous batching over a slot KV cache, testable without Ray.

One background thread runs the decoding loop. Each request's sequences (``n`` per prompt) take slots of a
preallocated cache: their own rows, with their own positions, sampling parameters, seed and stop conditions. A new
request is prefilled on its own and joins the running batch at the next step; every decode step runs all running
sequences in one forward pass (each row reads only its own cached keys); a finished or cancelled sequence frees its
slot at once for whoever waits.

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
from phi1_ray.errors import GenerationError
from phi1_ray.generate import Completion, _TextRow, check_prompt_lengths, sample_next
from phi1_ray.model import KVCache, ModelConfig, Phi1ForCausalLM


class SlotKVCache:
    """Keys/values of every running sequence, one slot (row) each: (n_layer, slots, n_head, max_len, head_dim).

    Before a decode step :meth:`bind` says which slots run, where each writes its new position and how many
    positions to read back; the model's attention then calls :meth:`update` as it would on a :class:`KVCache`.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.n_layer, slots, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # the model adds to it; positions here are explicit per row
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.write_at = torch.zeros(0, dtype=torch.long, device=device)
        self.span = 0

    def bind(self, rows: torch.Tensor, write_at: torch.Tensor, span: int) -> None:
        self.rows, self.write_at, self.span = rows, write_at, span

    def fill(self, slot: int, prefix: KVCache, length: int) -> None:
        """Copy a prefilled prompt (row 0 of ``prefix``) into ``slot``."""
        self.k[:, slot, :, :length] = prefix.k[:, 0, :, :length]
        self.v[:, slot, :, :length] = prefix.v[:, 0, :, :length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_head, 1, head_dim) for the bound rows; each row writes at its own position.
        self.k[layer, self.rows, :, self.write_at] = k[:, :, 0]
        self.v[layer, self.rows, :, self.write_at] = v[:, :, 0]
        return self.k[layer, self.rows, :, : self.span], self.v[layer, self.rows, :, : self.span]


@dataclass
class _Sequence:
    request: Request
    index: int  # the choice index in the response
    row: _TextRow
    params: SamplingConfig
    generator: torch.Generator | None
    budget: int  # new tokens it may still take (max_tokens, bounded by the context)
    slot: int = -1
    position: int = 0  # positions in its cache slot so far
    last: int = 0  # the token sampled last, not yet in the cache
    produced: int = 0


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
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = model.config.eos_token_id if eos is None else int(eos)
        self.cache = SlotKVCache(model.config, max_batch_size, self.context, self.dtype, self.device)
        self.stats = EngineStats()
        self._free = list(range(max_batch_size - 1, -1, -1))
        self._pending: collections.deque[Request] = collections.deque()
        self._running: list[_Sequence] = []
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
                while not self._closed and not self._running and not self._admissible():
                    self._wake.wait()
                if self._closed:
                    break
                admitted = []
                while self._admissible():
                    request = self._pending.popleft()
                    slots = [self._free.pop() for _ in range(request.remaining)]
                    admitted.append((request, slots))
            for request, slots in admitted:
                self._guarded(self._prefill, request, slots)
            self._drop_cancelled()
            if self._running:
                self._guarded(self._step)
        for seq in self._running:
            seq.request._emit(("error", "the engine shut down"))

    def _admissible(self) -> bool:
        while self._pending and self._pending[0].cancelled:
            request = self._pending.popleft()
            self.stats.cancelled += 1
            request._emit(("error", "cancelled"))
        return bool(self._pending) and self._pending[0].remaining <= len(self._free)

    def _guarded(self, fn: Any, *args: Any) -> None:
        """A failing step fails its requests, not the engine."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported to every affected caller; the loop goes on
            affected = {id(s.request): s.request for s in self._running}
            if fn == self._prefill:
                affected[id(args[0])] = args[0]
            for seq in self._running:
                self._release(seq)
            self._running = []
            for request in affected.values():
                self.stats.failed += 1
                request._emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    @torch.inference_mode()
    def _prefill(self, request: Request, slots: list[int]) -> None:
        params = request.params
        free = iter(slots)
        for p_index, prompt in enumerate(request.prompts):
            prefix = KVCache(self.model.config, 1, len(prompt), self.dtype, self.device)
            ids = torch.as_tensor([prompt], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache=prefix, last_only=True)[:, -1]  # (1, V)
            for j in range(request.n):
                seed = None if params.seed is None else params.seed + j
                generator = None
                if seed is not None and params.temperature > 0:
                    generator = torch.Generator(device=self.device).manual_seed(seed)
                seq = _Sequence(
                    request=request,
                    index=p_index * request.n + j,
                    row=_TextRow(self.tokenizer, self.eos, params.stop),
                    params=params,
                    generator=generator,
                    budget=min(params.max_new_tokens, self.context - len(prompt)),
                    slot=next(free),
                    position=len(prompt),
                )
                self.cache.fill(seq.slot, prefix, len(prompt))
                if seq.budget <= 0:
                    self._finish(seq)
                    continue
                self._take(seq, int(sample_next(logits, params, generator)[0]))

    def _take(self, seq: _Sequence, token: int) -> None:
        """A sampled token: detokenize, stream, and finish or keep the sequence running."""
        seq.last = token
        seq.produced += 1
        self.stats.generated_tokens += 1
        delta = seq.row.push(token)
        if delta and seq.request.stream:
            seq.request._emit(("delta", seq.index, delta))
        if seq.row.finish_reason is not None or seq.produced >= seq.budget:
            self._finish(seq)
        elif seq not in self._running:
            self._running.append(seq)

    def _finish(self, seq: _Sequence) -> None:
        tail = seq.row.finish()
        if tail and seq.request.stream:
            seq.request._emit(("delta", seq.index, tail))
        if seq in self._running:
            self._running.remove(seq)
        self._release(seq)
        request = seq.request
        request.texts[seq.index] = Completion(seq.row.text, seq.row.token_ids, seq.row.finish_reason or "length")
        if request.stream:
            request._emit(("done", seq.index, request.texts[seq.index]))
        request.remaining -= 1
        if request.remaining == 0:
            self.stats.finished += 1
            request._emit(("end",))

    def _release(self, seq: _Sequence) -> None:
        if seq.slot >= 0:
            self._free.append(seq.slot)
            seq.slot = -1

    def _drop_cancelled(self) -> None:
        dropped = {}
        for seq in [s for s in self._running if s.request.cancelled]:
            self._running.remove(seq)
            self._release(seq)
            dropped[id(seq.request)] = seq.request
        for request in dropped.values():
            self.stats.cancelled += 1
            request._emit(("error", "cancelled"))

    @torch.inference_mode()
    def _step(self) -> None:
        """One forward pass for every running sequence; each samples its next token with its own parameters."""
        seqs = list(self._running)
        device = self.device
        rows = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=device)
        positions = torch.tensor([s.position for s in seqs], dtype=torch.long, device=device)
        span = max(s.position for s in seqs) + 1
        key_valid = torch.arange(span, device=device)[None, :] <= positions[:, None]
        tokens = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=device)
        self.cache.bind(rows, positions, span)
        logits = self.model(
            tokens, position_ids=positions[:, None], key_valid=key_valid, cache=self.cache, last_only=True
        )[:, -1]
        self.stats.decode_steps += 1
        self.stats.batch_sizes[len(seqs)] += 1
        self.stats.max_batch = max(self.stats.max_batch, len(seqs))
        greedy = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            seq.position += 1
            if seq.params.temperature == 0.0:
                token = greedy[i]
            else:
                token = int(sample_next(logits[i : i + 1], seq.params, seq.generator)[0])
            self._take(seq, token)
