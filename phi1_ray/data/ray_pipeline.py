"""The data pipeline on Ray Data: read + clean + tokenize (tasks), pack (one actor), then either stream into
Ray Train or write Parquet shards with a manifest.

The only module that calls Ray Data. Order is preserved end to end, so with shuffle off the blocks are the
corpus's documents in order, cut into ``seq_len + 1`` tokens; quarantined lines and counters are gathered by a
small stats actor.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from phi1_ray import storage
from phi1_ray.data.config import DataConfig
from phi1_ray.data.pack import (
    DocumentTokenizer,
    Packer,
    blocks_table,
    shuffle_keys,
    table_to_blocks,
    tokenizer_fingerprint,
)
from phi1_ray.data.read import FileEntry, ReadReport, copies, list_files, read_file, split_of
from phi1_ray.errors import DataError, Phi1Error
from phi1_ray.tokenizer import load_tokenizer


@ray.remote(num_cpus=0)
class DataStats:
    """Counters and quarantined lines reported by the pipeline's tasks and actors."""

    def __init__(self, keep: int) -> None:
        self.counts: Counter = Counter()
        self.quarantine: list[dict[str, Any]] = []
        self.keep = keep

    def add(self, counts: dict[str, int], quarantine: list[dict[str, Any]]) -> None:
        self.counts.update(counts)
        self.quarantine.extend(quarantine[: max(0, self.keep - len(self.quarantine))])

    def snapshot(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        return dict(self.counts), list(self.quarantine)


_TOKENIZERS: dict[int, DocumentTokenizer] = {}  # per worker process: built once, reused by later tasks


def _worker_tokenizer(spec: dict[str, Any], loss_on: str) -> DocumentTokenizer:
    key = hash((spec["tokenizer_json"], loss_on))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = DocumentTokenizer.from_spec(**spec, loss_on=loss_on)
    return _TOKENIZERS[key]


def _tokenized_row(
    tokenize: DocumentTokenizer, texts: list[str], completions: list[str] | None, group: int, chunk: int
) -> pa.Table:
    """One tokenizer batch as a row, keyed by (group, chunk) so the packer can restore stream order.

    No texts gives the empty row that closes a group (``last``)."""
    with_mask = completions is not None and tokenize.loss_on == "completion"
    if texts:
        flat, lengths, mask = tokenize(texts, completions)
    else:
        flat, lengths, mask = np.empty(0, tokenize.dtype), np.empty(0, np.int64), np.empty(0, np.uint8)
    columns = {
        "group": pa.array([group], pa.int64()),
        "chunk": pa.array([chunk], pa.int64()),
        "last": pa.array([not texts]),
        "ids": pa.ListArray.from_arrays([0, len(flat)], pa.array(flat)),
        "lengths": pa.ListArray.from_arrays([0, len(lengths)], pa.array(lengths)),
    }
    if with_mask:
        columns["mask"] = pa.ListArray.from_arrays([0, len(mask)], pa.array(mask, pa.uint8()))
    return pa.table(columns)


def _read_and_tokenize(
    batch: dict[str, np.ndarray], cfg_json: str, spec: dict[str, Any], split: str, stats: Any, count_reads: bool
) -> Iterator[pa.Table]:
    """Read task: the documents of a group of files that fall in ``split`` (repeated by source weight),
    cleaned and tokenized; one row (flat ids + per-document lengths [+ mask]) per ``docs_per_batch`` documents,
    then an empty row closing the group.

    Plain tasks rather than an actor pool: no actor start-up, and the tokenizer is built once per worker process.
    """
    cfg = DataConfig.model_validate_json(cfg_json)
    tokenize = _worker_tokenizer(spec, cfg.loss_on)
    finetune = cfg.format == "finetune"
    for group, files in zip(batch["group"], batch["files"]):
        group = int(group)
        report = ReadReport()
        texts: list[str] = []
        completions: list[str] = []
        documents = chunk = 0
        for item in json.loads(files):
            entry = FileEntry(**item)
            source = cfg.sources[entry.source]
            for doc in read_file(entry, source, cfg, report):
                if split_of(doc, cfg) != split:
                    continue
                for _ in range(copies(doc, source.weight, cfg.seed) if split == "train" else 1):
                    texts.append(doc.text)
                    if finetune:
                        completions.append(doc.completion or "")
                if len(texts) >= cfg.docs_per_batch:
                    documents += len(texts)
                    yield _tokenized_row(tokenize, texts, completions if finetune else None, group, chunk)
                    texts, completions, chunk = [], [], chunk + 1
        if texts:
            documents += len(texts)
            yield _tokenized_row(tokenize, texts, completions if finetune else None, group, chunk)
            chunk += 1
        counts = dict(report.counts) if count_reads else {}
        counts[f"documents_{split}"] = documents
        ray.get(stats.add.remote(counts, report.quarantine if count_reads else []))
        yield _tokenized_row(tokenize, [], [] if finetune else None, group, chunk)


def _row_values(table: pa.Table, column: str, row: int) -> np.ndarray:
    values = table.column(column)[row].values  # None for an empty list
    return values.to_numpy(zero_copy_only=False) if values is not None else np.empty(0)


class _Pack:
    """The one packer of a stream: keeps the remainder between batches so blocks follow the stream exactly.

    Batches are packed in (group, chunk) order whatever order Ray delivers them in: early ones wait in a buffer.
    """

    def __init__(self, block_len: int, dtype: str, with_mask: bool, doc_starts: bool, stats: Any, split: str) -> None:
        self.packer = Packer(block_len, np.dtype(dtype), with_mask, doc_starts)
        self.stats, self.split = stats, split
        self.pending: dict[tuple[int, int], tuple[Any, ...]] = {}
        self.next = (0, 0)

    def __call__(self, table: pa.Table) -> pa.Table:
        before_tokens, before_blocks = self.packer.tokens_in, self.packer.blocks_out
        has_mask = "mask" in table.schema.names
        for row in range(table.num_rows):
            key = (table.column("group")[row].as_py(), table.column("chunk")[row].as_py())
            ids, lengths = _row_values(table, "ids", row), _row_values(table, "lengths", row)
            mask = _row_values(table, "mask", row) if has_mask else None
            self.pending[key] = (ids, lengths, mask, table.column("last")[row].as_py())
        parts = []
        while self.next in self.pending:
            ids, lengths, mask, last = self.pending.pop(self.next)
            if len(ids):
                blocks = self.packer.push(ids, lengths, mask)
                if len(blocks["tokens"]):
                    parts.append(blocks_table(blocks))
            self.next = (self.next[0] + 1, 0) if last else (self.next[0], self.next[1] + 1)
        counts = {
            f"tokens_{self.split}": self.packer.tokens_in - before_tokens,
            f"blocks_{self.split}": self.packer.blocks_out - before_blocks,
        }
        ray.get(self.stats.add.remote(counts, []))
        return pa.concat_tables(parts) if parts else blocks_table(self.packer.empty())


def _add_shuffle_key(table: pa.Table, seed: int) -> pa.Table:
    index = table.column("index").to_numpy()
    return table.append_column("_order", pa.array(shuffle_keys(index, seed)))


def seeded_shuffle(ds: Any, seed: int) -> Any:
    """Permute blocks by a seeded key of their stream index: the same order on every run and block layout."""
    ds = ds.map_batches(_add_shuffle_key, batch_format="pyarrow", batch_size=None, fn_kwargs={"seed": seed})
    return ds.sort("_order").drop_columns(["_order"])


def _file_groups(entries: list[FileEntry], group_bytes: int) -> list[dict[str, str]]:
    groups, current, size = [], [], 0
    for entry in entries:
        current.append(entry.__dict__)
        size += entry.size
        if size >= group_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return [{"group": i, "files": json.dumps(g)} for i, g in enumerate(groups)]


def blocks_dataset(
    cfg: DataConfig, split: str = "train", stats: Any = None, count_reads: bool = True, tokenizer: Any = None
) -> Any:
    """A Ray Dataset of packed blocks (``tokens`` list column, plus ``loss_mask`` / ``doc_starts`` when asked).

    Streams lazily: hand it to a ``TorchTrainer`` through ``datasets=`` or write it with :func:`prepare`.
    """
    if cfg.tokenizer is None:
        raise DataError("data.tokenizer is not set: name a tokenizer directory or hub id")
    entries = list_files(cfg.sources)
    if not entries:
        raise DataError(f"the sources hold no files: {', '.join(s.label for s in cfg.sources)}")
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(entries)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    doc_tokenizer = DocumentTokenizer.from_hf(tokenizer, cfg.loss_on)
    stats = stats if stats is not None else DataStats.remote(cfg.quarantine_keep)

    groups = _file_groups(entries, cfg.bytes_per_read_task)
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    ds.context.execution_options.preserve_order = True  # this pipeline's own context, not the caller's
    ds = ds.map_batches(
        _read_and_tokenize,
        batch_size=1,
        batch_format="numpy",
        concurrency=cfg.tokenize_tasks,
        fn_kwargs={
            "cfg_json": cfg.model_dump_json(),
            "spec": doc_tokenizer.spec(),
            "split": split,
            "stats": stats,
            "count_reads": count_reads,
        },
    )
    ds = ds.map_batches(
        _Pack,
        batch_size=None,
        batch_format="pyarrow",
        concurrency=1,
        num_cpus=0,
        fn_constructor_kwargs={
            "block_len": cfg.seq_len + 1,
            "dtype": doc_tokenizer.dtype.name,
            "with_mask": cfg.format == "finetune" and cfg.loss_on == "completion",
            "doc_starts": cfg.doc_boundaries,
            "stats": stats,
            "split": split,
        },
    )
    if cfg.shuffle:
        ds = seeded_shuffle(ds, cfg.seed)
    # Ray blocks of about cfg.rows_per_ray_block packed rows: the unit that streaming_split hands to a trainer
    # worker, so small enough to spread a stream over the workers as they pull.
    ds.context.target_max_block_size = cfg.rows_per_ray_block * (cfg.seq_len + 1) * doc_tokenizer.dtype.itemsize
    return ds


class _TaskNames(FilenameProvider):
    def __init__(self) -> None:
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{task_index:06}"


def _shard_order(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _data_error(exc: BaseException) -> Phi1Error | None:
    """The phi1_ray error inside a Ray task failure, if that is what failed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Phi1Error):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def _write_split(
    cfg: DataConfig, split: str, filesystem: Any, root: str, stats: Any, tokenizer: Any, log: Any
) -> list[dict[str, Any]]:
    """One split's blocks written through a staging directory, then moved into place as numbered shards."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    staging = f"{root}/.staging-{split}"
    filesystem.delete_dir_contents(staging, missing_dir_ok=True)
    ds = blocks_dataset(cfg, split, stats, count_reads=split == "train", tokenizer=tokenizer)
    try:
        ds.write_parquet(
            staging,
            filename_provider=_TaskNames(),
            max_rows_per_file=cfg.rows_per_shard,
            mode=SaveMode.OVERWRITE,  # the staging directory is ours alone
        )
    except Exception as exc:
        inner = _data_error(exc)
        if inner is not None:
            raise type(inner)(str(inner)) from None
        raise
    listing = filesystem.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
    staged = sorted((i for i in listing if i.path.endswith(".parquet")), key=lambda i: _shard_order(i.base_name))
    shards = []
    for n, info in enumerate(staged):
        name = f"{split}-{n:06}.parquet"
        filesystem.move(info.path, f"{root}/{name}")
        with filesystem.open_input_file(f"{root}/{name}") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        shards.append({"file": name, "blocks": rows})
    if filesystem.get_file_info(staging).type == pafs.FileType.Directory:
        filesystem.delete_dir(staging)
    if not staged:
        log(f"data: the {split} split holds no complete block of {cfg.seq_len + 1} tokens")
    return shards


def _split_counts(cfg: DataConfig, counts: dict[str, int], shards: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Documents, tokens and blocks per split, checked against what the shards hold."""
    per_split = {}
    for split, files in shards.items():
        tokens, blocks = counts.get(f"tokens_{split}", 0), counts.get(f"blocks_{split}", 0)
        if blocks != sum(s["blocks"] for s in files):
            raise DataError(f"{split}: packed {blocks} blocks but the shards hold {sum(s['blocks'] for s in files)}")
        per_split[split] = {
            "documents": counts.get(f"documents_{split}", 0),
            "tokens": tokens,
            "blocks": blocks,
            "dropped_tokens": tokens - blocks * (cfg.seq_len + 1),
            "shards": files,
        }
    return per_split


def _manifest(
    cfg: DataConfig, counts: dict[str, int], per_split: dict[str, Any], tokenizer: Any, seconds: float
) -> dict[str, Any]:
    total = lambda key: sum(s[key] for s in per_split.values())  # noqa: E731
    return {
        "format": "phi1_ray.packed",
        "version": 1,
        "documents": total("documents"),
        "tokens": total("tokens"),
        "blocks": total("blocks"),
        "dropped_tokens": total("dropped_tokens"),
        "quarantined": counts.get("quarantined", 0),
        "empty_documents": counts.get("empty", 0),
        "invalid_utf8_replaced": counts.get("invalid_utf8_replaced", 0),
        "seq_len": cfg.seq_len,
        "block_len": cfg.seq_len + 1,
        "dtype": DocumentTokenizer.from_hf(tokenizer).dtype.name,
        "splits": per_split,
        "tokenizer": {
            "path": cfg.tokenizer,
            "hash": tokenizer_fingerprint(tokenizer),
            "size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        },
        "sources": [s.model_dump(mode="json") for s in cfg.sources],
        "data": cfg.model_dump(mode="json", exclude={"sources"}),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(total("tokens") / seconds) if seconds else None,
    }


def prepare(cfg: DataConfig, out: str | Path, log: Any = print) -> dict[str, Any]:
    """Tokenize and pack the corpus once into ``out``: Parquet shards per split, ``quarantine.jsonl`` and
    ``manifest.json`` (written last: a directory with a manifest is complete)."""
    out = str(out)
    manifest_path = storage.join(out, "manifest.json")
    existing = storage.read_json(manifest_path)
    if existing is not None:
        log(f"data: {manifest_path} exists, skipped")
        return existing
    if not cfg.tokenizer:
        raise DataError("data.tokenizer is not set: name a tokenizer directory or hub id")
    tokenizer = load_tokenizer(cfg.tokenizer)
    list_files(cfg.sources)  # a missing source fails here, before anything is written
    filesystem, root = storage.filesystem_of(out)
    filesystem.create_dir(root, recursive=True)

    start = time.perf_counter()
    stats = DataStats.remote(cfg.quarantine_keep)
    splits = ["train", "val"] if cfg.val_fraction > 0 else ["train"]
    shards = {split: _write_split(cfg, split, filesystem, root, stats, tokenizer, log) for split in splits}
    seconds = time.perf_counter() - start

    counts, quarantine = ray.get(stats.snapshot.remote())
    quarantine.sort(key=lambda q: (q["path"], q["line"]))
    with filesystem.open_output_stream(f"{root}/quarantine.jsonl") as f:
        f.write("".join(json.dumps(q) + "\n" for q in quarantine).encode())
    manifest = _manifest(cfg, counts, _split_counts(cfg, counts, shards), tokenizer, seconds)
    storage.write_json(manifest_path, manifest)
    log(
        f"data: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, {manifest['blocks']:,} blocks of "
        f"{manifest['block_len']}, {manifest['dropped_tokens']:,} tokens dropped (stream tails), "
        f"{manifest['quarantined']:,} quarantined, {manifest['empty_documents']:,} empty; "
        f"{manifest['tokens_per_s'] or 0:,} tokens/s -> {out}"
    )
    return manifest


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory (a DataError when it is not one)."""
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    if manifest is None:
        raise DataError(f"{out} has no manifest.json: not a prepared dataset (run jobs/prepare_data.py)")
    return manifest


def _read_shards(files: list[str]) -> Any:
    """``read_parquet`` of known shard files through Ray Data's V1 Parquet datasource.

    Ray 2.60's default (V2) reader starts 32 footer-reader actors for every execution of the dataset, and a
    training run executes its streams again at every epoch and evaluation: on a 2-core machine one pass over a
    78 KB validation shard took 14-25 s with V2 and 0.4 s with V1. Our shards are listed in the manifest, so the
    listing and footer indexing that V2 spreads over actors have nothing to do here.
    """
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files)
    finally:
        context.use_datasource_v2 = previous


def prepared_dataset(
    out: str | Path, split: str = "train", shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> Any:
    """Blocks of a prepared directory as a Ray Dataset, in stream order unless ``shuffle``: then a permutation
    seeded by (seed, epoch), so each epoch has its own order and a rerun repeats it."""
    manifest = read_manifest(out)
    if split not in manifest["splits"]:
        raise DataError(f"{out} has no {split!r} split; splits: {', '.join(manifest['splits'])}")
    files = [f"{str(out).rstrip('/')}/{s['file']}" for s in manifest["splits"][split]["shards"]]
    ds = _read_shards(files)
    ds.context.execution_options.preserve_order = True
    return seeded_shuffle(ds, seed * 100_003 + epoch) if shuffle else ds


def ingest_config(equal: bool = False) -> Any:
    """The ``dataset_config`` a ``TorchTrainer`` takes for our streams.

    Ray Train's own config with two changes: block order is preserved (the single packer cuts the stream in the
    order documents arrive, so order is what makes runs repeatable), and ``equal=False`` splits without dropping
    the remainder, so the workers' shards are disjoint and together hold every block. Step-based training loops
    (which restart their shard's iterator at its end) need no equal shards; pass ``equal=True`` for loops that
    stop at the end of an epoch in lockstep.
    """
    from ray.train import DataConfig as TrainDataConfig

    class StreamIngest(TrainDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
            if equal:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name in to_split:
                    for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                        output[i][name] = split
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    options = TrainDataConfig.default_ingest_options()
    options.preserve_order = True
    return StreamIngest(execution_options=options)


def tokens_tensor(batch: Any, column: str = "tokens") -> Any:
    """A (B, seq_len + 1) int64 torch tensor from a batch of blocks (a pyarrow table or a dict of arrays)."""
    import torch

    if isinstance(batch, pa.Table):
        array = table_to_blocks(batch, column)
    else:
        array = np.stack([np.asarray(row) for row in batch[column]])
    return torch.from_numpy(array.astype(np.int64))
