"""Listing and reading corpus sources, and cleaning their documents, without ever dying on one bad row.

Plain functions: the Ray Data pipeline (``phi1_ray.data.ray_pipeline``) calls them once per file, and tokenizer
training calls them directly. Each document keeps where it came from (file and 1-based line or row; 0 for a
whole-file document) so that a bad one can be named.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.data.exercises import mine_exercises
from phi1_ray.errors import DataError
from phi1_ray.storage import filesystem_of, with_scheme

PREVIEW_CHARS = 200


@dataclass(frozen=True)
class FileEntry:
    """One file of one source: the unit of reading."""

    source: int
    path: str
    size: int


@dataclass
class Document:
    text: str
    path: str
    line: int
    completion: str | None = None  # finetuning records: text is the prompt


@dataclass
class ReadReport:
    """What reading a file found: counters, and the lines that could not be used."""

    counts: Counter = field(default_factory=Counter)
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def bad(self, cfg: DataConfig, path: str, line: int, reason: str, raw: bytes | str) -> None:
        if cfg.strict:
            raise DataError(f"{path}:{line}: {reason}")
        self.counts["quarantined"] += 1
        preview = raw if isinstance(raw, str) else raw[:800].decode("utf-8", errors="replace")
        self.quarantine.append({"path": path, "line": line, "reason": reason, "preview": preview[:PREVIEW_CHARS]})


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(sources: list[SourceConfig]) -> list[FileEntry]:
    """Every file of every source, sorted within a source; a missing path is an error naming it."""
    from pyarrow import fs

    entries: list[FileEntry] = []
    for index, source in enumerate(sources):
        roots = [stdlib_root()] if source.type == "stdlib" else source.paths
        suffixes = (
            tuple(source.extensions)
            if source.type in ("files", "stdlib")
            else ((".jsonl", ".json", ".jsonl.gz", ".json.gz") if source.type == "jsonl" else (".parquet",))
        )
        found: list[FileEntry] = []
        if source.type == "datagen":
            found.extend(FileEntry(index, path, 0) for path in _datagen_shards(source))
            roots = []
        for root in roots:
            filesystem, base = filesystem_of(root)
            info = filesystem.get_file_info(base)
            if info.type == fs.FileType.NotFound:
                raise DataError(f"source {source.label}: {root} does not exist")
            if info.type == fs.FileType.File:
                found.append(FileEntry(index, with_scheme(root, base), info.size or 0))
                continue
            for item in filesystem.get_file_info(fs.FileSelector(base, recursive=True)):
                if item.type != fs.FileType.File or not item.path.endswith(suffixes):
                    continue
                if source.type == "stdlib" and "site-packages" in item.path:
                    continue
                found.append(FileEntry(index, with_scheme(root, item.path), item.size or 0))
        found.sort(key=lambda e: e.path)
        if source.max_bytes is not None:
            total, kept = 0, []
            for entry in found:
                if total >= source.max_bytes:
                    break
                kept.append(entry)
                total += entry.size
            found = kept
        entries.extend(found)
    return entries


def _datagen_shards(source: SourceConfig) -> list[str]:
    from phi1_ray.datagen.output import read_datagen_manifest, shard_files

    files = []
    for root in source.paths:
        manifest = read_datagen_manifest(root)
        if manifest is None:
            raise DataError(
                f"source {source.label}: {root} has no manifest.json (not a finished data-generation output)"
            )
        files.extend(shard_files(root, manifest))
    return files


def _open_bytes(path: str) -> bytes:
    filesystem, local = filesystem_of(path)
    with filesystem.open_input_stream(local, compression="detect") as stream:
        return stream.read()


def _decode(raw: bytes, cfg: DataConfig, report: ReadReport, path: str, line: int) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cfg.invalid_utf8 == "drop":
            report.bad(cfg, path, line, f"invalid UTF-8 at byte {exc.start}", raw)
            return None
        report.counts["invalid_utf8_replaced"] += 1
        return raw.decode("utf-8", errors="replace")


def _keep(text: Any, report: ReadReport) -> bool:
    if not text.strip():
        report.counts["empty"] += 1
        return False
    return True


def _record_to_document(
    record: Any, source: SourceConfig, cfg: DataConfig, report: ReadReport, path: str, line: int, raw: Any
) -> Document | None:
    """A JSON/Parquet record as a document, or a quarantined line when it lacks its text columns."""
    keys = (source.prompt_key, source.completion_key) if cfg.format == "finetune" else (source.text_key,)
    if not isinstance(record, dict):
        report.bad(cfg, path, line, f"expected an object with {', '.join(map(repr, keys))}", raw)
        return None
    values = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, bytes):
            value = _decode(value, cfg, report, path, line)
            if value is None:
                return None
        if not isinstance(value, str):
            problem = "missing" if value is None else f"a {type(value).__name__}, not a string"
            report.bad(cfg, path, line, f"column {key!r} is {problem}", raw)
            return None
        values.append(value)
    if not _keep("".join(values), report):
        return None
    return Document(values[0], path, line, values[1] if len(values) > 1 else None)


def read_file(entry: FileEntry, source: SourceConfig, cfg: DataConfig, report: ReadReport) -> Iterator[Document]:
    """The documents of one file, cleaned; bad lines go to ``report`` (or raise in strict mode)."""
    path = entry.path
    try:
        if source.type in ("parquet", "datagen"):
            yield from _read_parquet(path, source, cfg, report)
            return
        data = _open_bytes(path)
    except DataError:
        raise
    except Exception as exc:  # unreadable or corrupt file: one quarantine entry, the job goes on
        report.bad(cfg, path, 0, f"unreadable file: {type(exc).__name__}: {exc}", b"")
        return
    if source.type in ("files", "stdlib"):
        text = _decode(data, cfg, report, path, 0)
        if text is not None and source.exercises:
            for ex in mine_exercises(text):
                yield Document(ex.prompt, path, ex.line, ex.completion)
        elif text is not None and _keep(text, report):
            yield Document(text, path, 0)
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank line between records
        line = _decode(raw, cfg, report, path, number)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.bad(cfg, path, number, f"malformed JSON: {exc.msg} at column {exc.colno}", line)
            continue
        doc = _record_to_document(record, source, cfg, report, path, number, line)
        if doc is not None:
            yield doc


def _read_parquet(path: str, source: SourceConfig, cfg: DataConfig, report: ReadReport) -> Iterator[Document]:
    import pyarrow.parquet as pq

    filesystem, local = filesystem_of(path)
    with filesystem.open_input_file(local) as handle:
        parquet = pq.ParquetFile(handle)
        keys = [source.prompt_key, source.completion_key] if cfg.format == "finetune" else [source.text_key]
        missing = [k for k in keys if k not in parquet.schema_arrow.names]
        if missing:
            report.bad(cfg, path, 0, f"no column {missing[0]!r}; columns: {', '.join(parquet.schema_arrow.names)}", b"")
            return
        row = 0
        for batch in parquet.iter_batches(columns=keys, batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                doc = _record_to_document(record, source, cfg, report, path, row, json.dumps(record, default=str))
                if doc is not None:
                    yield doc


def unit_hash(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) from (seed, parts): same document, same draw, on any machine."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(doc: Document, cfg: DataConfig) -> str:
    """``val`` for a seeded ``val_fraction`` of documents, drawn from their content: the same split wherever the
    corpus lives (a run directory elsewhere, another machine), and copies of a document land on the same side."""
    if cfg.val_fraction and unit_hash(cfg.seed, "val", doc.text, doc.completion) < cfg.val_fraction:
        return "val"
    return "train"


def copies(doc: Document, weight: float, seed: int) -> int:
    """How many times a document of a source with ``weight`` is seen: floor(w), plus one with prob frac(w)."""
    whole = int(weight)
    frac = weight - whole
    return whole + (1 if frac and unit_hash(seed, "weight", doc.text, doc.completion) < frac else 0)


def iter_texts(sources: list[SourceConfig], cfg: DataConfig | None = None) -> Iterator[str]:
    """Every document's text, in order, without Ray: for tokenizer training and small corpora."""
    cfg = cfg or DataConfig(sources=sources)
    report = ReadReport()
    for entry in list_files(sources):
        source = sources[entry.source]
        for doc in read_file(entry, source, cfg, report):
            yield doc.text if doc.completion is None else doc.text + doc.completion


def source_for_path(path: str) -> SourceConfig:
    """The source a bare ``--input PATH`` means: JSONL or Parquet by extension, else a tree of files."""
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return SourceConfig(type="jsonl", paths=[path])
    if lowered.endswith(".parquet"):
        return SourceConfig(type="parquet", paths=[path])
    return SourceConfig(type="files", paths=[path], extensions=[".py", ".txt", ".md"])
