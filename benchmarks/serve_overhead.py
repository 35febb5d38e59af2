"""What Ray Serve adds to generation, and what batching buys, in one run.

1. Latency of a short request (8 new tokens, greedy) in process (the engine called directly) and through the Serve
   app over HTTP (a keep-alive client on 127.0.0.1): p50/p99 of each and the added p50; the same for 1 token
   (prefill only: what is left is transport).
2. Tokens/s of one long request (128 new tokens), in process and through Serve.
3. Throughput through Serve: 16 requests one after the other, then the same 16 from 16 concurrent clients.

Ingress (``--ingress``): ``haproxy`` (default) runs Ray with ``RAY_SERVE_ENABLE_HA_PROXY=1``, Serve's
high-throughput mode, where HAProxy on the HTTP port forwards straight to the replica's own HTTP server (what the
cluster files in cluster/ enable); ``proxy`` is Serve's default Python proxy (one more hop: proxy actor -> replica).

Targets (issue 6): added p50 under 10 ms; 16-client throughput >= 3x sequential.
Prints one JSON line: {"benchmark": "serve_overhead", "ratio": <16-client over sequential>, ...}.

    python benchmarks/serve_overhead.py [--quick] [--layers 4] [--ingress haproxy|proxy]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from phi1_ray.checkpoint import save_checkpoint  # noqa: E402
from phi1_ray.config import SamplingConfig
from phi1_ray.data.config import SourceConfig
from phi1_ray.model import (
    ModelConfig,
    Phi1ForCausalLM,  # noqa: E402
)
from phi1_ray.serving.engine import InferenceEngine  # noqa: E402
from phi1_ray.tokenizer import train_from_sources  # noqa: E402

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def complete(self, max_tokens: int) -> dict:
        body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
        self.conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        answer = json.loads(data)
        if answer["usage"]["completion_tokens"] != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {answer['usage']['completion_tokens']}")
        return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (well under a minute)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tiny model served")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy")
    args = parser.parse_args()
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.ingress == "haproxy" else "0"  # before Ray starts
    # A replica behind HAProxy keeps answering for 30 s once told to stop (for load balancers to notice); nothing
    # balances here, so the benchmark does not wait for it.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    for variable in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):  # off 8404/9101: another
        os.environ.setdefault(variable, str(free_port()))  # Serve with HAProxy on this machine may hold them
    short_n = 30 if args.quick else 200
    long_tokens, burst_tokens = 128, 48 if args.quick else 96

    import ray
    from ray import serve

    from phi1_ray.serving.app import app_builder

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_from_sources([SourceConfig(type="stdlib", max_bytes=400_000)], 1024, Path(tmp) / "tok")
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("tiny", n_layer=args.layers, vocab_size=1024, eos_token_id=0, bos_token_id=0)
        model = Phi1ForCausalLM(cfg).eval()
        with torch.no_grad():  # a random model can pick EOS early (on GPU in fp16 it does): every request is
            model.lm_head.bias[cfg.eos_token_id] = -1e4  # then exactly as long as asked, in process and served
        checkpoint = save_checkpoint(model, Path(tmp) / "bench-model", tokenizer)

        # -- in process ----------------------------------------------------------------------------------------
        torch.set_num_threads(1)  # as in the replica (Ray gives an actor with num_cpus=1 one OpenMP thread)
        engine = InferenceEngine.from_checkpoint(checkpoint, max_batch_size=args.clients)
        short = SamplingConfig(max_new_tokens=8, temperature=0.0)
        # Warm-up at every size timed below (a long sequence, a full batch): the first pass through new shapes
        # is slow on a GPU (allocations; on a 1x H200 a cold 128-token request ran at 21 tokens/s).
        for _ in range(5):
            engine.generate(PROMPT, short)
        engine.generate(PROMPT, SamplingConfig(max_new_tokens=long_tokens))
        engine.generate([PROMPT] * args.clients, SamplingConfig(max_new_tokens=burst_tokens))
        local_ms, local_one_ms = [], []
        for _ in range(short_n):
            start = time.perf_counter()
            engine.generate(PROMPT, short)
            local_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            engine.generate(PROMPT, SamplingConfig(max_new_tokens=1))
            local_one_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        produced = len(engine.generate(PROMPT, SamplingConfig(max_new_tokens=long_tokens))[0].token_ids)
        assert produced == long_tokens, produced
        local_tps = produced / (time.perf_counter() - start)
        engine.close()

        # -- through Serve --------------------------------------------------------------------------------------
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"checkpoint": str(checkpoint), "num_replicas": 1, "max_ongoing_requests": 64,
                           "max_batch_size": args.clients})  # fmt: skip
        serve.run(app, name="bench", route_prefix="/")
        try:
            client = Client(port)
            for _ in range(5):
                client.complete(8)
            client.complete(long_tokens)
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda _: Client(port).complete(burst_tokens), range(args.clients)))
            health_ms = []
            for _ in range(short_n):
                start = time.perf_counter()
                client.conn.request("GET", "/health")
                client.conn.getresponse().read()
                health_ms.append((time.perf_counter() - start) * 1000)
            served_ms, served_one_ms = [], []
            for _ in range(short_n):
                start = time.perf_counter()
                client.complete(8)
                served_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                client.complete(1)
                served_one_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            answer = client.complete(long_tokens)
            served_tps = answer["usage"]["completion_tokens"] / (time.perf_counter() - start)

            start = time.perf_counter()
            seq_tokens = sum(client.complete(burst_tokens)["usage"]["completion_tokens"] for _ in range(args.clients))
            sequential_s = time.perf_counter() - start
            clients = [Client(port) for _ in range(args.clients)]
            with ThreadPoolExecutor(args.clients) as pool:
                start = time.perf_counter()
                answers = list(pool.map(lambda c: c.complete(burst_tokens), clients))
                concurrent_s = time.perf_counter() - start
            par_tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        finally:
            serve.shutdown()
            ray.shutdown()

    sequential_tps, concurrent_tps = seq_tokens / sequential_s, par_tokens / concurrent_s
    added_p50 = statistics.median(served_ms) - statistics.median(local_ms)
    result = {
        "benchmark": "serve_overhead",
        "ratio": round(concurrent_tps / sequential_tps, 2),
        "added_p50_ms": round(added_p50, 2),
        "added_p50_ms_1_token": round(statistics.median(served_one_ms) - statistics.median(local_one_ms), 2),
        "in_process_p50_ms": round(statistics.median(local_ms), 2),
        "in_process_p99_ms": round(percentile(local_ms, 0.99), 2),
        "serve_p50_ms": round(statistics.median(served_ms), 2),
        "serve_p99_ms": round(percentile(served_ms, 0.99), 2),
        "serve_health_round_trip_p50_ms": round(statistics.median(health_ms), 2),
        "in_process_tokens_per_s": round(local_tps, 1),
        "serve_tokens_per_s": round(served_tps, 1),
        "sequential_tokens_per_s": round(sequential_tps, 1),
        "concurrent_tokens_per_s": round(concurrent_tps, 1),
        "ingress": args.ingress,
        "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1",
        "clients": args.clients,
        "short_requests": short_n,
        "layers": args.layers,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "quick": args.quick,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
