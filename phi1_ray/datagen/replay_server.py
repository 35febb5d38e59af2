"""A small OpenAI-compatible HTTP server that replays recorded teacher replies, with injected faults.

For tests and the teacher-throughput benchmark: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` over HTTP/1.1 keep-alive on 127.0.0.1. The reply to a prompt is chosen from recorded replies by
a hash of the prompt (or computed by a ``responder``); ``latency_s`` is a fixed server-side delay. ``counts``,
``max_in_flight`` and ``arrivals`` record what was served.

Faults are decided per prompt, on its first ``fault_attempts`` attempts only (so every item completes once a
client retries): ``rate_429`` (429 with ``Retry-After``), ``rate_500``, ``rate_slow`` (sleeps ``slow_s``: past the
client's timeout), ``rate_drop`` (closes the connection without answering).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    slow_s: float = 5.0
    fault_attempts: int = 1
    retry_after_s: float = 0.05


def load_replies(path: str | Path) -> dict[str, list[str]]:
    """Recorded replies by kind (``textbook``, ``exercise``, ``annotation``) from a JSONL of {kind, reply}."""
    replies: dict[str, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            replies.setdefault(row["kind"], []).append(row["reply"])
    return replies


def prompt_kind(prompt: str) -> str:
    lowered = prompt.lower()
    if "educational value" in lowered:
        return "annotation"
    if "exercise" in lowered:
        return "exercise"
    return "textbook"


def _unit(prompt: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class ReplayServer:
    replies: dict[str, list[str]] = field(default_factory=dict)
    responder: Callable[[str], str] | None = None
    latency_s: float = 0.0
    faults: Faults = field(default_factory=Faults)
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.counts: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []
        self.attempts: Counter = Counter()
        self.prompts: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # ---- replies -------------------------------------------------------------------------------------------
    def reply_for(self, prompt: str) -> str:
        if self.responder is not None:
            return self.responder(prompt)
        choices = self.replies.get(prompt_kind(prompt)) or self.replies.get("textbook") or ["..."]
        return choices[int(_unit(prompt, "reply") * len(choices))]

    def _fault(self, prompt: str, attempt: int) -> str | None:
        f = self.faults
        if attempt > f.fault_attempts:
            return None
        u = _unit(prompt, f"fault{attempt}")
        for name, rate in (("429", f.rate_429), ("500", f.rate_500), ("slow", f.rate_slow), ("drop", f.rate_drop)):
            if u < rate:
                return name
            u -= rate
        return None

    # ---- HTTP ----------------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._respond(method, path, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            try:
                writer.close()
            except RuntimeError:  # the server is stopping: its loop is closed
                pass

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], extra: str = "") -> None:
        data = json.dumps(payload).encode()
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"{extra}Connection: keep-alive\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _respond(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path.endswith("/models"):
            await self._send(writer, 200, {"object": "list", "data": [{"id": "replay", "object": "model"}]})
            return True
        chat = path.endswith("/chat/completions")
        if method != "POST" or not (chat or path.endswith("/completions")):
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
            return True
        request = json.loads(body or b"{}")
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._complete(request, chat, writer)
        finally:
            self.in_flight -= 1

    async def _complete(self, request: dict[str, Any], chat: bool, writer: asyncio.StreamWriter) -> bool:
        prompt = request["messages"][-1]["content"] if chat else request["prompt"]
        self.attempts[prompt] += 1
        fault = self._fault(prompt, self.attempts[prompt])
        self.counts["requests"] += 1
        if fault == "drop":
            self.counts["dropped"] += 1
            return False  # the connection closes with no answer
        if fault == "429":
            self.counts["429"] += 1
            await self._send(writer, 429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                             f"Retry-After: {self.faults.retry_after_s}\r\n")  # fmt: skip
            return True
        if fault == "500":
            self.counts["500"] += 1
            await self._send(writer, 500, {"error": {"message": "internal error", "type": "server_error"}})
            return True
        if fault == "slow":
            self.counts["slow"] += 1
            await asyncio.sleep(self.faults.slow_s)
        elif self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self.reply_for(prompt)
        self.counts["ok"] += 1
        self.prompts[prompt] += 1
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        payload = {
            "id": f"replay-{self.counts['ok']}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.get("model", "replay"),
            "choices": [choice],
            "usage": usage,
        }
        await self._send(writer, 200, payload)
        return True

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> str:
        """Serve in a background thread; returns the base URL (``http://127.0.0.1:PORT/v1``)."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ReplayServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
