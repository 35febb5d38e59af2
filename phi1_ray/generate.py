"""Incremental decoding with a KV cache: batches of prompts of different lengths, greedy or sampled, stop
sequences and EOS, and a streaming iterator of text deltas.

Prompts of a batch are left-padded; each row keeps its own positions and finishes on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from phi1_ray.config import SamplingConfig
from phi1_ray.errors import GenerationError
from phi1_ray.model import KVCache, Phi1ForCausalLM


@dataclass
class Completion:
    """One finished row: its text (cut before any stop sequence), the new token ids and why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS or a stop sequence) or "length"


def sample_next(logits: torch.Tensor, params: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, top-p sampling."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_prompt_lengths(lengths: Sequence[int], context: int) -> None:
    for i, n in enumerate(lengths):
        if n == 0:
            raise GenerationError(f"prompt {i} is empty: at least one token is needed")
        if n > context:
            raise GenerationError(f"prompt {i} is {n} tokens, longer than the model's context of {context} tokens")


@torch.inference_mode()
def decode_steps(
    model: Phi1ForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingConfig
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), step after step, until ``max_new_tokens`` or the context is full.

    The caller decides when rows are finished and simply stops iterating when all are.
    """
    cfg = model.config
    lengths = [len(p) for p in prompts]
    check_prompt_lengths(lengths, cfg.n_positions)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, longest = len(prompts), max(lengths)
    budget = min(params.max_new_tokens, cfg.n_positions - longest)
    if budget <= 0:
        return

    ids = torch.zeros(B, longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
    ids = ids.to(device)
    padded = min(lengths) != longest
    key_valid = position_ids = None
    if padded:
        key_valid = torch.ones(B, longest + budget, dtype=torch.bool, device=device)
        for row, n in enumerate(lengths):
            key_valid[row, : longest - n] = False
        position_ids = (key_valid[:, :longest].long().cumsum(dim=1) - 1).clamp(min=0)

    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = KVCache(cfg, B, longest + budget, dtype, device)
    logits = model(
        ids,
        position_ids=position_ids,
        key_valid=key_valid[:, :longest] if padded else None,
        cache=cache,
        last_only=True,
    )[:, -1]
    next_pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    for step in range(budget):
        token = sample_next(logits, params, generator)
        yield token
        if step == budget - 1:
            return
        logits = model(
            token[:, None],
            position_ids=next_pos if padded else None,  # unpadded rows: positions follow the cache
            key_valid=key_valid[:, : longest + step + 1] if padded else None,
            cache=cache,
            last_only=True,
        )[:, -1]
        next_pos = next_pos + 1


def generate_ids(
    model: Phi1ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingConfig,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt; a row ends at EOS (not included) or after ``max_new_tokens``."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for token in decode_steps(model, prompts, params):
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if t == eos:
                done[row] = True
            else:
                out[row].append(t)
        if all(done):
            break
    return out


class _TextRow:
    """Incremental detokenization of one row: stop sequences, EOS, and text that is safe to emit."""

    def __init__(self, tokenizer: Any, eos: int | None, stop: Sequence[str]) -> None:
        self.tokenizer, self.eos, self.stop = tokenizer, eos, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Add a token; return the new text that can be shown (held back: a possible stop-sequence prefix)."""
        if self.finish_reason is not None:
            return ""
        if token == self.eos:
            self.finish_reason = "stop"
            return self._flush()
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return self._flush()
        safe = len(self.text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for its next token
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(max(safe, self.emitted))

    def _take(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def _flush(self) -> str:
        return self._take(len(self.text))

    def finish(self) -> str:
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._flush()


def _encode(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]


def _eos(model: Phi1ForCausalLM, tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return model.config.eos_token_id if eos is None else int(eos)


def generate(
    model: Phi1ForCausalLM, tokenizer: Any, prompts: Sequence[str], params: SamplingConfig
) -> list[Completion]:
    """Complete a batch of text prompts."""
    rows = [_TextRow(tokenizer, _eos(model, tokenizer), params.stop) for _ in prompts]
    for token in decode_steps(model, _encode(tokenizer, prompts), params):
        for row, t in zip(rows, token.tolist()):
            row.push(t)
        if all(r.finish_reason is not None for r in rows):
            break
    for r in rows:
        r.finish()
    return [Completion(r.text, r.token_ids, r.finish_reason or "length") for r in rows]


def stream(model: Phi1ForCausalLM, tokenizer: Any, prompt: str, params: SamplingConfig) -> Iterator[str]:
    """Text deltas of one completion as they are decoded; joined, they equal ``generate(...)[0].text``."""
    row = _TextRow(tokenizer, _eos(model, tokenizer), params.stop)
    for token in decode_steps(model, _encode(tokenizer, [prompt]), params):
        delta = row.push(int(token[0]))
        if delta:
            yield delta
        if row.finish_reason is not None:
            return
    tail = row.finish()
    if tail:
        yield tail
