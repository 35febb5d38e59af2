"""Exact and near-duplicate removal across datasets (generated and filtered): the first occurrence stays.

- exact: a hash of the normalized text (lower case, whitespace runs collapsed);
- near: MinHash signatures of word ``shingle``-grams (datasketch), computed on Ray Data, then MinHash LSH at the
  Jaccard ``threshold``; a candidate pair is confirmed by its estimated Jaccard similarity.

The inputs are read in the order given, each record with its index; the survivors of each input go to
``out/<name>/`` (shards + manifest, a ``datagen`` corpus source) and every removed record to ``out/report.jsonl``
with the record it duplicates.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from phi1_ray.datagen.config import DedupConfig

SPACE = re.compile(r"\s+")
WORD = re.compile(r"\w+")


def normalized(text: str) -> str:
    return SPACE.sub(" ", text.lower()).strip()


def exact_key(text: str) -> str:
    return hashlib.sha1(normalized(text).encode()).hexdigest()


def shingles(text: str, k: int) -> set[bytes]:
    tokens = WORD.findall(text.lower())
    if len(tokens) < k:
        return {" ".join(tokens).encode()}
    return {" ".join(tokens[i : i + k]).encode() for i in range(len(tokens) - k + 1)}


def _signatures(table: pa.Table, num_perm: int, shingle: int) -> pa.Table:
    from datasketch import MinHash

    sigs = []
    for text in table.column("text").to_pylist():
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(shingles(text or "", shingle)))
        sigs.append(m.hashvalues.astype(np.uint64).tobytes())
    keys = [exact_key(t or "") for t in table.column("text").to_pylist()]
    return pa.table({"row": table.column("row"), "key": pa.array(keys), "sig": pa.array(sigs, pa.binary())})


def find_duplicates(texts: list[str], cfg: DedupConfig) -> list[tuple[int, str, float] | None]:
    """Per text, in order: None (kept) or (index of the kept text it duplicates, ``exact``/``near``, Jaccard)."""
    import ray.data
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    table = pa.table({"row": pa.array(np.arange(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    blocks = max(1, min(len(texts) // 512, 200))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(
        _signatures, fn_kwargs={"num_perm": cfg.num_perm, "shingle": cfg.shingle}, batch_format="pyarrow"
    )
    rows = sorted(
        (r for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096) for r in batch.to_pylist()),
        key=lambda r: r["row"],
    )
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    scheme = MinHash(num_perm=cfg.num_perm, seed=1).scheme  # the workers' default, the same datasketch
    first_of_key: dict[str, int] = {}
    kept: dict[int, LeanMinHash] = {}
    out: list[tuple[int, str, float] | None] = [None] * len(texts)
    for r in rows:
        i = r["row"]
        if r["key"] in first_of_key:
            out[i] = (first_of_key[r["key"]], "exact", 1.0)
            continue
        m = LeanMinHash(seed=1, hashvalues=np.frombuffer(r["sig"], np.uint64), scheme=scheme)
        best = None
        for j in lsh.query(m):
            sim = m.jaccard(kept[j])
            if sim >= cfg.threshold and (best is None or sim > best[1]):
                best = (j, sim)
        if best is not None:
            out[i] = (best[0], "near", round(best[1], 4))
            continue
        first_of_key[r["key"]] = i
        kept[i] = m
        lsh.insert(i, m)
    return out


def run_dedup(inputs: list[str], out: str, cfg: DedupConfig, log: Any = print) -> dict[str, Any]:
    """Deduplicate ``inputs`` together; returns {input name: manifest} (+ the report path)."""
    import ray.data

    from phi1_ray.datagen.decontam import read_records
    from phi1_ray.datagen.output import finished, inherited, read_datagen_manifest, write_dataset, write_manifest
    from phi1_ray.storage import filesystem_of

    names: list[str] = []
    for path in inputs:
        name = Path(path.rstrip("/")).name.removesuffix(".jsonl").removesuffix(".parquet") or "input"
        names.append(name if name not in names else f"{name}-{len(names)}")
    if all(read_datagen_manifest(f"{out}/{n}") is not None for n in names):
        log(f"{out}: already done; delete the directory to deduplicate again")
        return {n: read_datagen_manifest(f"{out}/{n}") for n in names}
    tables, texts, owner = [], [], []
    for k, path in enumerate(inputs):
        table, _ = read_records(path)
        tables.append(table)
        texts.extend(table.column("text").to_pylist())
        owner.extend((k, i) for i in range(table.num_rows))
    dups = find_duplicates(texts, cfg)
    filesystem, root = filesystem_of(out)
    filesystem.create_dir(root)
    manifests: dict[str, Any] = {}
    offset = 0
    report = []
    for path, name, table in zip(inputs, names, tables):
        part = dups[offset : offset + table.num_rows]
        offset += table.num_rows
        status = ["ok" if d is None else f"{d[1]}_duplicate" for d in part]
        for i, d in enumerate(part):
            if d is not None:
                src_input, src_index = owner[d[0]]
                report.append({"input": path, "index": i, "duplicate_of": {"input": inputs[src_input],
                               "index": src_index}, "test": d[1], "jaccard": d[2]})  # fmt: skip
        target = f"{out}/{name}"
        finished(target, lambda *_: None)
        ds = ray.data.from_arrow(table.append_column("status", pa.array(status)))
        written = write_dataset(ds, target, rows_per_shard=50_000)
        parent = read_datagen_manifest(path)
        removed = {s: status.count(s) for s in set(status) - {"ok"}}
        manifests[name] = write_manifest(
            target,
            parent["kind"] if parent else ("exercises" if "prompt" in table.column_names else "documents"),
            written,
            {"stage": "dedup", "input": path, "records": table.num_rows, "removed": removed,
             "threshold": cfg.threshold, "num_perm": cfg.num_perm, "shingle": cfg.shingle, "across": inputs},
            **inherited(parent),
        )  # fmt: skip
        log(f"[dedup] {name}: kept {manifests[name]['rows']:,} of {table.num_rows:,} {removed}")
    with filesystem.open_output_stream(f"{root}/report.jsonl") as f:
        for row in report:
            f.write((json.dumps(row) + "\n").encode())
    return manifests
