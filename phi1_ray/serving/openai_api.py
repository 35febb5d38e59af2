"""The OpenAI-compatible HTTP surface of the engine: ``/v1/completions`` (plain and server-sent events),
``/v1/models``, ``/health``, ``/stats``; request validation with OpenAI-style errors; an optional API key.

:class:`CompletionsAPI` holds the logic as async methods taking a Starlette request, so the same code runs inside the
Ray Serve replica (``serve_apps/phi1.py``) and under a plain ASGI server (``build_app``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from phi1_ray.config import SamplingConfig
from phi1_ray.errors import GenerationError
from phi1_ray.serving.engine import InferenceEngine

_DEFAULTS = {  # OpenAI's defaults for /v1/completions
    "max_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "n": 1,
    "stream": False,
}
# Accepted for compatibility only at their neutral value (clients send some of them by default).
_NEUTRAL = {
    "echo": (False,),
    "logprobs": (None,),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "user": None,  # any value: informational
    "stream_options": None,  # handled below
}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed"} | set(_NEUTRAL)
MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class CompletionRequest:
    prompts: list[str]
    single_prompt: bool
    params: SamplingConfig
    n: int
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, kind: type, low: float, high: float, low_open: bool = False) -> Any:
    value = body.get(key, _DEFAULTS[key])
    if value is None:
        value = _DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        left = "(" if low_open else "["
        raise APIError(400, f"{key} must be in {left}{low}, {high}], got {value}", key)
    return kind(value)


def parse_completion_request(body: Any, model_name: str, context: int, max_sequences: int) -> CompletionRequest:
    """Validate a /v1/completions body; APIError(400) names the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}; accepted: {', '.join(sorted(_KNOWN))}", unknown[0])
    for key, neutral in _NEUTRAL.items():
        if neutral is not None and key in body and body[key] not in neutral:
            raise APIError(400, f"{key}={body[key]!r} is not supported by this server", key)
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {model_name!r}", "model",
                       kind="model_not_found")  # fmt: skip
    prompt = body.get("prompt")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    if any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    max_tokens = _number(body, "max_tokens", int, 1, context)
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, low_open=True)
    n = _number(body, "n", int, 1, max_sequences)
    if n * len(prompts) > max_sequences:
        raise APIError(400, f"n x len(prompt) = {n * len(prompts)}; at most {max_sequences} per request", "n")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise APIError(400, f"seed must be a non-negative integer, got {seed!r}", "seed")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options takes only include_usage", "stream_options")
    params = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops)
    return CompletionRequest(prompts, single, params, n, stream, bool(options.get("include_usage")))


class CompletionsAPI:
    """The endpoints, over one :class:`InferenceEngine`. ``api_key``: when set, ``/v1/*`` needs it as a Bearer token."""

    def __init__(self, engine: InferenceEngine, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> None:
        self.engine = engine
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    @classmethod
    def from_env(cls, engine: InferenceEngine, api_key_env: str = "PHI1_API_KEY", **kwargs: Any) -> CompletionsAPI:
        return cls(engine, api_key=os.environ.get(api_key_env) or None, **kwargs)

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def error_response(error: APIError) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(error.body(), status_code=error.status)

    def _authorize(self, request: Any) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer <key>", kind="authentication_error")

    async def _json_body(self, request: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"the request body is {length} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None

    # -- endpoints -------------------------------------------------------------------------------------------
    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        alive = self.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def stats(self, request: Any) -> Any:
        import torch
        from starlette.responses import JSONResponse

        engine = self.engine
        where = {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                 "torch_threads": torch.get_num_threads(), "max_batch_size": engine.max_batch_size}  # fmt: skip
        return JSONResponse({"model": engine.model_name, **where, **engine.stats.as_dict()})

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            self._authorize(request)
        except APIError as exc:
            return self.error_response(exc)
        card = {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "phi1_ray"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            self._authorize(request)
            body = await self._json_body(request)
            engine = self.engine
            parsed = parse_completion_request(body, engine.model_name, engine.context, engine.max_batch_size)
            try:  # submit tokenizes once and checks the prompts against the context
                job = engine.submit(
                    parsed.prompts, parsed.params, parsed.n, loop=asyncio.get_running_loop(), stream=parsed.stream
                )
            except GenerationError as exc:
                raise APIError(400, str(exc), "max_tokens" if "max_tokens" in str(exc) else "prompt") from None
        except APIError as exc:
            return self.error_response(exc)
        ident = f"cmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": self.engine.model_name}
        if parsed.stream:
            return StreamingResponse(self._sse(job, head, parsed), media_type="text/event-stream")
        try:
            async for event in job.aevents():
                if event[0] == "error":
                    return self.error_response(APIError(500, event[1], kind="server_error"))
        finally:
            job.cancel()  # the client went away before the end: stop generating
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in sorted(job.texts.items())
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(job)})

    async def _sse(self, job: Any, head: dict, parsed: CompletionRequest) -> Any:
        def frame(payload: Any) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            async for event in job.aevents():
                if event[0] == "delta":
                    choice = {"index": event[1], "text": event[2], "logprobs": None, "finish_reason": None}
                    yield frame({**head, "choices": [choice]})
                elif event[0] == "done":
                    choice = {"index": event[1], "text": "", "logprobs": None, "finish_reason": event[2].finish_reason}
                    yield frame({**head, "choices": [choice]})
                elif event[0] == "error":
                    yield frame(APIError(500, event[1], kind="server_error").body())
                    return
            if parsed.include_usage:
                yield frame({**head, "choices": [], "usage": _usage(job)})
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that disconnects mid-stream stops its generation here


def _usage(job: Any) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in job.texts.values())
    prompt = job.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(api: CompletionsAPI) -> Any:
    """The endpoints as a plain Starlette ASGI app (no Ray): for in-process use and benchmarks."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/stats", api.stats, methods=["GET"]),
        ]
    )
