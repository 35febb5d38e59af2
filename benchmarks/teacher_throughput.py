"""Teacher-call throughput: does the data-generation client keep its configured concurrency busy?

The replay server (phi1_ray.datagen.replay_server) answers every request after a fixed latency, so the ideal rate
at concurrency C is C / latency. Two clients send the same N distinct prompts:

1. ours: ``phi1_ray.datagen.teacher.call_teacher`` inside a Ray Data pipeline (actor pool, reply cache on disk,
   retry bookkeeping), as the generation jobs run it;
2. the usual hand-written client: ``openai.AsyncOpenAI`` with ``asyncio.gather`` under a semaphore of C, in one
   process (no Ray, no cache).

Target (issue 8): ours >= 80% of the ideal rate. Prints one JSON line:
{"benchmark": "teacher_throughput", "ratio": <ours / hand-written>, "fraction_of_ideal": ..., ...}.

    python benchmarks/teacher_throughput.py [--quick] [--concurrency 32] [--latency 0.25] [--requests 6000]

Rates are measured at the server: requests over the span from the first arrival to the last reply, so a client's
start-up (Ray actors, connections) is not counted against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1_ray.datagen.config import TeacherConfig  # noqa: E402
from phi1_ray.datagen.replay_server import ReplayServer, load_replies  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int, salt: str) -> list[str]:
    return [f"Write a section of a Python textbook, item {salt}-{i}." for i in range(n)]


def served_rate(server: ReplayServer, latency: float, since: int) -> float:
    """Requests per second the server saw: from the first request's arrival to the last one's reply (arrival +
    the fixed latency). A client's start-up (Ray actors, connections) is before the first arrival."""
    arrivals = server.arrivals[since:]
    return len(arrivals) / (arrivals[-1] - arrivals[0] + latency)


def ours(server: ReplayServer, items: list[str], concurrency: int, actors: int, cache: str, latency: float) -> float:
    import ray.data

    from phi1_ray.datagen.teacher import call_teacher, teacher_blocks

    cfg = TeacherConfig(base_url=server.base_url, model="replay", concurrency=concurrency, actors=actors,
                        api_key_env=None, max_tokens=64)  # fmt: skip
    blocks = teacher_blocks(len(items), cfg)  # as the generation jobs cut their items
    since = len(server.arrivals)
    ds = call_teacher(ray.data.from_items([{"prompt": p} for p in items], override_num_blocks=blocks), cfg, cache)
    rows = ds.select_columns(["reply", "error"]).take_all()
    assert len(rows) == len(items) and all(r["reply"] and not r["error"] for r in rows), "a request failed"
    return served_rate(server, latency, since)


def hand_written(server: ReplayServer, items: list[str], concurrency: int, latency: float) -> float:
    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=3)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> str:
            async with semaphore:
                out = await client.chat.completions.create(
                    model="replay", messages=[{"role": "user", "content": prompt}], max_tokens=64
                )
                return out.choices[0].message.content

        replies = await asyncio.gather(*(one(p) for p in items))
        await client.close()
        assert all(replies)

    since = len(server.arrivals)
    asyncio.run(run())
    return served_rate(server, latency, since)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.25, help="server-side seconds per request")
    parser.add_argument("--requests", type=int, default=6000)
    args = parser.parse_args()
    n = 2000 if args.quick else args.requests
    ideal = args.concurrency / args.latency
    replies = load_replies(ROOT / "tests/data/teacher_replies.jsonl")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with ReplayServer(replies=replies, latency_s=args.latency) as server, tempfile.TemporaryDirectory() as cache:
        ours_rate = ours(server, prompts(n, "ours"), args.concurrency, args.actors, cache, args.latency)
        ours_in_flight, server.max_in_flight = server.max_in_flight, 0
        theirs_rate = hand_written(server, prompts(n, "plain"), args.concurrency, args.latency)
        theirs_in_flight = server.max_in_flight
    ray.shutdown()
    result = {
        "benchmark": "teacher_throughput",
        "ratio": round(ours_rate / theirs_rate, 3),
        "fraction_of_ideal": round(ours_rate / ideal, 3),
        "ours_req_s": round(ours_rate, 1),
        "hand_written_req_s": round(theirs_rate, 1),
        "ideal_req_s": round(ideal, 1),
        "concurrency": args.concurrency,
        "max_in_flight_ours": ours_in_flight,
        "max_in_flight_hand_written": theirs_in_flight,
        "actors": args.actors,
        "latency_s": args.latency,
        "requests": n,
        "target_fraction": 0.8,
    }
    print(f"ours {ours_rate:.1f} req/s ({ours_rate / ideal:.0%} of the ideal {ideal:.0f}); "
          f"hand-written asyncio client {theirs_rate:.1f} req/s", flush=True)  # fmt: skip
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
