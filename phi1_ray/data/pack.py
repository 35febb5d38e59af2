"""Tokenizing documents and packing the token stream into fixed blocks of ``seq_len + 1`` tokens.

The paper's recipe: every document tokenized, ``<|endoftext|>`` after each, all concatenated into one stream and
cut into blocks with no padding. :class:`Packer` carries the remainder of one batch into the next, so a whole
stream drops at most one partial block (its tail), which it reports.
"""

from __future__ import annotations

import hashlib
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa

from phi1_ray.errors import ConfigError


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (the codegen tokenizer's 50,295 do), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition: shards say exactly which tokenizer made them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DocumentTokenizer:
    """Batch tokenization with the Rust fast tokenizer; each document followed by EOS.

    Matches ``tokenizer(texts)["input_ids"]`` of the ``transformers`` tokenizer it was made from (same backend,
    special tokens added as that tokenizer adds them) plus ``[eos]``. Holds only the ``tokenizers`` backend, so
    workers need not import transformers (seconds per process).
    """

    def __init__(self, backend: Any, eos: int, vocab_size: int, loss_on: str = "all") -> None:
        self.backend, self.eos, self.vocab_size, self.loss_on = backend, eos, vocab_size, loss_on
        self.dtype = token_dtype(vocab_size)

    @classmethod
    def from_hf(cls, tokenizer: Any, loss_on: str = "all") -> DocumentTokenizer:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; documents need <|endoftext|> between them")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"{type(tokenizer).__name__} is a slow tokenizer; the data pipeline needs a fast one")
        return cls(backend, int(tokenizer.eos_token_id), len(tokenizer), loss_on)

    def spec(self) -> dict[str, Any]:
        """What a worker needs to rebuild this tokenizer: plain values, cheap to ship."""
        return {"tokenizer_json": self.backend.to_str(), "eos": self.eos, "vocab_size": self.vocab_size}

    @classmethod
    def from_spec(cls, tokenizer_json: str, eos: int, vocab_size: int, loss_on: str = "all") -> DocumentTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(tokenizer_json), eos, vocab_size, loss_on)

    def _encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def __call__(
        self, texts: list[str], completions: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(flat ids, per-document lengths, flat loss mask or None) for a batch of documents.

        With ``completions`` (finetuning records) a document is ``tok(prompt) + tok(completion) + [eos]`` and,
        with ``loss_on="completion"``, the mask is 0 on prompt tokens.
        """
        ids = self._encode(texts)
        mask = None
        if completions is not None:
            tails = self._encode(completions, add_special_tokens=False)
            if self.loss_on == "completion":
                mask = np.fromiter(
                    chain.from_iterable([0] * len(p) + [1] * (len(c) + 1) for p, c in zip(ids, tails)),
                    dtype=np.uint8,
                )
            ids = [p + c for p, c in zip(ids, tails)]
        for doc in ids:
            doc.append(self.eos)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths, mask


class Packer:
    """Cuts a token stream into blocks of ``block_len``, carrying the remainder across batches.

    Optionally packs a parallel loss mask, and records where documents start inside each block.
    """

    def __init__(self, block_len: int, dtype: np.dtype, with_mask: bool = False, doc_starts: bool = False) -> None:
        self.block_len = block_len
        self.carry = np.empty(0, dtype=dtype)
        self.carry_mask = np.empty(0, dtype=np.uint8) if with_mask else None
        self.carry_starts = np.empty(0, dtype=np.int64) if doc_starts else None
        self.tokens_in = 0
        self.blocks_out = 0

    @property
    def dropped_tokens(self) -> int:
        """Tokens that would be dropped if the stream ended now (the partial tail)."""
        return len(self.carry)

    def empty(self) -> dict[str, Any]:
        """No blocks, with the same columns as :meth:`push` returns."""
        out: dict[str, Any] = {
            "tokens": np.empty((0, self.block_len), dtype=self.carry.dtype),
            "index": np.empty(0, dtype=np.int64),
        }
        if self.carry_mask is not None:
            out["loss_mask"] = np.empty((0, self.block_len), dtype=np.uint8)
        if self.carry_starts is not None:
            out["doc_starts"] = []
        return out

    def push(
        self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Add a batch; return the blocks it completes: ``tokens`` (n, block_len) and the optional columns."""
        L = self.block_len
        self.tokens_in += len(ids)
        buf = np.concatenate([self.carry, ids.astype(self.carry.dtype, copy=False)])
        n = len(buf) // L
        out: dict[str, Any] = {"tokens": buf[: n * L].reshape(n, L)}
        self.carry = buf[n * L :].copy()
        if self.carry_mask is not None:
            if mask is None:
                mask = np.ones(len(ids), dtype=np.uint8)
            mbuf = np.concatenate([self.carry_mask, mask])
            out["loss_mask"] = mbuf[: n * L].reshape(n, L)
            self.carry_mask = mbuf[n * L :].copy()
        if self.carry_starts is not None:
            base = len(buf) - len(ids)  # where this batch begins in buf (after the old carry)
            starts = np.concatenate([self.carry_starts, base + np.concatenate([[0], np.cumsum(lengths)[:-1]])])
            block_of = starts // L
            out["doc_starts"] = [starts[block_of == b] - b * L for b in range(n)]
            self.carry_starts = starts[block_of >= n] - n * L
        out["index"] = np.arange(self.blocks_out, self.blocks_out + n, dtype=np.int64)
        self.blocks_out += n
        return out


def blocks_table(blocks: dict[str, Any]) -> pa.Table:
    """Blocks as an Arrow table, one row per block: ``tokens`` (and ``loss_mask``, ``doc_starts``) as list
    columns, and ``index``, the block's position in its stream."""
    tokens = blocks["tokens"]
    n, L = tokens.shape
    offsets = pa.array(np.arange(0, (n + 1) * L, L, dtype=np.int32))
    columns = {"tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1)))}
    if "index" in blocks:
        columns["index"] = pa.array(blocks["index"], type=pa.int64())
    if "loss_mask" in blocks:
        columns["loss_mask"] = pa.ListArray.from_arrays(offsets, pa.array(blocks["loss_mask"].reshape(-1)))
    if "doc_starts" in blocks:
        starts = blocks["doc_starts"]
        counts = np.array([len(s) for s in starts], dtype=np.int32)
        start_offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        values = np.concatenate(starts).astype(np.int32) if starts else np.empty(0, dtype=np.int32)
        columns["doc_starts"] = pa.ListArray.from_arrays(start_offsets, pa.array(values))
    return pa.table(columns)


def table_to_blocks(table: pa.Table, column: str = "tokens") -> np.ndarray:
    """(n, block_len) array from a list column, without a copy per row."""
    array = table.column(column).combine_chunks()
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), -1) if len(array) else values.reshape(0, 0)


def shuffle_keys(index: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random sort key per block index (splitmix64): the same permutation on any block layout."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
