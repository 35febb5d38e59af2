"""Outputs of the data-generation jobs: Parquet shards under ``DIR/data/`` and ``DIR/manifest.json``.

Every dataset keeps a ``text`` column (exercises also ``prompt`` and ``completion``), so the corpus spec reads any
of them as a ``datagen`` source (pretraining text, or finetuning records). The manifest holds the counts of every
stage that made the dataset, the rejection reasons, the teacher, the prompt template version, the seeds and the
cost. A job writes its manifest last: a directory with one is finished, and running the job again skips it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from phi1_ray import storage
from phi1_ray.errors import DataError
from phi1_ray.storage import filesystem_of

FORMAT = "phi1_ray-datagen"
MANIFEST = "manifest.json"
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "attempts", "cached")


def read_datagen_manifest(out: str) -> dict[str, Any] | None:
    manifest = storage.read_json(storage.join(out, MANIFEST))
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{storage.join(out, MANIFEST)} is not a phi1_ray data-generation manifest")
    return manifest


def finished(out: str, log: Any = print) -> dict[str, Any] | None:
    """The manifest of a finished output (the job then skips), or None after clearing a partial one."""
    manifest = read_datagen_manifest(out)
    if manifest is not None:
        log(f"{out}: already done ({manifest['rows']:,} rows); delete the directory to make it again")
        return manifest
    filesystem, root = filesystem_of(out)
    for sub in ("data", "rejected", "_staging"):
        try:
            filesystem.delete_dir(storage.join(root, sub))
        except (FileNotFoundError, OSError):
            pass
    return None


def shard_files(out: str, manifest: dict[str, Any] | None = None) -> list[str]:
    manifest = manifest or read_datagen_manifest(out)
    if manifest is None:
        raise DataError(f"{out} has no {MANIFEST}: not a finished data-generation output")
    return [storage.join(out, s["file"]) for s in manifest["shards"]]


def read_table(out: str, columns: list[str] | None = None) -> pa.Table:
    """A finished output as one Arrow table (for the smaller, driver-side stages and tests)."""
    files = shard_files(out)
    tables = []
    for path in files:
        filesystem, local = filesystem_of(path)
        with filesystem.open_input_file(local) as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _files_under(filesystem: Any, root: str) -> list[str]:
    from pyarrow import fs

    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError):
        return []
    return sorted(i.path for i in infos if i.type == fs.FileType.File and i.path.endswith(".parquet"))


def _rows(filesystem: Any, path: str) -> int:
    with filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def write_dataset(ds: Any, out: str, rows_per_shard: int) -> dict[str, Any]:
    """Write ``ds`` (rows with a ``status``: ``ok`` or a rejection reason) in one pass: kept rows to ``data/``,
    rejected ones to ``rejected/<reason>/``. Returns the shards and the counts by reason."""
    filesystem, root = filesystem_of(out)
    staging = storage.join(out, "_staging")
    ds.write_parquet(staging, partition_cols=["status"], max_rows_per_file=rows_per_shard)
    _, staging_root = filesystem_of(staging)
    shards, rejected, usage_files = [], {}, []
    filesystem.create_dir(storage.join(root, "data"))
    kept = [p for p in _files_under(filesystem, staging_root) if "/status=ok/" in p]
    for i, path in enumerate(kept):
        target = storage.join(root, "data", f"part-{i:05d}.parquet")
        filesystem.move(path, target)
        shards.append({"file": f"data/part-{i:05d}.parquet", "rows": _rows(filesystem, target)})
        usage_files.append(target)
    for path in _files_under(filesystem, staging_root):
        reason = path.split("/status=", 1)[1].split("/", 1)[0]
        target = storage.join(root, "rejected", reason, path.rsplit("/", 1)[1])
        filesystem.create_dir(storage.join(root, "rejected", reason))
        filesystem.move(path, target)
        rejected[reason] = rejected.get(reason, 0) + _rows(filesystem, target)
        usage_files.append(target)
    filesystem.delete_dir(staging_root)
    return {"shards": shards, "rejected": rejected, "usage_files": usage_files}


def usage_totals(filesystem: Any, files: list[str], prices: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """Teacher usage summed over the rows of ``files`` (kept and rejected): tokens, requests, retries, cost."""
    totals: dict[str, int] = {}
    for path in files:
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = [n for n in parquet.schema_arrow.names if n in USAGE_COLUMNS or n.startswith("retry_")]
            if not names:
                continue
            table = parquet.read(columns=names)
        for name in names:
            totals[name] = totals.get(name, 0) + int(pa.compute.sum(table.column(name).cast(pa.int64())).as_py() or 0)
    return summarize_usage(totals, prices)


def usage_of_rows(rows: list[dict[str, Any]], prices: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    totals: dict[str, int] = {}
    for row in rows:
        for name, value in row.items():
            if name in USAGE_COLUMNS or name.startswith("retry_"):
                totals[name] = totals.get(name, 0) + int(value or 0)
    return summarize_usage(totals, prices)


def summarize_usage(totals: dict[str, int], prices: tuple[float, float]) -> dict[str, Any]:
    if not totals:
        return {}
    cost = totals.get("prompt_tokens", 0) / 1000 * prices[0] + totals.get("completion_tokens", 0) / 1000 * prices[1]
    return {
        "requests": int(totals.get("attempts", 0)),
        "cached": int(totals.get("cached", 0)),
        "prompt_tokens": int(totals.get("prompt_tokens", 0)),
        "completion_tokens": int(totals.get("completion_tokens", 0)),
        "retries": {k.removeprefix("retry_"): int(v) for k, v in totals.items() if k.startswith("retry_")},
        "cost": round(cost, 6),
    }


def inherited(parent: dict[str, Any] | None) -> dict[str, Any]:
    """What a derived dataset (dedup, decontamination) keeps of its input's manifest."""
    if parent is None:
        return {}
    keys = ("teacher", "template_version", "template", "seeds", "usage")
    return {"previous_stages": parent.get("stages", []), **{k: parent[k] for k in keys if k in parent}}


def write_manifest(out: str, kind: str, written: dict[str, Any], stage: dict[str, Any], **extra: Any) -> dict:
    """The manifest (written last). ``stage`` is this job's entry in ``stages``; ``extra`` adds top-level keys
    (``teacher``, ``template_version``, ``seeds``, ``usage``, ``parents``...)."""
    rows = sum(s["rows"] for s in written["shards"])
    stages = [*extra.pop("previous_stages", []), {**stage, "kept": rows, "rejected": written["rejected"]}]
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "rows": rows,
        "columns": ["text", "prompt", "completion"] if kind == "exercises" else ["text"],
        "shards": written["shards"],
        "rejected": written["rejected"],
        "stages": stages,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    storage.write_atomic(storage.join(out, MANIFEST), json.dumps(manifest, indent=2))
    return manifest
