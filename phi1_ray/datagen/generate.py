"""Synthetic textbooks and CodeExercises on Ray Data: seeded prompts -> teacher -> validation -> Parquet shards.

    items (from_items) -> map_batches(TeacherCaller, actor pool) -> map_batches(validate) -> write (kept / rejected)

Mined exercises (no teacher) read code corpora with the data issue's reader, every function with a docstring
becoming a (prompt, completion) pair, and go through the same writer. A rerun of a finished output skips it; a
rerun of an interrupted one asks the teacher only for what its cache lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from phi1_ray import storage
from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.data.read import FileEntry, ReadReport, list_files, read_file
from phi1_ray.datagen.config import GenerateConfig, TeacherConfig
from phi1_ray.datagen.output import finished, usage_totals, write_dataset, write_manifest
from phi1_ray.datagen.prompts import (
    EXERCISE_TEMPLATE,
    TEXTBOOK_TEMPLATE,
    exercise_items,
    load_topics,
    textbook_items,
)
from phi1_ray.datagen.teacher import call_teacher, request_params, teacher_blocks
from phi1_ray.datagen.validate import check_exercise, check_textbook


def default_cache_dir(out: str) -> str:
    return "" if storage.is_uri(out) else str(Path(out).expanduser().resolve().parent / "teacher_cache")


def _validate_textbooks(table: pa.Table, min_chars: int, max_chars: int, min_blocks: int) -> pa.Table:
    statuses, texts = [], []
    for reply in table.column("reply").to_pylist():
        reason, text = check_textbook(reply, min_chars, max_chars, min_blocks)
        statuses.append(reason or "ok")
        texts.append(text)
    table = table.rename_columns(["request" if n == "prompt" else n for n in table.column_names])
    return (
        table.append_column("status", pa.array(statuses))
        .append_column("text", pa.array(texts))
        .append_column("origin", pa.array(["teacher"] * len(texts)))
    )


def _validate_exercises(table: pa.Table, min_body_lines: int) -> pa.Table:
    statuses, prompts, completions = [], [], []
    for reply in table.column("reply").to_pylist():
        reason, prompt, completion = check_exercise(reply, min_body_lines)
        statuses.append(reason or "ok")
        prompts.append(prompt)
        completions.append(completion)
    table = table.rename_columns(["request" if n == "prompt" else n for n in table.column_names])
    return (
        table.append_column("status", pa.array(statuses))
        .append_column("prompt", pa.array(prompts))
        .append_column("completion", pa.array(completions))
        .append_column("text", pa.array([p + c for p, c in zip(prompts, completions)]))
        .append_column("origin", pa.array(["teacher"] * len(prompts)))
    )


def _mined_rows(group: dict[str, Any]) -> dict[str, list]:
    source = SourceConfig(**group["source"])
    cfg = DataConfig(sources=[source], format="finetune")
    report = ReadReport()
    rows: dict[str, list] = {"id": [], "path": [], "line": [], "prompt": [], "completion": [], "text": []}
    for path in group["paths"]:
        for doc in read_file(FileEntry(0, path, 0), source, cfg, report):
            rows["id"].append(f"mined:{path}:{doc.line}")
            rows["path"].append(path)
            rows["line"].append(doc.line)
            rows["prompt"].append(doc.text)
            rows["completion"].append(doc.completion or "")
            rows["text"].append(doc.text + (doc.completion or ""))
    return rows


def _mined_dataset(sources: list[SourceConfig], min_body_lines: int) -> Any:
    import ray.data

    groups = []
    for source in sources:
        mine_source = source.model_copy(update={"exercises": source.type in ("files", "stdlib")})
        entries = list_files([mine_source])
        for start in range(0, len(entries), 32):
            groups.append({"source": mine_source.model_dump(), "paths": [e.path for e in entries[start : start + 32]]})
    if not groups:
        return None
    ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups)))

    def expand(batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {"id": [], "path": [], "line": [], "prompt": [], "completion": [], "text": []}
        for group in batch.to_pylist():
            for key, values in _mined_rows(group).items():
                out[key].extend(values)
        lines = [sum(1 for ln in c.splitlines() if ln.strip()) for c in out["completion"]]
        out["status"] = ["ok" if n >= min_body_lines else "trivial_body" for n in lines]
        out["origin"] = ["mined"] * len(out["id"])
        return pa.table(out, schema=_MINED_SCHEMA)

    return ds.map_batches(expand, batch_format="pyarrow", batch_size=1)


_MINED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("line", pa.int64()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("text", pa.string()),
        ("status", pa.string()),
        ("origin", pa.string()),
    ]
)


def _teacher_info(teacher: TeacherConfig) -> dict[str, Any]:
    return {"base_url": teacher.base_url, "model": teacher.model, "api": teacher.api, **request_params(teacher)}


def run_generation(cfg: GenerateConfig, log: Any = print) -> dict[str, Any]:
    """Generate ``cfg.kind`` into ``cfg.out``; returns the manifest."""
    import ray.data

    done = finished(cfg.out, log)
    if done is not None:
        return done
    cache_dir = cfg.teacher.cache_dir or default_cache_dir(cfg.out) or None
    parts = []
    if cfg.kind == "textbooks":
        book = cfg.textbooks
        topics = load_topics(book.topics, ("topics", "audiences", "styles", "words"))
        items = textbook_items(topics, book.num_items, cfg.seed, book.random_words)
        template = TEXTBOOK_TEMPLATE
    else:
        ex = cfg.exercises
        topics = load_topics(ex.topics, ("topics", "audiences", "function_verbs", "function_nouns"))
        items = exercise_items(topics, ex.num_items, cfg.seed)
        template = EXERCISE_TEMPLATE
    if items:
        ds = ray.data.from_items(items, override_num_blocks=teacher_blocks(len(items), cfg.teacher))
        ds = call_teacher(ds, cfg.teacher, cache_dir)
        if cfg.kind == "textbooks":
            b = cfg.textbooks
            ds = ds.map_batches(
                _validate_textbooks,
                fn_kwargs={"min_chars": b.min_chars, "max_chars": b.max_chars, "min_blocks": b.min_code_blocks},
                batch_format="pyarrow",
            )
        else:
            ds = ds.map_batches(
                _validate_exercises, fn_kwargs={"min_body_lines": cfg.exercises.min_body_lines}, batch_format="pyarrow"
            )
        parts.append(ds.drop_columns(["reply"]))
    if cfg.kind == "exercises" and cfg.exercises.mine:
        mined = _mined_dataset(cfg.exercises.mine, cfg.exercises.min_body_lines)
        if mined is not None:
            parts.append(mined)
    if not parts:
        raise ValueError("nothing to generate")
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    teacher = f"{cfg.teacher.model} at {cfg.teacher.base_url}, {cfg.teacher.concurrency} in flight" if items else "none"
    mined = (
        f", mined from {len(cfg.exercises.mine)} code source(s)"
        if cfg.kind == "exercises" and cfg.exercises.mine
        else ""
    )
    log(f"[{cfg.kind}] {len(items):,} teacher items (teacher: {teacher}){mined} -> {cfg.out}")
    written = write_dataset(ds, cfg.out, cfg.rows_per_shard)
    filesystem, _ = storage.filesystem_of(cfg.out)
    prices = (cfg.teacher.price_per_1k_prompt, cfg.teacher.price_per_1k_completion)
    usage = usage_totals(filesystem, written["usage_files"], prices)
    manifest = write_manifest(
        cfg.out,
        cfg.kind,
        written,
        {"stage": f"generate_{cfg.kind}", "items": len(items), "mined_sources": len(cfg.exercises.mine)},
        teacher=_teacher_info(cfg.teacher) if items else None,
        template_version=cfg.template_version,
        template=template if items else None,
        seeds={"seed": cfg.seed, "topics": cfg.textbooks.topics if cfg.kind == "textbooks" else cfg.exercises.topics},
        usage=usage,
    )
    log(
        f"[{cfg.kind}] kept {manifest['rows']:,}; rejected {sum(written['rejected'].values()):,} "
        f"{dict(sorted(written['rejected'].items()))}; teacher requests {usage.get('requests', 0):,} "
        f"(cached {usage.get('cached', 0):,}, retries {usage.get('retries', {})}), cost {usage.get('cost', 0.0)}"
    )
    return manifest
