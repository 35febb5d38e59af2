"""The execution sandbox: model-written code runs here, one fresh process per sample, behind kernel walls.

Layout::

    harness thread ──JSON lines──> fork server ──fork (one per sample)──> sample
    (this process)                 (python -I, stdlib preloaded;           (prompt + completion, then the
                                    enforces each sample's deadline)        test's check)

The fork server ("zygote") is started with a scrubbed environment and imports the common standard-library modules
once, so a sample starts in a few milliseconds without sharing a process with any other sample. Where the kernel
allows user namespaces (``isolation="namespaces"``, the default when available) the server moves once into fresh
user, mount, PID and network namespaces with the whole filesystem read-only, and each sample gets more of its own:

- a fresh PID namespace whose PID 1 is the sample: it sees no other process, ``getppid()`` is 0, and when it exits
  or is killed every process it started dies with it;
- a network namespace with only a loopback device, and it down (made once per fork server, which runs one sample
  at a time: no two samples are ever in it together, and none can configure it);
- a fresh mount namespace whose working directory is an empty ``tmpfs`` capped at ``fsize_mb``;
- an unprivileged user with no capabilities (``RLIMIT_NPROC`` then holds fork bombs).

Everywhere: ``RLIMIT_AS``/``RLIMIT_CPU``/``RLIMIT_NPROC``/``RLIMIT_FSIZE``, a wall-clock timeout after which the process
group (or namespace) is killed, stdin closed, stdout/stderr captured to a capped file, an environment with nothing
inherited, and (``audit_hooks=True``) Python audit hooks that refuse sockets, new processes, signals to other
processes, ``ctypes`` and writes outside the working directory with a clear message. Without namespaces
(``isolation="basic"``) the audit hooks are what refuses the network.

A sample passes only when the test's ``check`` returned and the harness's own code after it reported so with a nonce
the sample never sees as a name: ``sys.exit``/``os._exit`` before the end, or an exception, is a failure. Builtins and
the guarded standard-library modules are restored after the completion ran (so it cannot pre-patch ``abs`` or
``math.isclose`` for the test), and a sample that patches them while the test runs fails. Forging a pass would need
deliberate introspection of the harness's memory; the walls above do not depend on that.

The fork server and the samples run ``sandbox_server.py`` (standard library only); this module is the harness.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import model_validator

from phi1_ray.config import Section

# What only the harness needs (threads, subprocess, secrets) is imported inside its methods.

STATUSES = ("passed", "failed", "timed_out", "error")


class Limits(Section):
    """Per-sample limits of the sandbox."""

    timeout_s: float = 3.0
    """Wall-clock seconds per sample; then its process group (or namespace) is killed."""
    memory_mb: int = 1024
    """Address-space cap per sample (RLIMIT_AS)."""
    cpu_s: int | None = None
    """CPU seconds per sample (RLIMIT_CPU); None: the wall-clock timeout rounded up, plus one second."""
    nproc: int = 32
    """Processes of the samples' user (RLIMIT_NPROC): where a fork bomb stops."""
    fsize_mb: int = 16
    """Largest file a sample writes (RLIMIT_FSIZE), and the size of its tmpfs working directory."""
    output_bytes: int = 4096
    """stdout + stderr kept per sample."""

    @model_validator(mode="after")
    def _check(self) -> Limits:
        for name in ("timeout_s", "memory_mb", "nproc", "fsize_mb", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")
        return self


@dataclass(frozen=True)
class Program:
    """What one sample runs: ``code`` (prompt + completion), then ``test``, then ``check(<entry_point>)`` if given."""

    code: str
    test: str
    entry_point: str | None = None


@dataclass
class SampleResult:
    status: str  # one of STATUSES
    message: str = ""
    duration_s: float = 0.0
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class _Server:
    proc: Any  # subprocess.Popen
    isolation: str
    reason: str = ""


class SandboxError(RuntimeError):
    """The sandbox itself could not start (not a verdict on a sample)."""


class Sandbox:
    """A pool of fork servers; :meth:`run` executes one program, :meth:`run_many` many in parallel.

    ``isolation``: ``"auto"`` (namespaces where the kernel allows them, else basic), ``"namespaces"`` (fail if not
    available) or ``"basic"``. ``audit_hooks=False`` leaves only the kernel's walls (used to test them).
    """

    def __init__(
        self,
        workers: int | None = None,
        limits: Limits | None = None,
        isolation: str = "auto",
        audit_hooks: bool = True,
        scratch: str | Path | None = None,
    ) -> None:
        if isolation not in ("auto", "namespaces", "basic"):
            raise ValueError(f"isolation must be one of auto, namespaces, basic; got {isolation!r}")
        import tempfile
        from queue import Queue

        self.workers = max(1, workers or os.cpu_count() or 1)
        self.limits = limits or Limits()
        self.audit_hooks = audit_hooks
        self._requested = isolation
        self._scratch = Path(tempfile.mkdtemp(prefix="phi1-sandbox-", dir=scratch))
        os.chmod(self._scratch, 0o711)
        self._idle: Queue = Queue()
        self._servers: list[_Server] = []
        self._closed = False
        procs = [self._spawn_server() for _ in range(self.workers)]  # they start side by side
        try:
            servers = [self._handshake(proc) for proc in procs]
        except SandboxError:
            for proc in procs:
                proc.kill()
            raise
        self.isolation = servers[0].isolation
        self.isolation_note = servers[0].reason
        for server in servers:
            self._idle.put(server)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _spawn_server(self) -> Any:
        import subprocess

        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from phi1_ray.evals.sandbox_server import serve; serve()"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        return subprocess.Popen(
            [sys.executable, "-I", "-c", code, self._requested, str(self._scratch), str(self.limits.nproc)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=str(self._scratch),
            start_new_session=True,
        )

    def _handshake(self, proc: Any) -> _Server:
        line = proc.stdout.readline()
        if not line:
            raise SandboxError("the sandbox's fork server exited at start")
        hello = json.loads(line)
        if "error" in hello:
            proc.kill()
            raise SandboxError(hello["error"])
        server = _Server(proc, hello["isolation"], hello.get("reason", ""))
        self._servers.append(server)
        return server

    def _start_server(self) -> _Server:
        return self._handshake(self._spawn_server())

    def close(self) -> None:
        import subprocess

        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            try:
                server.proc.stdin.close()
                server.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                server.proc.kill()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, program: Program, limits: Limits | None = None) -> SampleResult:
        import secrets

        limits = limits or self.limits
        request = {
            "code": program.code,
            "test": program.test,
            "entry_point": program.entry_point,
            "limits": limits.model_dump(),
            "nonce": secrets.token_hex(16),
            "audit_hooks": self.audit_hooks,
        }
        server = self._idle.get()
        try:
            server.proc.stdin.write(json.dumps(request).encode() + b"\n")
            server.proc.stdin.flush()
            line = server.proc.stdout.readline()
            if not line:
                raise OSError("fork server closed its pipe")
            reply = json.loads(line)
        except (OSError, ValueError) as exc:
            server.proc.kill()
            self._servers.remove(server)
            server = self._start_server()
            return SampleResult("error", f"the sandbox's fork server failed: {exc}")
        finally:
            self._idle.put(server)
        return SampleResult(**reply)

    def run_many(self, programs: Iterable[Program]) -> list[SampleResult]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))

    def imap(self, programs: Iterable[Program]) -> Iterator[SampleResult]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            yield from pool.map(self.run, programs)
