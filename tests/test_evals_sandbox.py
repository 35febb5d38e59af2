"""The execution sandbox: HumanEval's canonical solutions pass and stubs fail; hostile completions are scored as not
passed, the harness and the machine stay unharmed, and each ends within its timeout plus a small margin.

Hostile samples run under three set-ups: the default (namespaces + audit hooks), the kernel's walls alone
(namespaces, no audit hooks), and basic isolation (rlimits + audit hooks, for kernels without user namespaces).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from phi1_ray.evals.problems import load_benchmark
from phi1_ray.evals.run import program
from phi1_ray.evals.sandbox import Limits, Program, Sandbox

TIMEOUT = 2.0
MARGIN = 4.0  # process start-up and scheduling on a loaded 2-core CI machine
SECRET = "phi1-sandbox-secret-" + os.urandom(6).hex()
CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
GOOD = Program("def add(a, b):\n    return a + b\n", CHECK, "add")

SETUPS = {
    "default": {"isolation": "auto", "audit_hooks": True},
    "kernel-only": {"isolation": "namespaces", "audit_hooks": False},
    "basic": {"isolation": "basic", "audit_hooks": True},
}


def _namespaces_available() -> bool:
    try:
        with Sandbox(workers=1, isolation="namespaces"):
            return True
    except RuntimeError:
        return False


@pytest.fixture(scope="module", params=list(SETUPS))
def box(request):
    setup = SETUPS[request.param]
    if setup["isolation"] == "namespaces" and not _namespaces_available():
        pytest.skip("this kernel refuses unprivileged user namespaces")
    os.environ["PHI1_SANDBOX_SECRET"] = SECRET  # planted in the harness's environment
    try:
        sandbox = Sandbox(workers=2, limits=Limits(timeout_s=TIMEOUT), **setup)
    finally:
        del os.environ["PHI1_SANDBOX_SECRET"]
    yield sandbox
    sandbox.close()


@pytest.fixture()
def decoy():
    """A world-writable directory outside the sandbox: only the sandbox's walls protect it."""
    root = Path(tempfile.mkdtemp(prefix="phi1-decoy-"))
    os.chmod(root, 0o777)
    (root / "keep.txt").write_text("precious")
    os.chmod(root / "keep.txt", 0o666)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _hostile(box: Sandbox, body: str, preamble: str = "") -> tuple[str, float]:
    code = f"{preamble}\ndef add(a, b):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    started = time.monotonic()
    result = box.run(Program(code, CHECK, "add"))
    elapsed = time.monotonic() - started
    assert result.status != "passed", result
    assert elapsed < TIMEOUT + MARGIN, f"{elapsed:.1f}s for {result}"
    assert box.run(GOOD).passed, "the harness did not survive"
    return result.status, elapsed


def test_infinite_loop_times_out(box):
    status, elapsed = _hostile(box, "while True:\n    pass")
    assert status == "timed_out" and elapsed >= TIMEOUT - 0.1


def test_ignoring_sigalrm_then_sleeping_times_out(box):
    status, _ = _hostile(box, "signal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(1000)", "import signal, time")
    assert status == "timed_out"


def test_fork_bomb_is_contained(box):
    before = len(os.listdir("/proc"))
    _hostile(box, "while True:\n    os.fork()", "import os")
    time.sleep(0.5)
    assert len(os.listdir("/proc")) < before + 20  # nothing left running


@pytest.mark.parametrize("attack", ["os.system('rm -rf {d}')", "shutil.rmtree('{d}')", "open('{d}/keep.txt', 'w')"])
def test_deleting_outside_the_sandbox_fails(box, decoy, attack):
    _hostile(box, attack.format(d=decoy) + "\nreturn None", "import os, shutil")
    assert (decoy / "keep.txt").read_text() == "precious"


def test_huge_allocation_fails(box):
    _hostile(box, "x = bytearray(100 * 2**30)\nreturn a + b")


def test_stdout_flood_is_capped(box):
    _hostile(box, "for _ in range(1024):\n    sys.stdout.write('x' * 2**20)\nreturn a + b", "import sys")
    result = box.run(Program("import sys\nsys.stdout.write('y' * 10**6)\n", "", None))
    assert len(result.output) <= box.limits.output_bytes


def test_no_network_to_a_local_listener(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    body = f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\nreturn a + b"
    _hostile(box, body, "import socket")
    listener.settimeout(0.2)  # a connection would wait in the backlog, accepted or not
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()


def test_killing_the_parent_leaves_the_harness_alive(box):
    _hostile(box, "os.kill(os.getppid(), 9)\nreturn None", "import os")
    assert box.run_many([GOOD] * 4) and all(r.passed for r in box.run_many([GOOD] * 4))


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
    ],
)
def test_exiting_before_the_assertions_is_a_failure(box, code):
    result = box.run(Program(code, CHECK, "add"))
    assert result.status == "failed", result


def test_patching_the_tests_helpers_is_a_failure(box):
    check = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n"
    before = "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return 0\n"
    during = "import builtins\ndef add(a, b):\n    builtins.abs = lambda x: 0\n    return 0\n"
    check_twice = check + "    assert abs(candidate(1, 1) - 2) < 1e-9\n"
    assert box.run(Program(before, check, "add")).status == "failed"
    result = box.run(Program(during, check_twice, "add"))
    assert result.status == "failed", result


def test_the_harness_environment_is_not_inherited(box):
    body = (
        "found = os.environ.get('PHI1_SANDBOX_SECRET')\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        found = found or (SECRET.encode() in open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except Exception:\n"
        "        pass\n"
        "return a + b if found else None"
    )
    _hostile(box, body, f"import os\nSECRET = {SECRET!r}")


def test_canonical_solutions_pass_and_stubs_fail_reproducibly():
    problems = load_benchmark("humaneval")
    assert len(problems) == 164
    canonical = [program(p, p.canonical_solution) for p in problems]
    stubs = [program(p, "    pass\n") for p in problems]
    with Sandbox(limits=Limits(timeout_s=10.0)) as box:
        first = box.run_many(canonical + stubs)
        second = box.run_many(canonical + stubs)
    failing = [(p.task_id, r.message) for p, r in zip(problems, first[:164]) if not r.passed]
    assert not failing, failing[:5]
    assert all(r.status == "failed" for r in first[164:]), [r for r in first[164:] if r.status != "failed"][:3]
    assert [(r.status, r.message) for r in first] == [(r.status, r.message) for r in second]


def test_standard_library_imports_beyond_the_preloaded_ones(box):
    """Inside namespaces the import path is bound where the unprivileged sample user can read it."""
    if box.isolation != "namespaces":
        pytest.skip("basic isolation as root imports what the fork server pre-loaded, or a world-readable stdlib")
    code = "import queue, fractions, xml.dom.minidom\ndef add(a, b):\n    return int(fractions.Fraction(a) + b)\n"
    result = box.run(Program(code, CHECK, "add"))
    assert result.passed, result


def test_the_fork_server_holds_the_standard_library_only():
    """Every module the fork server holds makes each fork slower: it imports no third-party package (the harness's
    ``Limits``, a pydantic config section, stays on the harness's side)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import phi1_ray.evals.sandbox_server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'numpy', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert Limits(timeout_s=1).model_dump() == {"timeout_s": 1.0, "memory_mb": 1024, "cpu_s": None, "nproc": 32,
                                                "fsize_mb": 16, "output_bytes": 4096}  # fmt: skip
