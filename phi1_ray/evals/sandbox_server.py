"""The fork server of the sandbox (``sandbox.py``) and everything its samples run: standard library only, since
every module the server holds makes each of its forks slower.

The harness starts ``python -I -c "...; from phi1_ray.evals.sandbox_server import serve; serve()"``; :func:`serve`
reads one JSON request per line on stdin (a program, its limits, a nonce) and answers one JSON verdict per line.
The walls each sample runs behind are described in ``sandbox.py``.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
from typing import Any

# Imported by the fork server so samples can use them without reading the filesystem (S may not be able to).
PRELOAD = (
    "abc", "array", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "collections", "collections.abc",
    "contextlib", "copy", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "hashlib",
    "heapq", "io", "itertools", "json", "keyword", "math", "numbers", "operator", "pprint", "random", "re",
    "shutil", "signal", "socket", "statistics", "string", "struct", "textwrap", "time", "types",
    "typing", "unicodedata", "zlib",
)  # fmt: skip
# Modules whose functions a test may rely on: a sample that swaps one of them fails.
GUARDED = ("builtins", "math", "cmath", "operator", "functools", "itertools", "collections", "re", "string", "heapq")
_BLOCKED_EVENTS = {
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "socket.getaddrinfo": "network access",
    "os.system": "starting processes",
    "subprocess.Popen": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes",
    "os.fork": "starting processes",
    "os.forkpty": "starting processes",
    "ctypes.dlopen": "ctypes",
    "ctypes.dlsym": "ctypes",
    "gc.get_objects": "heap inspection",
    "gc.get_referrers": "heap inspection",
    "gc.get_referents": "heap inspection",
}
_PATH_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "os.chmod", "os.chown", "os.truncate",
    "os.symlink", "os.link", "os.mkdir", "os.utime", "shutil.move", "shutil.copyfile",
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# Linux constants (x86_64 and aarch64 agree on these).
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_MOUNT_ATTR_RDONLY, _AT_FDCWD, _AT_RECURSIVE, _SYS_MOUNT_SETATTR = 1, -100, 0x8000, 442
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECUREBITS, _PR_CAPBSET_DROP = 38, 28, 24
_INSIDE_UID = 1000  # the unprivileged user S becomes inside its namespace when the harness runs as root
_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _set_limits(limits: dict[str, Any]) -> None:
    cpu = limits["cpu_s"] or int(limits["timeout_s"]) + 1
    memory = limits["memory_mb"] * 2**20
    fsize = limits["fsize_mb"] * 2**20
    for res, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, limits["nproc"]),
        (resource.RLIMIT_FSIZE, fsize),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


def _install_audit_hook(work: str) -> None:
    own = os.getpid()

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == work or real.startswith(work + os.sep)

    def hook(event: str, args: tuple) -> None:
        what = _BLOCKED_EVENTS.get(event)
        if what is not None:
            raise PermissionError(f"{what} is not allowed in the sandbox ({event})")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes and not inside(path):
                raise PermissionError(f"writing outside the sandbox's directory is not allowed ({path})")
        elif event in _PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"{event} outside the sandbox's directory is not allowed ({path})")
        elif event in ("os.kill", "os.killpg") and args and args[0] != own:
            raise PermissionError(f"signalling other processes is not allowed in the sandbox ({event})")

    sys.addaudithook(hook)


_SNAPSHOT: dict[str, dict[str, Any]] = {}  # the guarded modules as the fork server holds them
_UNPRIVILEGED_MAPPED = False  # whether the namespaces map an unprivileged user (root harness) for the samples


def _snapshot() -> dict[str, dict[str, Any]]:
    return {name: dict(vars(sys.modules[name])) for name in GUARDED if name in sys.modules}


def _restore(snapshot: dict[str, dict[str, Any]]) -> None:
    for name, saved in snapshot.items():
        current = vars(sys.modules[name])
        for key, value in saved.items():
            if current.get(key, _restore) is not value:
                current[key] = value


def _tampered(snapshot: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{name}.{key}"
        for name, saved in snapshot.items()
        for key, value in saved.items()
        if callable(value) and vars(sys.modules[name]).get(key, _tampered) is not value
    ]


def _describe(exc: BaseException) -> str:
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<completion>", "<test>"):
            where = f" ({tb.tb_frame.f_code.co_filename[1:-1]} line {tb.tb_lineno})"
        tb = tb.tb_next
    text = str(exc)
    return f"{type(exc).__name__}{': ' + text[:300] if text else ''}{where}"


def _run_sample(request: dict[str, Any], result_fd: int) -> None:
    """In S, inside the walls: run the program and write one JSON verdict line with the nonce."""
    nonce = request.pop("nonce")
    report_fd = result_fd

    def report(status: str, message: str = "") -> None:
        os.write(report_fd, json.dumps({"status": status, "message": message, "nonce": nonce}).encode() + b"\n")

    snapshot = _SNAPSHOT
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": sys.modules["builtins"]}
    stage = "completion"
    try:
        exec(compile(request["code"], "<completion>", "exec"), namespace)
        _restore(snapshot)
        stage = "test"
        exec(compile(request["test"], "<test>", "exec"), namespace)
        entry = request["entry_point"]
        if entry:
            if entry not in namespace:
                report("failed", f"the completion does not define {entry}")
                return
            namespace["check"](namespace[entry])
    except SystemExit as exc:
        report("failed", f"the {stage} called sys.exit({exc.code!r}) before the test finished")
        return
    except MemoryError:
        report("failed", "MemoryError: the sample exceeded its memory limit")
        return
    except BaseException as exc:  # noqa: BLE001 - any exception in model-written code is a failed sample
        report("failed", _describe(exc))
        return
    tampered = _tampered(snapshot)
    if tampered:
        report("failed", f"the sample replaced {', '.join(tampered[:5])} while the test ran")
        return
    report("passed")


def _write_id_maps(pid: int) -> None:
    """Map the namespace's root to us and, when we are root, an unprivileged user for the samples."""
    uid, gid = os.geteuid(), os.getegid()
    extra = f"{_INSIDE_UID} 65534 1\n" if uid == 0 else ""
    for name, data in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n{extra}"), ("gid_map", f"0 {gid} 1\n{extra}")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(data)


def _mount(libc: Any, source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(libc.mount(source, target.encode(), fstype, flags, data), f"mount {target}")


_SAMPLE_PATH: list[str] = []  # the import path samples use inside the namespaces (see below)


def _enter_zygote_namespaces(scratch: str, nproc: int) -> str:
    """Called once by the fork server: move it into fresh user, mount and PID namespaces with a read-only root.

    Returns '' on success, else why the kernel refused (the caller then falls back to basic isolation).
    The server becomes PID 1 of its PID namespace, so it may later give each sample a PID namespace of its own.
    """
    libc = _libc()
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))  # becomes the user namespace's own process cap
    sync_r, sync_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # stays in the parent namespaces, where it may write our id maps
        os.close(sync_w)
        os.close(done_r)
        ok = os.read(sync_r, 1) == b"u"
        try:
            if ok:
                _write_id_maps(os.getppid())
            os.write(done_w, b"d")
        except OSError:
            os.write(done_w, b"f")
        os._exit(0)
    os.close(sync_r)
    os.close(done_w)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET) != 0:
        reason = f"unshare(user, mount, pid, net) is refused here: {os.strerror(ctypes.get_errno())}"
        os.close(sync_w)
        os.waitpid(helper, 0)
        return reason
    os.write(sync_w, b"u")
    mapped = os.read(done_r, 1) == b"d"
    os.waitpid(helper, 0)
    if not mapped:
        os._exit(3)  # half inside a user namespace without ids: nothing sensible is left to do
    server = os.fork()  # PID 1 of the new PID namespace: the fork server from here on
    if server != 0:
        _, status = os.waitpid(server, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the process the harness started
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
        "mount_setattr(read-only /)",
    )
    _mount(libc, b"tmpfs", scratch, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0711")
    _mount(libc, b"proc", "/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    # The interpreter's import path, bound (read-only, like everything) where the samples' unprivileged user can
    # reach it: a Python installed under a private home directory still imports its standard library.
    libs = os.path.join(scratch, "lib")
    os.mkdir(libs, 0o755)
    for index, entry in enumerate(path for path in sys.path if path and os.path.isdir(path)):
        target = os.path.join(libs, str(index))
        os.mkdir(target, 0o755)
        _mount(libc, entry.encode(), target, None, _MS_BIND | _MS_REC, None)
        _SAMPLE_PATH.append(target)
    return ""


def _drop_privileges(libc: Any) -> None:
    """Become the namespace's unprivileged user (root harness) or give up every capability (other harnesses)."""
    if _UNPRIVILEGED_MAPPED:
        os.setgid(_INSIDE_UID)
        os.setuid(_INSIDE_UID)  # clears every capability
        return
    _check(libc.prctl(_PR_SET_SECUREBITS, 0x2F, 0, 0, 0), "securebits")
    for cap in range(64):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)

    class _Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class _Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(libc.capset(ctypes.byref(_Header(0x20080522, 0)), (_Data * 2)()), "capset")


def _sample_process(request: dict[str, Any], work: str, out_fd: int, result_fd: int, namespaces: bool) -> None:
    """S: set up the walls, then run the sample. Never returns."""
    try:
        os.setsid()
        limits = request["limits"]
        libc = _libc()
        if namespaces:  # PID 1 of a fresh PID namespace; now a fresh mount namespace too
            _check(libc.unshare(_CLONE_NEWNS), "unshare(mount)")
            opts = f"size={limits['fsize_mb']}m,mode=0777".encode()
            _mount(libc, b"tmpfs", work, b"tmpfs", _MS_NOSUID | _MS_NODEV, opts)
            _mount(libc, b"proc", "/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            _drop_privileges(libc)
            sys.path[:] = _SAMPLE_PATH
            sys.path_importer_cache.clear()
        elif os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(work)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        keep = {0, 1, 2, result_fd}
        for fd in range(3, max(result_fd, null, out_fd) + 64):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "TMPDIR": work})
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an output flood gets an error, not a silent kill
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.stdin = None
        _set_limits(limits)
        if request["audit_hooks"]:
            _install_audit_hook(os.path.realpath(work))
        _run_sample(request, result_fd)
        try:
            sys.stdout.flush()
        except OSError:
            pass
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(result_fd, json.dumps({"status": "error", "message": f"sandbox setup: {exc}"}).encode() + b"\n")
        except OSError:
            pass
    os._exit(0)


def _read_until_exit(result_r: int, pidfd: int, deadline: float, cap: int = 1 << 16) -> tuple[bytes, bool]:
    """What the sample wrote, until it exited and the pipe drained; (data, True) if the deadline came first."""
    chunks, size, exited, pipe_open = [], 0, False, True
    while pipe_open:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([result_r] + ([] if exited else [pidfd]), [], [], wait if not exited else 0.05)
        if not ready and exited:
            break  # exited; whatever still holds the pipe open is killed by the caller
        if pidfd in ready:
            exited = True
        if result_r in ready:
            chunk = os.read(result_r, 65536)
            if not chunk:
                pipe_open = False
            elif size < cap:
                chunks.append(chunk)
                size += len(chunk)
    return b"".join(chunks), False


def _verdict(request: dict[str, Any], result: bytes, timed_out: bool, code: int | None) -> dict[str, Any]:
    if timed_out:
        return {"status": "timed_out", "message": f"wall-clock timeout of {request['limits']['timeout_s']} s"}
    verdict = None
    for line in result.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (record.get("nonce") == request["nonce"] or record.get("status") == "error"):
            verdict = record
    if verdict is None:
        how = f"killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exit status {code}"
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            how += " (CPU or memory limit)"
        return {"status": "failed", "message": f"the sample ended before the test finished ({how})"}
    return {"status": verdict["status"], "message": verdict.get("message", "")}


def serve() -> None:
    """The fork server's loop: one JSON request per line on stdin, one JSON result per line on stdout."""
    requested, scratch, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    import gc

    gc.freeze()  # the pre-loaded heap joins a permanent generation: no sample's collection touches (copies) it
    reason = "basic isolation was asked for"
    if requested != "basic":
        reason = _enter_zygote_namespaces(scratch, nproc)
    if requested == "namespaces" and reason:
        sys.stdout.write(json.dumps({"error": f"isolation='namespaces' is unavailable: {reason}"}) + "\n")
        sys.stdout.flush()
        return
    namespaces = not reason
    _SNAPSHOT.update(_snapshot())  # once: every sample forks from this state
    if namespaces:
        global _UNPRIVILEGED_MAPPED
        with open("/proc/self/uid_map") as f:
            _UNPRIVILEGED_MAPPED = any(line.split()[0] == str(_INSIDE_UID) for line in f if line.strip())
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if namespaces else -1
    out = sys.stdout.buffer
    out.write(json.dumps({"isolation": "namespaces" if namespaces else "basic", "reason": reason}).encode() + b"\n")
    out.flush()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        out.write(json.dumps(_run_one(request, scratch, namespaces, own_pid_ns)).encode() + b"\n")
        out.flush()


_SAMPLE_IDS = itertools.count()


def _run_one(request: dict[str, Any], scratch: str, namespaces: bool, own_pid_ns: int) -> dict[str, Any]:
    """Fork one sample (PID 1 of a fresh PID namespace when namespaces are on), enforce its deadline, read it."""
    started = time.monotonic()
    limits = request["limits"]
    box = os.path.join(scratch, f"s-{os.getpid()}-{next(_SAMPLE_IDS)}")
    os.mkdir(box, 0o711)
    os.chmod(box, 0o711)  # the sample's unprivileged user must reach its working directory
    work = os.path.join(box, "work")
    os.mkdir(work, 0o777 if namespaces else 0o700)
    out_path = os.path.join(box, "output")
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if not namespaces and os.geteuid() == 0:
        os.chown(work, 65534, 65534)
        os.fchown(out_fd, 65534, 65534)
    result_r, result_w = os.pipe()
    libc = _libc()
    if namespaces:
        _check(libc.unshare(_CLONE_NEWPID), "unshare(pid)")  # the next child is PID 1 of a fresh namespace
    pid = os.fork()
    if pid == 0:
        os.close(result_r)
        for fd in (0, 1):
            os.close(fd)
        _sample_process(request, work, out_fd, result_w, namespaces)
    if namespaces:
        _check(libc.setns(own_pid_ns, _CLONE_NEWPID), "setns(pid)")  # later children: our namespace again
    os.close(result_w)
    os.close(out_fd)
    pidfd = os.pidfd_open(pid)
    try:
        result, timed_out = _read_until_exit(result_r, pidfd, started + limits["timeout_s"])
    finally:
        for kill in (os.kill, os.killpg):  # the sample's namespace, or (basic) its process group
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        os.close(result_r)
    with open(out_path, "rb") as f:
        output = f.read(limits["output_bytes"]).decode(errors="replace")
    shutil.rmtree(box, ignore_errors=True)
    verdict = _verdict(request, result, timed_out, os.waitstatus_to_exitcode(status))
    return {**verdict, "duration_s": round(time.monotonic() - started, 4), "output": output}
