"""The data pipeline on a real local Ray instance: exactness, parity with Hugging Face datasets, bad input,
finetuning masks, splits, weights, streaming into a 2-worker TorchTrainer, and the prepare_data contract."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.data.pack import Packer, table_to_blocks
from phi1_ray.data.read import stdlib_root
from phi1_ray.errors import ConfigError, DataError
from phi1_ray.tokenizer import check_vocab
from tests.conftest import assert_user_error, run_job

SEQ = 63  # blocks of 64 tokens


def stdlib_sources(count: int, skip: int = 0) -> list[str]:
    """Real Python source: modules of the standard library."""
    files = sorted(Path(stdlib_root()).glob("*.py"))[skip : skip + count]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def expected_stream(tokenizer, docs: list[str]) -> list[int]:
    """The paper's stream by the reference tokenizer call: tok(doc1) + [EOS] + tok(doc2) + [EOS] + ..."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return out


def read_blocks(out: Path, split: str = "train", column: str = "tokens") -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / s["file"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate([table_to_blocks(t, column) for t in tables]) if tables else np.empty((0, SEQ + 1))


def run_prepare(tmp_path: Path, tokenizer, sources, name: str = "out", **overrides):
    from phi1_ray.data.ray_pipeline import prepare

    fields = {"docs_per_batch": 5, "bytes_per_read_task": 30_000, **overrides}
    cfg = DataConfig(sources=sources, tokenizer=str(tokenizer.name_or_path), seq_len=SEQ, **fields)
    return prepare(cfg, tmp_path / name, log=lambda msg: None), tmp_path / name


# --- plain functions -------------------------------------------------------------------------------


def test_packer_carries_the_remainder_across_batches():
    packer = Packer(block_len=4, dtype=np.dtype(np.uint16), doc_starts=True)
    first = packer.push(np.arange(1, 7, dtype=np.uint16), np.array([2, 4]))
    second = packer.push(np.arange(7, 12, dtype=np.uint16), np.array([5]))
    assert first["tokens"].tolist() == [[1, 2, 3, 4]]
    assert second["tokens"].tolist() == [[5, 6, 7, 8]]
    assert [s.tolist() for s in first["doc_starts"]] == [[0, 2]]
    assert [s.tolist() for s in second["doc_starts"]] == [[2]]
    assert packer.dropped_tokens == 3 and packer.tokens_in == 11 and packer.blocks_out == 2


def test_tokenizer_round_trips_python_source(tokenizer):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    source = (
        "class Café:\n\tdef f(self):\n\t\treturn '日本語 ✓ 🐍'\r\n"
        + " " * 40
        + "x = 1  # trailing   \n\n\n"
        + "\t \t mixed = [1,\n"
        + " " * 8
        + "2]\n"
    )
    ids = reloaded.encode(source, add_special_tokens=False)
    assert reloaded.decode(ids) == source
    assert len(reloaded.encode(" " * 8, add_special_tokens=False)) == 1  # indentation costs one token
    assert reloaded.convert_ids_to_tokens(reloaded.eos_token_id) == "<|endoftext|>"
    for text in stdlib_sources(5):
        assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text


def test_tokenizer_larger_than_the_model_vocab(tokenizer):
    with pytest.raises(ConfigError, match="tokenizer has 512 tokens but model.vocab_size is 300"):
        check_vocab(tokenizer, 300)


# --- Ray Data ---------------------------------------------------------------------------------------


def test_blocks_are_the_exact_stream_in_order(ray_local, tmp_path, tokenizer):
    docs_a, docs_b, tree = stdlib_sources(12), stdlib_sources(9, skip=12), stdlib_sources(4, skip=21)
    write_jsonl(tmp_path / "a.jsonl", docs_a)
    write_jsonl(tmp_path / "b.jsonl", docs_b)
    (tmp_path / "tree" / "pkg").mkdir(parents=True)
    for i, text in enumerate(tree):
        (tmp_path / "tree" / "pkg" / f"m{i}.py").write_text(text)
    sources = [
        SourceConfig(type="jsonl", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]),
        SourceConfig(type="files", paths=[str(tmp_path / "tree")]),
    ]
    manifest, out = run_prepare(tmp_path, tokenizer, sources)

    stream = expected_stream(tokenizer, docs_a + docs_b + tree)
    blocks = read_blocks(out)
    assert blocks.dtype == np.uint16 and blocks.shape[1] == SEQ + 1
    assert len(blocks) == len(stream) // (SEQ + 1) > 20
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert manifest["dropped_tokens"] == len(stream) - blocks.size < SEQ + 1
    assert manifest["documents"] == len(docs_a) + len(docs_b) + len(tree)
    assert manifest["tokens"] == len(stream) and manifest["blocks"] == len(blocks)
    assert sum(s["blocks"] for s in manifest["splits"]["train"]["shards"]) == manifest["blocks"]
    assert manifest["quarantined"] == 0 and (out / "quarantine.jsonl").read_text() == ""


def test_same_blocks_as_hugging_face_datasets(ray_local, tmp_path, tokenizer):
    from datasets import load_dataset

    docs = stdlib_sources(30, skip=40)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    _, out = run_prepare(tmp_path, tokenizer, [SourceConfig(type="jsonl", paths=[str(corpus)])])
    ours = read_blocks(out)

    eos, block = tokenizer.eos_token_id, SEQ + 1
    ds = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(tmp_path / "hf"))
    ds = ds.map(
        lambda b: {"input_ids": [x + [eos] for x in tokenizer(b["text"])["input_ids"]]},
        batched=True,
        remove_columns=["text"],
    )

    def group_texts(examples):  # run_clm's recipe
        ids = [t for x in examples["input_ids"] for t in x]
        n = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, n, block)]}

    whole = ds.map(group_texts, batched=True, batch_size=None)  # the whole corpus as one batch
    theirs = np.array(whole["input_ids"], dtype=np.uint16)
    assert ours.tobytes() == theirs.tobytes()

    per_batch = ds.map(group_texts, batched=True, batch_size=4)  # a remainder dropped in every batch
    assert ours.size > len(per_batch) * block


def test_bad_input_is_quarantined_and_the_job_goes_on(ray_local, tmp_path, tokenizer):
    good_a, good_b = stdlib_sources(2, skip=60)
    huge = (stdlib_sources(1, skip=62)[0] * 200)[: 5 * 1024 * 1024]
    lines = [
        json.dumps({"text": good_a}).encode(),
        b'{"text": "def truncated(',
        b'{"text": "caf\xe9 = 1"}',
        json.dumps({"text": "   \n\t "}).encode(),
        json.dumps({"content": "no text column"}).encode(),
        json.dumps({"text": huge}).encode(),
        json.dumps({"text": good_b}).encode(),
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    sources = [SourceConfig(type="jsonl", paths=[str(tmp_path / "bad.jsonl"), str(tmp_path / "empty.jsonl")])]

    manifest, out = run_prepare(tmp_path, tokenizer, sources, docs_per_batch=2)
    kept = [good_a, "caf\ufffd = 1", huge, good_b]
    stream = expected_stream(tokenizer, kept)
    assert read_blocks(out).reshape(-1).tolist() == stream[: len(stream) // (SEQ + 1) * (SEQ + 1)]
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(Path(q["path"]).name, q["line"]) for q in quarantine] == [("bad.jsonl", 2), ("bad.jsonl", 5)]
    assert "malformed JSON" in quarantine[0]["reason"] and "'text' is missing" in quarantine[1]["reason"]
    assert manifest["quarantined"] == 2 and manifest["empty_documents"] == 1
    assert manifest["invalid_utf8_replaced"] == 1 and manifest["documents"] == 4

    manifest, out = run_prepare(tmp_path, tokenizer, sources, name="drop", invalid_utf8="drop")
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["line"] for q in quarantine] == [2, 3, 5] and "invalid UTF-8" in quarantine[1]["reason"]
    assert manifest["documents"] == 3

    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        run_prepare(tmp_path, tokenizer, sources, name="strict", strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_parquet_sources_weights_and_missing_columns(ray_local, tmp_path, tokenizer):
    docs = stdlib_sources(6, skip=70)
    pq.write_table(pa.table({"content": docs[:3] + [None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", docs[3:])
    sources = [
        SourceConfig(
            type="parquet",
            paths=[str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")],
            text_key="content",
            weight=2.0,
        ),
        SourceConfig(type="jsonl", paths=[str(tmp_path / "c.jsonl")]),
    ]
    manifest, out = run_prepare(tmp_path, tokenizer, sources)
    doubled = [d for d in docs[:3] for _ in range(2)]
    stream = expected_stream(tokenizer, doubled + docs[3:])
    assert read_blocks(out).reshape(-1).tolist() == stream[: len(stream) // (SEQ + 1) * (SEQ + 1)]
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(Path(q["path"]).name, q["line"]) for q in quarantine] == [("a.parquet", 4), ("b.parquet", 0)]
    assert "no column 'content'" in quarantine[1]["reason"]

    many = write_jsonl(tmp_path / "many.jsonl", [f"x_{i} = {i}\n" for i in range(400)])
    half, _ = run_prepare(tmp_path, tokenizer, [SourceConfig(type="jsonl", paths=[str(many)], weight=0.5)], "half")
    assert 150 < half["documents"] < 250


def test_validation_split_is_held_out_and_seeded(ray_local, tmp_path, tokenizer):
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(300)]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    sources = [SourceConfig(type="jsonl", paths=[str(corpus)])]
    first, out = run_prepare(tmp_path, tokenizer, sources, val_fraction=0.2)
    second, _ = run_prepare(tmp_path, tokenizer, sources, name="again", val_fraction=0.2)
    train, val = first["splits"]["train"], first["splits"]["val"]
    assert train["documents"] + val["documents"] == 300 and 30 < val["documents"] < 90
    assert first["splits"] == second["splits"]
    train_blocks, val_blocks = read_blocks(out, "train"), read_blocks(out, "val")
    assert len(val_blocks) == val["blocks"] > 0
    assert not {r.tobytes() for r in train_blocks} & {r.tobytes() for r in val_blocks}


def test_seeded_shuffle_and_epochs(ray_local, tmp_path, tokenizer):
    from phi1_ray.data.ray_pipeline import prepared_dataset

    corpus = write_jsonl(tmp_path / "c.jsonl", stdlib_sources(8, skip=100))
    write_jsonl(tmp_path / "d.jsonl", stdlib_sources(8, skip=108))
    sources = [SourceConfig(type="jsonl", paths=[str(corpus), str(tmp_path / "d.jsonl")])]
    plain, out = run_prepare(tmp_path, tokenizer, sources)
    first, a = run_prepare(tmp_path, tokenizer, sources, name="a", shuffle=True, seed=1)
    again, b = run_prepare(tmp_path, tokenizer, sources, name="b", shuffle=True, seed=1)
    assert first["tokens"] == again["tokens"] == plain["tokens"]
    assert read_blocks(a).tobytes() == read_blocks(b).tobytes() != read_blocks(out).tobytes()

    def rows(ds):
        return [np.asarray(r["tokens"], dtype=np.uint16).tobytes() for r in ds.take_all()]

    stored = [r.tobytes() for r in read_blocks(out)]
    assert rows(prepared_dataset(out)) == stored
    epoch0, epoch1 = (
        rows(prepared_dataset(out, shuffle=True, seed=3)),
        rows(prepared_dataset(out, shuffle=True, seed=3, epoch=1)),
    )
    assert epoch0 == rows(prepared_dataset(out, shuffle=True, seed=3))
    assert epoch0 != epoch1 != stored and sorted(epoch0) == sorted(epoch1) == sorted(stored)


def test_finetune_records_with_completion_loss_mask(ray_local, tmp_path, tokenizer):
    records = [
        {"prompt": f'def add_{i}(a, b):\n    """Add {i} to a + b."""\n', "completion": f"    return a + b + {i}\n"}
        for i in range(40)
    ]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sources = [SourceConfig(type="jsonl", paths=[str(tmp_path / "ex.jsonl")])]
    _, out = run_prepare(tmp_path, tokenizer, sources, format="finetune", loss_on="completion", doc_boundaries=True)
    tokens, mask = [], []
    starts, position = [], 0
    for r in records:
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        starts.append(position)
        position += len(p) + len(c)
        tokens += p + c
        mask += [0] * len(p) + [1] * len(c)
    blocks, masks = read_blocks(out), read_blocks(out, column="loss_mask")
    assert blocks.reshape(-1).tolist() == tokens[: blocks.size]
    assert masks.reshape(-1).tolist() == mask[: blocks.size]
    doc_starts = [
        s
        for t in [pq.read_table(f) for f in sorted(out.glob("train-*.parquet"))]
        for s in t.column("doc_starts").to_pylist()
    ]
    flat = [b * (SEQ + 1) + s for b, row in enumerate(doc_starts) for s in row]
    assert flat == [s for s in starts if s < blocks.size]


def test_streaming_into_a_two_worker_trainer(ray_local, tmp_path, tokenizer):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from phi1_ray.data.ray_pipeline import blocks_dataset, ingest_config

    corpus = write_jsonl(tmp_path / "c.jsonl", stdlib_sources(10, skip=80))
    cfg = DataConfig(
        sources=[SourceConfig(type="jsonl", paths=[str(corpus)])],
        tokenizer=tokenizer.name_or_path,
        seq_len=SEQ,
        docs_per_batch=3,
        rows_per_ray_block=32,
    )
    every = [np.asarray(row["tokens"], dtype=np.uint16).tobytes() for row in blocks_dataset(cfg).take_all()]

    def loop(config):
        import ray.train

        from phi1_ray.data.ray_pipeline import tokens_tensor

        seen = []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4, batch_format="pyarrow"):
            seen += tokens_tensor(batch).tolist()
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": blocks_dataset(cfg)},
        dataset_config=ingest_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="stream"),
    )
    trainer.fit()
    shards = [
        [np.array(r, dtype=np.uint16).tobytes() for r in json.loads((tmp_path / f"rank{i}.json").read_text())]
        for i in range(2)
    ]
    assert shards[0] and shards[1]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(every)


def test_prepare_data_command_line_contract(tmp_path, tokenizer):
    docs = stdlib_sources(6, skip=90)
    write_jsonl(tmp_path / "a.jsonl", docs[:4])
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "m.py").write_text(docs[4])
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"oops"\n')
    result = run_job(
        "jobs/prepare_data.py",
        "--input",
        str(tmp_path / "a.jsonl"),
        "--input",
        str(tmp_path / "tree"),
        "--input",
        str(tmp_path / "bad.jsonl"),
        "--tokenizer",
        str(tokenizer.name_or_path),
        "--seq-len",
        "31",
        "--out",
        str(tmp_path / "out"),
        "ray.num_cpus=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("documents", "tokens", "blocks", "dropped_tokens", "quarantined"):
        assert key in manifest
    assert manifest["documents"] == 6 and manifest["quarantined"] == 1
    table = pq.read_table(out / manifest["splits"]["train"]["shards"][0]["file"])
    assert pa.types.is_list(table.schema.field("tokens").type) and len(table.column("tokens")[0]) == 32
    stream = expected_stream(tokenizer, docs[:5] + ["x"])
    blocks = np.concatenate(
        [table_to_blocks(pq.read_table(out / s["file"])) for s in manifest["splits"]["train"]["shards"]]
    )
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert json.loads((out / "quarantine.jsonl").read_text())["line"] == 2

    missing = run_job(
        "jobs/prepare_data.py",
        "--input",
        str(tmp_path / "nope.jsonl"),
        "--tokenizer",
        str(tokenizer.name_or_path),
        "--seq-len",
        "31",
        "--out",
        str(tmp_path / "out2"),
    )
    assert_user_error(missing, "nope.jsonl does not exist")
    assert not (tmp_path / "out2").exists()
    untokenized = run_job("jobs/prepare_data.py", "--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o3"))
    assert_user_error(untokenized, "data.tokenizer is not set")
    bad_key = run_job("jobs/prepare_data.py", "--input", str(tmp_path / "a.jsonl"), "data.seq_lenn=5")
    assert_user_error(bad_key, "data.seq_lenn: unknown key (did you mean 'seq_len'?)")


def test_train_tokenizer_job(tmp_path):
    result = run_job(
        "jobs/train_tokenizer.py",
        "--config",
        "configs/tokenizer/offline.yaml",
        "--run-dir",
        str(tmp_path),
        "tokenizer.vocab_size=600",
        "tokenizer.sources=[{type: stdlib, max_bytes: 200000}]",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tok) == 600 and tok.eos_token == "<|endoftext|>"


def test_exercises_mined_from_code_split_at_the_docstring():
    from phi1_ray.data.exercises import mine_exercises

    source = '''import os


def add(a, b):
    """Return a + b."""
    return a + b


def todo(x):
    """Not written yet."""
    pass


def no_doc(x):
    return x


class K:
    def method(self):
        """Methods need their class; skipped."""
        return 1


async def fetch(
    url: str,
) -> bytes:
    """Fetch a URL.

    Returns the body.
    """
    # the body starts here
    return await get(url)
'''
    found = list(mine_exercises(source))
    assert [(e.line, e.prompt, e.completion) for e in found] == [
        (4, 'def add(a, b):\n    """Return a + b."""\n', "    return a + b\n"),
        (
            24,
            'async def fetch(\n    url: str,\n) -> bytes:\n    """Fetch a URL.\n\n    Returns the body.\n    """\n',
            "    # the body starts here\n    return await get(url)\n",
        ),
    ]
    assert list(mine_exercises("def broken(:\n")) == []
