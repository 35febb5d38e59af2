"""Decontamination against HumanEval / MBPP, the three tests of the paper's section 5.

- ``ngram``: a record shares a word 13-gram (configurable) with a benchmark problem's prompt or solution;
- ``ast``: a function of the record matches a benchmark solution once both are canonicalized: docstrings dropped,
  every identifier the code defines (function name, arguments, variables) renamed to one placeholder, so renamed
  variables and reordered arguments change nothing; builtins, attributes, operators and structure are kept. The
  match rate of the two node sequences (difflib's ratio, 1.0 = identical) at or above ``tau`` is a match;
- ``embedding``: cosine similarity of the record's and a problem's embeddings at or above a threshold (with an
  encoder).

Records are JSONL or Parquet (or a data-generation output); each removed record is reported with its index in the
input, the benchmark ``task_id`` it matched and the test that matched. Scoring runs on Ray Data actors, each
holding the benchmark index.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import hashlib
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phi1_ray.datagen.config import DecontamConfig
from phi1_ray.errors import DataError

WORD = re.compile(r"[A-Za-z0-9_]+")
BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class Reference:
    """One benchmark problem: its id, prompt and full reference code."""

    task_id: str
    prompt: str
    code: str


def load_references(benchmarks: list[tuple[str, str | None]]) -> list[Reference]:
    """(name, file) pairs: ``("humaneval", None)``, ``("mbpp", "mbpp.jsonl")`` or a HumanEval-schema file."""
    from phi1_ray.evals.problems import load_benchmark

    refs = []
    for name, path in benchmarks:
        for problem in load_benchmark(name, path):
            if problem.entry_point is not None:  # HumanEval: prompt (signature + docstring) + body
                code = problem.prompt + problem.canonical_solution
            else:  # MBPP: the reference solution is the code
                code = problem.canonical_solution
            refs.append(Reference(problem.task_id, problem.prompt, code))
    return refs


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def ngram_hashes(text: str, n: int) -> set[int]:
    tokens = words(text)
    return {
        int.from_bytes(hashlib.blake2b(" ".join(tokens[i : i + n]).encode(), digest_size=8).digest(), "little")
        for i in range(len(tokens) - n + 1)
    }


def _functions(code: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    try:
        tree = ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return []
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[1:]
    return body


def canonical_tokens(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The function as a sequence of node tokens with its own identifiers anonymized (see the module doc)."""
    tokens: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            tokens.append(node.id if node.id in BUILTINS else "ID")
            return
        if isinstance(node, ast.arg):
            tokens.append("ARG")
            return
        if isinstance(node, ast.Constant):
            value = node.value
            small = isinstance(value, (int, float, bool)) and abs(value) < 10 or value is None
            tokens.append(f"C:{value!r}" if small else f"C:{type(value).__name__}")
            return
        tokens.append(type(node).__name__)
        if isinstance(node, ast.Attribute):
            tokens.append(f".{node.attr}")
        for field, value in ast.iter_fields(node):
            if field in ("type_comment", "decorator_list", "returns", "annotation", "type_params"):
                continue
            if field == "body" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                value = _without_docstring(value)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child)
        tokens.append(")")

    visit(func)
    return tokens


def match_rate(a: list[str], b: list[str]) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


class BenchmarkIndex:
    """What a record is compared against: n-gram hashes, canonical functions, optional embeddings."""

    def __init__(self, refs: list[Reference], cfg: DecontamConfig, encoder: Any = None) -> None:
        self.cfg = cfg
        self.ngram_owner: dict[int, str] = {}
        for ref in refs:
            for h in ngram_hashes(ref.prompt, cfg.ngram) | ngram_hashes(ref.code, cfg.ngram):
                self.ngram_owner.setdefault(h, ref.task_id)
        self.functions: list[tuple[str, list[str]]] = []
        for ref in refs:
            for func in _functions(ref.code):
                tokens = canonical_tokens(func)
                if len(tokens) >= cfg.min_ast_nodes:
                    self.functions.append((ref.task_id, tokens))
        self.encoder = encoder
        self.ref_ids = [r.task_id for r in refs]
        self.ref_vectors = encoder.embed([r.prompt for r in refs]) if encoder is not None else None

    def _ast_match(self, text: str) -> tuple[str, float] | None:
        tau = self.cfg.tau
        best: tuple[str, float] | None = None
        for func in _functions(text):
            tokens = canonical_tokens(func)
            if len(tokens) < self.cfg.min_ast_nodes:
                continue
            for task_id, ref in self.functions:
                if min(len(tokens), len(ref)) < tau * max(len(tokens), len(ref)):
                    continue  # the ratio cannot reach tau
                matcher = difflib.SequenceMatcher(None, tokens, ref, autojunk=False)
                if matcher.real_quick_ratio() < tau or matcher.quick_ratio() < tau:
                    continue
                rate = matcher.ratio()
                if rate >= tau and (best is None or rate > best[1]):
                    best = (task_id, rate)
        return best

    def match(self, texts: list[str]) -> list[tuple[str, str, str] | None]:
        """Per text: (task_id, test, detail) of the first test that matched, or None."""
        out: list[tuple[str, str, str] | None] = [None] * len(texts)
        for i, text in enumerate(texts):
            for h in ngram_hashes(text, self.cfg.ngram):
                if h in self.ngram_owner:
                    out[i] = (self.ngram_owner[h], "ngram", f"shares a {self.cfg.ngram}-gram")
                    break
            if out[i] is None and (found := self._ast_match(text)) is not None:
                out[i] = (found[0], "ast", f"match rate {found[1]:.3f} >= tau {self.cfg.tau}")
        if self.encoder is not None:
            todo = [i for i, o in enumerate(out) if o is None]
            if todo:
                vectors = self.encoder.embed([texts[i] for i in todo])
                sims = vectors @ self.ref_vectors.T
                for row, i in enumerate(todo):
                    j = int(np.argmax(sims[row]))
                    if sims[row, j] >= self.cfg.embedding_similarity:
                        out[i] = (self.ref_ids[j], "embedding", f"cosine {sims[row, j]:.3f}")
        return out


class DecontamScorer:
    """Ray Data actor: adds ``status`` (``ok`` / ``contaminated``) and the match columns."""

    def __init__(self, refs: list[Reference], cfg: dict[str, Any]) -> None:
        config = DecontamConfig(**cfg)
        encoder = None
        if config.encoder.configured:
            from phi1_ray.datagen.embed import Encoder

            encoder = Encoder(config.encoder)
        self.index = BenchmarkIndex(refs, config, encoder)

    def __call__(self, table: pa.Table) -> pa.Table:
        matches = self.index.match(table.column("text").to_pylist())
        status = ["ok" if m is None else "contaminated" for m in matches]
        return (
            table.append_column("status", pa.array(status))
            .append_column("matched_task_id", pa.array([m[0] if m else None for m in matches], pa.string()))
            .append_column("matched_test", pa.array([m[1] if m else None for m in matches], pa.string()))
            .append_column("matched_detail", pa.array([m[2] if m else None for m in matches], pa.string()))
        )


def read_records(path: str) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Records of a JSONL file, a Parquet file / directory or a data-generation output, with their ``index`` in the
    input and a ``text`` column (``prompt`` + ``completion`` for exercises). Unreadable lines are returned apart."""
    from phi1_ray.datagen.output import read_datagen_manifest, read_table

    bad: list[dict[str, Any]] = []
    positions: list[int] = []
    source = Path(path)
    if read_datagen_manifest(path) is not None:
        table = read_table(path)
    elif source.suffix == ".parquet" or source.is_dir():
        table = pq.read_table(path)
    elif source.is_file():
        rows, positions = [], []
        lines = [(n, ln) for n, ln in enumerate(source.read_text(encoding="utf-8", errors="replace").splitlines(), 1)]
        for position, (number, line) in enumerate((n, ln) for n, ln in lines if ln.strip()):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                bad.append({"path": path, "line": number, "index": position, "reason": f"malformed JSON: {exc}",
                            "preview": line[:200]})  # fmt: skip
                continue
            rows.append(row)
            positions.append(position)
        table = pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
    else:
        raise DataError(f"--input {path}: no such file or directory")
    names = table.column_names
    if "prompt" in names and "completion" in names:
        texts = [(p or "") + (c or "") for p, c in zip(table["prompt"].to_pylist(), table["completion"].to_pylist())]
    elif "text" in names:
        texts = [t or "" for t in table["text"].to_pylist()]
    else:
        raise DataError(f"{path}: records need a 'text' column or 'prompt' and 'completion'; columns: {names}")
    if "text" in names:
        table = table.drop_columns(["text"])
    for drop in ("status", "index"):
        if drop in table.column_names:
            table = table.drop_columns([drop])
    table = table.append_column("text", pa.array(texts, pa.string()))
    index = positions if bad else np.arange(table.num_rows)  # a record's position in the input, bad lines counted
    return table.append_column("index", pa.array(index, pa.int64())), bad


def run_decontamination(
    input_path: str,
    out: str,
    benchmarks: list[tuple[str, str | None]],
    cfg: DecontamConfig,
    actors: int = 1,
    log: Any = print,
) -> dict[str, Any]:
    """Survivors of ``input_path`` to ``out`` (shards + manifest), every removed record in ``out/report.jsonl``."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from phi1_ray.datagen.output import finished, inherited, read_datagen_manifest, write_dataset, write_manifest
    from phi1_ray.storage import filesystem_of

    done = finished(out, log)
    if done is not None:
        return done
    refs = load_references(benchmarks)
    table, bad = read_records(input_path)
    parent = read_datagen_manifest(input_path)
    kind = parent["kind"] if parent else ("exercises" if "prompt" in table.column_names else "documents")
    log(f"[decontaminate] {table.num_rows:,} records of {input_path} against {len(refs)} problems "
        f"({', '.join(b for b, _ in benchmarks)}): {cfg.ngram}-grams, AST tau {cfg.tau}"
        + (f", embeddings >= {cfg.embedding_similarity}" if cfg.encoder.configured else ""))  # fmt: skip
    blocks = max(1, min(table.num_rows // 256, 200))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(
        DecontamScorer,
        fn_constructor_kwargs={"refs": refs, "cfg": cfg.model_dump()},
        batch_format="pyarrow",
        batch_size=256,
        compute=ActorPoolStrategy(size=actors),
    )
    written = write_dataset(ds, out, rows_per_shard=50_000)
    filesystem, root = filesystem_of(out)
    report = []
    for path in written["usage_files"]:
        if "/rejected/" not in path:
            continue
        with filesystem.open_input_file(path) as handle:
            rows = pq.read_table(handle, columns=["index", "matched_task_id", "matched_test", "matched_detail"])
        report.extend(rows.to_pylist())
    report.sort(key=lambda r: r["index"])
    with filesystem.open_output_stream(f"{root}/report.jsonl") as f:
        for row in report:
            line = {"index": row["index"], "task_id": row["matched_task_id"], "test": row["matched_test"],
                    "detail": row["matched_detail"]}  # fmt: skip
            f.write((json.dumps(line) + "\n").encode())
    if bad:
        with filesystem.open_output_stream(f"{root}/quarantine.jsonl") as f:
            for row in bad:
                f.write((json.dumps(row) + "\n").encode())
    by_test: dict[str, int] = {}
    for row in report:
        by_test[row["matched_test"]] = by_test.get(row["matched_test"], 0) + 1
    manifest = write_manifest(
        out,
        kind,
        written,
        {"stage": "decontaminate", "input": input_path, "records": table.num_rows, "unreadable": len(bad),
         "removed_by_test": by_test, "benchmarks": [b for b, _ in benchmarks], "ngram": cfg.ngram, "tau": cfg.tau},
            **inherited(parent),
    )  # fmt: skip
    log(f"[decontaminate] kept {manifest['rows']:,}, removed {len(report):,} {by_test}, unreadable {len(bad)} "
        f"-> {out} (report: {out}/report.jsonl)")  # fmt: skip
    return manifest
