"""Serving: the engine without Ray, then the Serve app on this module's local Ray instance behind HAProxy (the
ingress the cluster files enable), driven over real HTTP by the official ``openai`` client; ``serve run`` in both
of its forms through a subprocess, on Serve's default Python proxy (a laptop's ``serve run``)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from phi1_ray.checkpoint import load_model, save_checkpoint
from phi1_ray.config import SamplingConfig
from phi1_ray.generate import generate
from phi1_ray.serving.app import HAPROXY_ENV
from phi1_ray.serving.engine import InferenceEngine
from tests.conftest import ROOT, free_port, free_ports, random_model, start_local_ray

PROMPTS = ["def add(a, b):\n", "import os\n\nclass Walker:\n    def", "for i in range(10):\n", "x = {'a': 1}\nprint("]


def _listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1/0.0.0.0:``port`` (from /proc: Linux only)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    sockets.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:  # closed meanwhile
                continue
    return ""


@pytest.fixture(scope="module")
def ray_local():
    """This module's Ray instance runs Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1`` in the Ray
    processes' environment, as cluster/ sets it): HAProxy on the HTTP port forwards to the replica's own HTTP
    server. Its stats and metrics ports are moved off their defaults (8404, 9101) to free ones, and replicas drain
    for 1 s instead of 30 when an app is deleted (nothing balances load here)."""
    import ray

    stats, metrics = free_ports(2)
    start_local_ray({HAPROXY_ENV: "1", "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                     "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
                     "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("serve") / "tiny-served"
    save_checkpoint(random_model(seed=3), out, tokenizer)
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The foundation's in-process generation on the same checkpoint."""
    model, tokenizer = load_model(checkpoint)
    return lambda prompt, params: generate(model, tokenizer, [prompt], params)[0]


@pytest.fixture(scope="module")
def served(ray_local, checkpoint):
    from ray import serve

    from phi1_ray.serving.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"checkpoint": str(checkpoint), "num_replicas": 1}), name="phi1", route_prefix="/")
    assert _listener(port) == "haproxy"  # every request of this module goes through HAProxy, none via Serve's proxy
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(url: str, body: object, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text or b"{}")
        except ValueError:  # Serve's own 503 on back-pressure is plain text
            return exc.code, {"text": text.decode(errors="replace")}


def _stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as response:
        return json.loads(response.read())


# -- the engine, no Ray ----------------------------------------------------------------------------------------


def test_engine_batches_concurrent_requests_and_matches_in_process_generation(checkpoint, reference):
    engine = InferenceEngine.from_checkpoint(checkpoint, max_batch_size=8)
    try:
        greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
        assert [c.text for c in engine.generate(PROMPTS, greedy)] == [reference(p, greedy).text for p in PROMPTS]
        sampled = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=11)
        assert engine.generate(PROMPTS[0], sampled)[0].text == reference(PROMPTS[0], sampled).text
        stop = SamplingConfig(max_new_tokens=24, temperature=0.0, stop=["\n", "e"])
        assert engine.generate(PROMPTS[1], stop)[0] == reference(PROMPTS[1], stop)

        results: dict[int, str] = {}

        def ask(i: int) -> None:
            results[i] = engine.generate(PROMPTS[i % 4], greedy)[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(12)] == [reference(PROMPTS[i % 4], greedy).text for i in range(12)]
        assert engine.stats.max_batch > 1 and engine.stats.finished == 15
        # 12 requests on 8 slots: the rest waited, none was lost; slots all free again
        assert sorted(engine.free_slots) == list(range(8))
        with pytest.raises(Exception, match="context"):
            engine.submit("x" * 10, SamplingConfig(max_new_tokens=engine.context))
    finally:
        engine.close()


# -- the Serve app ---------------------------------------------------------------------------------------------


def test_openai_client_plain_streaming_n_and_stop(served, reference):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-served"]
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    plain = client.completions.create(model="tiny-served", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    expected = reference(PROMPTS[0], greedy)
    assert plain.choices[0].text == expected.text and plain.choices[0].finish_reason == expected.finish_reason
    assert plain.usage.completion_tokens == len(expected.token_ids) and plain.usage.prompt_tokens > 0

    chunks = list(client.completions.create(model="tiny-served", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stream=True))  # fmt: skip
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{served}/v1/completions",
            data=json.dumps({"prompt": "def", "max_tokens": 4, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        ),  # fmt: skip
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.read().decode().split("\n\n") if f]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)

    many = client.completions.create(model="tiny-served", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, n=3,
                                     seed=5)  # fmt: skip
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and len({c.text for c in many.choices}) > 1
    again = client.completions.create(model="tiny-served", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, n=3,
                                      seed=5)  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in many.choices]

    full = reference(PROMPTS[1], SamplingConfig(max_new_tokens=24, temperature=0.0)).text
    cut = next(i for i in range(3, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    stops = [full[cut : cut + 2], "never-generated"]
    stopped = client.completions.create(model="tiny-served", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                        stop=stops)  # fmt: skip
    assert stopped.choices[0].text == full[: full.index(stops[0])] and stopped.choices[0].finish_reason == "stop"
    two = client.completions.create(model="tiny-served", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.text for c in two.choices] == [reference(p, SamplingConfig(max_new_tokens=8)).text for p in PROMPTS[:2]]


def test_sixteen_concurrent_requests_succeed_and_share_forward_passes(served, reference):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    before = _stats(served)

    def ask(i: int) -> str:
        r = client.completions.create(model="tiny-served", prompt=PROMPTS[i % 4], max_tokens=32, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, range(16)))
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    assert texts == [reference(PROMPTS[i % 4], greedy).text for i in range(16)]
    after = _stats(served)
    assert after["finished"] - before["finished"] == 16
    batched = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(size for size, steps in batched.items() if steps > 0) > 1, after


def test_invalid_parameters_get_400_naming_them_and_the_replica_stays_healthy(served):
    url = f"{served}/v1/completions"
    good = {"model": "tiny-served", "prompt": "def f():", "max_tokens": 4}
    cases = {
        "max_tokens": [{"max_tokens": 0}, {"max_tokens": 5000}, {"max_tokens": "8"}],
        "temperature": [{"temperature": -0.1}, {"temperature": 2.5}],
        "top_p": [{"top_p": 0}, {"top_p": 1.5}],
        "n": [{"n": 0}, {"n": 100}],
        "prompt": [{"prompt": ""}, {"prompt": 42}, {"prompt": []}],
        "stop": [{"stop": ["a", "b", "c", "d", "e"]}, {"stop": 3}],
        "stream": [{"stream": "yes"}],
        "seed": [{"seed": -1}],
        "frobnicate": [{"frobnicate": 1}],
        "logprobs": [{"logprobs": 5}],
    }
    for param, bodies in cases.items():
        for extra in bodies:
            status, body = _post(url, {**good, **extra})
            assert status == 400, (extra, status, body)
            assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error", body
    # the prompt plus max_tokens past the context
    status, body = _post(url, {**good, "prompt": "def f(): pass\n" * 200, "max_tokens": 2000})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "context" in body["error"]["message"]
    status, body = _post(url, None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = _post(url, None, raw=json.dumps({**good, "prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and "limit" in body["error"]["message"]
    status, body = _post(url, {**good, "model": "gpt-4"})
    assert status == 404 and body["error"]["param"] == "model"
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-served", prompt="x", max_tokens=4, temperature=3)
    assert caught.value.body["param"] == "temperature"
    assert client.completions.create(model="tiny-served", prompt="def f():", max_tokens=4).choices[0].text
    with urllib.request.urlopen(f"{served}/health", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_client_disconnect_mid_stream_stops_its_generation(served):
    before = _stats(served)
    host, port = served.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": "def f():", "max_tokens": 2000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 30
    while _stats(served)["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, "the stream's generation was not cancelled"
        time.sleep(0.2)
    generated = _stats(served)["generated_tokens"] - before["generated_tokens"]
    assert generated < 1500, generated  # stopped well before its 2000 tokens
    time.sleep(1.0)
    assert _stats(served)["generated_tokens"] - before["generated_tokens"] == generated  # and stays stopped


def test_api_key_and_overload_answer_401_and_quick_503(ray_local, checkpoint, monkeypatch):
    from ray import serve

    from phi1_ray.serving.app import app_builder

    monkeypatch.setenv("PHI1_TEST_KEY", "s3cret")
    app = app_builder({"checkpoint": str(checkpoint), "num_replicas": 1, "api_key_env": "PHI1_TEST_KEY",
                       "max_ongoing_requests": 1, "max_queued_requests": 1})  # fmt: skip
    serve.run(app, name="guarded", route_prefix="/guarded")
    try:
        port = serve.context._get_global_client().http_config.port
        root = f"http://127.0.0.1:{port}/guarded"
        good = {"prompt": "def f():", "max_tokens": 4}
        assert _post(f"{root}/v1/completions", good)[0] == 401
        status, body = _post(f"{root}/v1/completions", good, {"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert _post(f"{root}/v1/completions", good, {"Authorization": "Bearer s3cret"})[0] == 200
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "tiny-served"
        with urllib.request.urlopen(f"{root}/health", timeout=30) as response:  # health needs no key
            assert response.status == 200

        # one request running, one queued: the rest are turned away at once
        slow = {"prompt": "def f():", "max_tokens": 300, "temperature": 0}

        def timed(_: int) -> tuple[int, float]:
            start = time.perf_counter()
            status, _body = _post(f"{root}/v1/completions", slow, {"Authorization": "Bearer s3cret"})
            return status, time.perf_counter() - start

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(timed, range(8)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) >= 1 and statuses.count(503) >= 4, results
        slowest_ok = max(t for s, t in results if s == 200)
        assert all(t < slowest_ok / 2 for s, t in results if s == 503), results
    finally:
        serve.delete("guarded")


# -- `serve run`, as users type it -------------------------------------------------------------------------------


def _serve_run(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)  # a fresh local instance, as on a user's machine
    env.pop(HAPROXY_ENV, None)  # with Serve's default proxy
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> str:
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts the app and its Ray down
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def _wait_answer(proc: subprocess.Popen, port: int, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve run exited: {proc.stdout.read()[-4000:]}")
        status, body = _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "def f():", "max_tokens": 4}) \
            if _port_open(port) else (0, {})  # fmt: skip
        if status == 200:
            return body
        time.sleep(1)
    raise AssertionError("serve run did not answer in time")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_app_argument_errors_name_the_valid_keys():
    from phi1_ray.errors import ConfigError
    from phi1_ray.serving.app import AppArgs, parse_args

    with pytest.raises(ConfigError) as exc:
        parse_args({"replicas": "2", "max_batch_size": "0"})
    message = str(exc.value)
    assert "replicas: unknown key (did you mean 'num_replicas'?)" in message
    assert "valid keys: " + ", ".join(sorted(AppArgs.model_fields)) in message
    assert "max_batch_size: Input should be greater than or equal to 1 (got '0')" in message


def test_serve_run_builder_and_config_file_start_and_answer(checkpoint):
    if _port_open(8000):
        pytest.skip("port 8000, which `serve run` uses, is taken on this machine")
    missing = _serve_run(["serve_apps.phi1:app"], {"PHI1_CHECKPOINT": str(checkpoint.parent / "nothing-here")})
    out = missing.stdout.read() if _exited(missing, 120) else _stop(missing)
    assert "no checkpoint to serve" in out and "make demo" in out and "checkpoint=DIR" in out, out[-3000:]

    builder = _serve_run(["serve_apps.phi1:app_builder", f"checkpoint={checkpoint}", "num_replicas=1"], {})
    try:
        answer = _wait_answer(builder, 8000)
        assert answer["model"] == "tiny-served" and answer["usage"]["completion_tokens"] == 4
    finally:
        _stop(builder)

    config = _serve_run(["serve_apps/phi1.yaml"], {"PHI1_CHECKPOINT": str(checkpoint)})
    try:
        answer = _wait_answer(config, 8000)
        assert answer["model"] == "tiny-served" and answer["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        _stop(config)


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_app_arguments_are_typed_and_bad_ones_are_named(checkpoint, monkeypatch):
    from phi1_ray.errors import ConfigError
    from phi1_ray.serving.app import deployment_options, parse_args, resolve_checkpoint

    args = parse_args({"checkpoint": str(checkpoint), "num_replicas": "2", "num_gpus": "1", "max_queued_requests": "8"})
    assert args.num_replicas == 2 and args.num_gpus == 1.0  # `serve run ... key=value` passes strings
    options = deployment_options(args)
    assert options["num_replicas"] == 2 and options["max_queued_requests"] == 8
    assert options["ray_actor_options"]["num_gpus"] == 1.0
    # the default `auto`: one GPU per replica where the Ray cluster (here: this machine, no Ray) has GPUs, else none
    assert parse_args({}).num_gpus == "auto"
    assert deployment_options(parse_args({}))["ray_actor_options"]["num_gpus"] == float(torch.cuda.is_available())
    scaled = deployment_options(parse_args({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6}))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6.0}
    for bad, named in (
        ({"num_replicas": 0}, "num_replicas"),
        ({"dtype": "int8"}, "dtype"),
        ({"replicas": 2}, "replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"num_gpus": "some"}, "num_gpus"),
    ):
        with pytest.raises(ConfigError, match=named):
            parse_args(bad)
    monkeypatch.setenv("PHI1_CHECKPOINT", str(checkpoint))
    assert resolve_checkpoint(None) == str(checkpoint.resolve())
    with pytest.raises(ConfigError, match="make demo"):
        resolve_checkpoint(str(checkpoint / "missing"))
