"""The learned quality filter of CodeTextbook (the paper: GPT-4 labels ~100k files for "educational value for a
student whose goal is to learn basic coding concepts"; a random forest on embeddings predicts it for the rest).

1. a seeded sample of the corpus is labelled by the teacher (a 0-10 score parsed from its reply; at or above
   ``positive_score`` is educational), or labels come from a JSONL file (``text``, ``label``);
2. the labelled documents are embedded (:mod:`phi1_ray.datagen.embed`) and a scikit-learn random forest is
   trained on part of them; precision, recall and ROC-AUC are measured on the held-out rest;
3. the whole corpus is scored on Ray Data (actors holding the encoder and the forest) and the documents at or
   above ``threshold`` are kept, with their ``score``.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from phi1_ray import storage
from phi1_ray.data.config import DataConfig, SourceConfig
from phi1_ray.data.read import FileEntry, ReadReport, list_files, read_file
from phi1_ray.datagen.config import EncoderConfig, FilterConfig
from phi1_ray.datagen.embed import Encoder
from phi1_ray.datagen.prompts import annotation_prompt
from phi1_ray.errors import DataError

SCORE = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)\b")
_DOC_SCHEMA = pa.schema([("path", pa.string()), ("line", pa.int64()), ("text", pa.string())])


def parse_score(reply: str | None) -> float | None:
    """The teacher's 0-10 score: ``Score: N`` first, else the first number in range; None if there is none."""
    if not reply:
        return None
    for pattern in (SCORE, NUMBER):
        for match in pattern.finditer(reply):
            value = float(match.group(1))
            if 0.0 <= value <= 10.0:
                return value
    return None


def corpus_dataset(sources: list[SourceConfig], files_per_task: int = 32) -> Any:
    """Every document of ``sources`` as rows (path, line, text) of a Ray Dataset, files read in parallel."""
    import ray.data

    groups = []
    for source in sources:
        entries = list_files([source])
        for start in range(0, len(entries), files_per_task):
            groups.append(
                {"source": source.model_dump(), "paths": [e.path for e in entries[start : start + files_per_task]]}
            )
    if not groups:
        raise DataError("the filter's sources hold no documents")

    def expand(batch: pa.Table) -> pa.Table:
        rows: dict[str, list] = {"path": [], "line": [], "text": []}
        for group in batch.to_pylist():
            source = SourceConfig(**group["source"])
            cfg, report = DataConfig(sources=[source]), ReadReport()
            for path in group["paths"]:
                for doc in read_file(FileEntry(0, path, 0), source, cfg, report):
                    rows["path"].append(doc.path)
                    rows["line"].append(doc.line)
                    rows["text"].append(doc.text)
        return pa.table(rows, schema=_DOC_SCHEMA)

    return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        expand, batch_format="pyarrow", batch_size=1
    )


def heuristic_label(text: str) -> int:
    """1 for documented, parseable code: most functions and classes carry a docstring and a tenth of the lines are
    comments or docstrings. A teacher-free stand-in (``labels: heuristic``) for offline runs; the paper's labels
    come from a teacher."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return 0
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if not defs:
        return 0
    documented = sum(ast.get_docstring(n) is not None for n in defs) / len(defs)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    comments = sum(ln.startswith("#") for ln in lines)
    doc_lines = sum(len((ast.get_docstring(n) or "").splitlines()) for n in defs)
    return int(documented >= 0.5 and comments + doc_lines >= 0.1 * len(lines))


def read_labels(path: str) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], int(row["label"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{number}: a label needs 'text' and 'label' (0 or 1): {exc}") from None
        if label not in (0, 1):
            raise DataError(f"{path}:{number}: label must be 0 or 1, got {label}")
        texts.append(text)
        labels.append(label)
    return texts, np.array(labels)


def annotate(
    sample: list[str], cfg: FilterConfig, cache_dir: str | None, log: Any
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Teacher scores of the sample (and the teacher's usage); documents whose reply has no score are left out."""
    import ray.data

    from phi1_ray.datagen.output import usage_of_rows
    from phi1_ray.datagen.teacher import call_teacher, teacher_blocks

    prompts = [{"row": i, "prompt": annotation_prompt(t, cfg.annotate_chars)} for i, t in enumerate(sample)]
    blocks = teacher_blocks(len(prompts), cfg.teacher)
    ds = call_teacher(ray.data.from_items(prompts, override_num_blocks=blocks), cfg.teacher, cache_dir)
    rows = sorted(ds.drop_columns(["prompt"]).take_all(), key=lambda r: r["row"])
    texts, labels, unparsed = [], [], 0
    for r in rows:
        score = parse_score(r["reply"])
        if score is None:
            unparsed += 1
            continue
        texts.append(sample[r["row"]])
        labels.append(int(score >= cfg.positive_score))
    log(f"[filter] teacher labelled {len(texts)} of {len(sample)} documents ({unparsed} replies without a score); "
        f"{sum(labels)} educational")  # fmt: skip
    prices = (cfg.teacher.price_per_1k_prompt, cfg.teacher.price_per_1k_completion)
    return texts, np.array(labels), usage_of_rows(rows, prices)


def train_classifier(x: np.ndarray, y: np.ndarray, cfg: FilterConfig) -> tuple[Any, dict[str, Any]]:
    """A random forest on (x, y) with held-out precision / recall / ROC-AUC."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    if len(set(y.tolist())) < 2:
        raise DataError(f"the labelled documents are all of one class ({int(y[0]) if len(y) else '-'}): "
                        "a classifier needs both (more documents to annotate, or another positive_score)")  # fmt: skip
    stratify = y if min(np.bincount(y)) >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=cfg.holdout, random_state=cfg.seed, stratify=stratify
    )
    forest = RandomForestClassifier(n_estimators=cfg.trees, random_state=cfg.seed, n_jobs=1, class_weight="balanced")
    forest.fit(x_train, y_train)
    proba = forest.predict_proba(x_test)[:, list(forest.classes_).index(1)]
    predicted = (proba >= cfg.threshold).astype(int)
    metrics = {
        "train": int(len(y_train)),
        "held_out": int(len(y_test)),
        "positives": int(y.sum()),
        "precision": float(precision_score(y_test, predicted, zero_division=0)),
        "recall": float(recall_score(y_test, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(y_test, proba)) if len(set(y_test.tolist())) == 2 else None,
    }
    return forest, metrics


class QualityScorer:
    """Ray Data actor: ``score`` = predicted probability of being educational; ``status`` ok / below_threshold."""

    def __init__(self, encoder: dict[str, Any], forest: bytes, threshold: float) -> None:
        self.encoder = Encoder(EncoderConfig(**encoder))
        self.forest = pickle.loads(forest)
        self.positive = list(self.forest.classes_).index(1)
        self.threshold = threshold

    def __call__(self, table: pa.Table) -> pa.Table:
        x = self.encoder.embed(table.column("text").to_pylist())
        scores = self.forest.predict_proba(x)[:, self.positive] if len(x) else np.zeros(0)
        status = ["ok" if s >= self.threshold else "below_threshold" for s in scores]
        return table.append_column("score", pa.array(scores, pa.float64())).append_column("status", pa.array(status))


def run_filter(cfg: FilterConfig, log: Any = print) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    from phi1_ray.datagen.generate import default_cache_dir
    from phi1_ray.datagen.output import finished, write_dataset, write_manifest
    from phi1_ray.tracking import log_metrics, mlflow_run

    done = finished(cfg.out, log)
    if done is not None:
        return done
    corpus = corpus_dataset(cfg.sources).materialize()
    total = corpus.count()
    usage: dict[str, Any] = {}
    fraction = min(1.0, 1.5 * cfg.annotate / max(total, 1))
    sample = [r["text"] for r in corpus.random_sample(fraction, seed=cfg.seed).take(cfg.annotate)]
    if cfg.labels == "heuristic":
        texts, labels = sample, np.array([heuristic_label(t) for t in sample])
        labelled_by = "the documented-code heuristic"
    elif cfg.labels:
        texts, labels = read_labels(cfg.labels)
        labelled_by = f"labels file {cfg.labels}"
    else:
        cache_dir = cfg.teacher.cache_dir or default_cache_dir(cfg.out) or None
        texts, labels, usage = annotate(sample, cfg, cache_dir, log)
        labelled_by = f"teacher {cfg.teacher.model}"
    encoder = Encoder(cfg.encoder)
    forest, metrics = train_classifier(encoder.embed(texts), labels, cfg)
    log(f"[filter] random forest ({cfg.trees} trees) on {labelled_by}: held-out precision {metrics['precision']:.3f}, "
        f"recall {metrics['recall']:.3f}, ROC-AUC {metrics['roc_auc'] if metrics['roc_auc'] is None else round(metrics['roc_auc'], 3)} "  # noqa: E501
        f"({metrics['held_out']} documents)")  # fmt: skip
    scored = corpus.map_batches(
        QualityScorer,
        fn_constructor_kwargs={
            "encoder": cfg.encoder.model_dump(),
            "forest": pickle.dumps(forest),
            "threshold": cfg.threshold,
        },
        batch_format="pyarrow",
        batch_size=64,
        compute=ActorPoolStrategy(size=1),
    )
    written = write_dataset(scored, cfg.out, cfg.rows_per_shard)
    manifest = write_manifest(
        cfg.out,
        "filtered_code",
        written,
        {"stage": "filter_code", "documents": total, "labelled": len(texts), "labelled_by": labelled_by,
         "threshold": cfg.threshold, "classifier": metrics},
        classifier=metrics,
        encoder=cfg.encoder.path or f"random {cfg.encoder.random_init}",
        seeds={"seed": cfg.seed},
        usage=usage,
    )  # fmt: skip
    out_dir = Path("runs") if storage.is_uri(cfg.out) else Path(cfg.out)
    with mlflow_run(cfg.mlflow, out_dir.parent, "filter_code", cfg):
        log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_metrics({"documents": total, "kept": manifest["rows"]})
    log(f"[filter] kept {manifest['rows']:,} of {total:,} documents (score >= {cfg.threshold}) -> {cfg.out}")
    return manifest
