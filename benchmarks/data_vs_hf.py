"""End-to-end tokenize + pack throughput: phi1_ray's Ray Data pipeline against Hugging Face ``datasets``.

Both start from the same JSONL files of real Python source (the interpreter's standard library and installed
packages, at least 50 MB) and the same tokenizer, and end with blocks of seq_len + 1 tokens on disk:

- ours: ``phi1_ray.data.ray_pipeline.prepare`` (read + clean -> tokenize + EOS -> pack -> Parquet shards);
- theirs: run_clm's recipe, ``load_dataset("json")`` -> batched ``map(tokenize + EOS)`` -> ``map(group_texts)``
  (1,000 documents per batch, run_clm's default), at its best ``num_proc`` of 1 and 2.

Ray start-up is timed and reported on its own; tokenizer loading is outside both timings. ``--quick`` uses a
10 MB corpus and one num_proc. Last line: one JSON object (ratio = their seconds / ours).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from itertools import chain
from pathlib import Path


def build_corpus(out: Path, target_bytes: int, shards: int = 8) -> tuple[list[str], int, int]:
    """JSONL shards of real Python files (stdlib first, then site-packages), one document per file."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = []
    for root in roots:
        files += sorted(p for p in root.rglob("*.py") if root != roots[0] or "site-packages" not in p.parts)
    docs, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= target_bytes:
            break
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(docs) // shards)
    for i in range(shards):
        path = out / f"corpus-{i:02}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i * per : (i + 1) * per]))
        paths.append(str(path))
    return paths, len(docs), total


def run_hf(paths: list[str], tokenizer, block: int, num_proc: int, cache: str) -> tuple[float, int, int]:
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    ds = load_dataset("json", data_files=paths, split="train", cache_dir=cache)
    proc = num_proc if num_proc > 1 else None

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    ds = ds.map(tokenize, batched=True, num_proc=proc, remove_columns=["text"])

    def group_texts(examples):
        ids = list(chain(*examples["input_ids"]))
        n = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, n, block)]}

    grouped = ds.map(group_texts, batched=True, num_proc=proc)
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in ds["input_ids"])
    return seconds, tokens, len(grouped) * block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 60, quick 10)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train a 32k BPE offline)")
    args = parser.parse_args()
    target = int((args.mb or (10 if args.quick else 60)) * 1e6)

    from transformers import AutoTokenizer

    from phi1_ray.data.config import DataConfig, SourceConfig
    from phi1_ray.runtime import RayConfig
    from phi1_ray.tokenizer import train_from_sources

    work = Path(tempfile.mkdtemp(prefix="data_vs_hf_"))
    paths, n_docs, n_bytes = build_corpus(work / "corpus", target)
    tok_dir = args.tokenizer or str(work / "tokenizer")
    if not args.tokenizer:
        train_from_sources([SourceConfig(type="stdlib", max_bytes=8_000_000)], 32768, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    print(f"corpus: {n_docs} files, {n_bytes / 1e6:.1f} MB in {len(paths)} JSONL shards; tokenizer {len(tokenizer)}")

    # Theirs, at the best num_proc.
    hf = {}
    for num_proc in (1,) if args.quick else (1, 2):
        seconds, tokens, kept = run_hf(paths, tokenizer, args.seq_len + 1, num_proc, str(work / f"hf{num_proc}"))
        hf[num_proc] = {"seconds": round(seconds, 2), "tokens": tokens, "kept_tokens": kept}
        print(f"datasets num_proc={num_proc}: {seconds:.1f}s, {tokens / seconds:,.0f} tokens/s")
    best = min(hf, key=lambda k: hf[k]["seconds"])

    # Ours.
    import ray

    from phi1_ray.data.ray_pipeline import prepare
    from phi1_ray.runtime import init_ray

    start = time.perf_counter()
    init_ray(RayConfig())
    ray_startup = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataConfig(sources=[SourceConfig(type="jsonl", paths=paths)], tokenizer=tok_dir, seq_len=args.seq_len)
    start = time.perf_counter()
    manifest = prepare(cfg, work / "ours")
    ours_seconds = time.perf_counter() - start
    kept = manifest["blocks"] * (args.seq_len + 1)
    rate = manifest["tokens"] / ours_seconds
    print(f"phi1_ray: {ours_seconds:.1f}s, {rate:,.0f} tokens/s (Ray start-up {ray_startup:.1f}s)")

    if manifest["tokens"] != hf[best]["tokens"]:
        print(
            f"warning: token counts differ: ours {manifest['tokens']}, datasets {hf[best]['tokens']}", file=sys.stderr
        )
    result = {
        "benchmark": "data_vs_hf",
        "ratio": round(hf[best]["seconds"] / ours_seconds, 3),
        "ours_seconds": round(ours_seconds, 2),
        "ours_tokens_per_s": round(manifest["tokens"] / ours_seconds),
        "hf_seconds": hf[best]["seconds"],
        "hf_tokens_per_s": round(hf[best]["tokens"] / hf[best]["seconds"]),
        "hf_best_num_proc": best,
        "hf_runs": hf,
        "ray_startup_seconds": round(ray_startup, 2),
        "tokens": manifest["tokens"],
        "kept_tokens": {"ours": kept, "hf_run_clm": hf[best]["kept_tokens"], "extra": kept - hf[best]["kept_tokens"]},
        "corpus": {"documents": n_docs, "mb": round(n_bytes / 1e6, 1), "shards": len(paths)},
        "seq_len": args.seq_len,
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
