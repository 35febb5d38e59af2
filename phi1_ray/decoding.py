"""The one decoding loop of phi1_ray: prefill, decode step and sampling over a slot KV cache, no threads, no Ray.

A :class:`Decoder` preallocates a :class:`SlotKVCache` of ``slots`` rows. Each running :class:`DecodeSequence`
owns one row and carries its own positions, sampling parameters, random generator, token budget and
:class:`TextRow` (incremental detokenization, stop sequences, EOS).

- :meth:`Decoder.add` prefills a group of prompts in one forward pass, left-padded when their lengths differ, and
  copies each prompt's keys/values into the slots of its ``n`` sequences at the same cache index as in the prefill:
  the sequences of one ``add`` keep that left-padded layout (a row's ``offset`` is its padding), so they all write
  at one cache index per step. It then samples their first tokens.
- :meth:`Decoder.step` runs every running sequence in one forward pass, one query token per row, each row reading
  only its own cached keys, and samples the next tokens. Rows in consecutive slots are read as a view of the cache,
  others are gathered; rows that write at one cache index do it with one slice copy, others each at its own; a mask
  (and explicit positions) is built only when some row has padding or the rows' cache indices differ. A batch of
  :mod:`phi1_ray.generate` therefore decodes as a plain left-padded batch; the serving engine's rows from
  different requests take the general path.
- Sampling is :func:`sample_next` for every row: greedy rows in one ``argmax``; the sampled sequences of one
  ``add`` call that share a generator (a :class:`SampleGroup`: all rows of a :mod:`phi1_ray.generate` call; a
  single choice of a serving request) in one call over a (width, V) matrix in which rows that have finished are
  uniform placeholders, so a row's draws depend on its seed and column, not on when the others finish.
- A sequence that finishes (EOS, a stop sequence, its budget) leaves the batch and frees its slot at once.

Both callers drive this loop synchronously: the batch functions of :mod:`phi1_ray.generate` add all their prompts
and step until nothing runs, in the caller's thread; :class:`phi1_ray.serving.engine.InferenceEngine` steps it from
its background thread and adds requests between steps (continuous batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from phi1_ray.config import SamplingConfig
from phi1_ray.errors import GenerationError
from phi1_ray.model import KVCache, ModelConfig, Phi1ForCausalLM


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


def seeded(seed: int | None, params: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed`` for sampled decoding; None when greedy or unseeded (torch's global RNG)."""
    if seed is None or params.temperature == 0.0:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def check_prompt_lengths(lengths: Sequence[int], context: int) -> None:
    """Raise GenerationError for an empty prompt or one longer than ``context`` tokens."""
    for i, n in enumerate(lengths):
        if n == 0:
            raise GenerationError(f"prompt {i} is empty: at least one token is needed")
        if n > context:
            raise GenerationError(f"prompt {i} is {n} tokens, longer than the model's context of {context} tokens")


class TextRow:
    """Incremental detokenization of one row: stop sequences, EOS, and text that is safe to emit.

    Without a tokenizer it only collects token ids and stops at EOS (no text, no stop sequences).
    """

    def __init__(self, tokenizer: Any | None, eos: int | None, stop: Sequence[str]) -> None:
        self.tokenizer, self.eos = tokenizer, eos
        self.stop = [s for s in stop if s] if tokenizer is not None else []
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
        if self.tokenizer is None:
            return ""
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
        """End the row ("length" unless it stopped); return the text still held back."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._flush()


class SlotKVCache:
    """Keys/values of every running sequence, one slot (row) each: (n_layer, slots, n_head, max_len, head_dim).

    Before a decode step :meth:`bind` says which slots run, at which cache index each writes and where each one's
    keys start; the model's attention then calls :meth:`update` as it would on a :class:`KVCache`.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.n_layer, slots, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = device
        self.length = 0  # the cache index all bound rows write at, when they share one (rotary positions then)
        self.rows: slice | torch.Tensor = slice(0, 0)  # the bound slots, read back
        self.write_rows: slice | torch.Tensor = slice(0, 0)  # with write_at: where each bound row writes
        self.write_at: slice | torch.Tensor = slice(0, 0)
        self.span = 0
        self.uniform = True  # every bound row writes at one cache index
        self.pad: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B, 1) rotary positions, when they are not ``length``
        self._index = torch.arange(max_len, device=device)

    def fill(self, slot: int, prefix: KVCache, row: int, start: int) -> None:
        """Copy ``prefix``'s ``row`` (a prefilled prompt) from cache index ``start`` on into ``slot``."""
        end = prefix.length
        self.k[:, slot, :, start:end] = prefix.k[:, row, :, start:end]
        self.v[:, slot, :, start:end] = prefix.v[:, row, :, start:end]

    def bind(
        self, slots: list[int], offsets: list[int], positions: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Bind the rows of the next step: row i writes at cache index ``offsets[i] + positions[i]`` and reads from
        ``offsets[i]`` on. Returns (position_ids (B, 1), key_valid (B, span)) for the model, (None, None) when no
        row has an offset and all write at one index (``length``; rotary positions follow it)."""
        ends = [o + p for o, p in zip(offsets, positions)]
        first, count = slots[0], len(slots)
        contiguous = slots == list(range(first, first + count))
        self.uniform = min(ends) == max(ends)
        self.span, self.length = max(ends) + 1, ends[0]
        self.rows = slice(first, first + count) if contiguous else torch.tensor(slots, device=self.device)
        if contiguous and self.uniform:
            self.write_rows, self.write_at = self.rows, slice(ends[0], ends[0] + 1)
        else:
            self.write_rows = self.rows if not contiguous else torch.tensor(slots, device=self.device)
            self.write_at = torch.tensor(ends, device=self.device)
        self.pad = None  # (B, max_len): False before each row's offset
        if any(offsets):
            self.pad = self._index[None, :] >= torch.tensor(offsets, device=self.device)[:, None]
        self.positions = None
        if self.pad is not None or not self.uniform:
            self.positions = torch.tensor(positions, device=self.device)[:, None]
        return self._model_inputs()

    def advance(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows bound last, each one token further (the next step of an unchanged batch); as :meth:`bind`."""
        self.span += 1
        if isinstance(self.write_at, slice):
            self.write_at = slice(self.write_at.start + 1, self.write_at.stop + 1)
            self.length = self.write_at.start  # (the model adds each forward's length to it: set, not added)
        else:
            self.write_at += 1
        if self.positions is not None:
            self.positions += 1
        return self._model_inputs()

    def _model_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.positions is None:
            return None, None
        key_valid = None if self.pad is None else self.pad[:, : self.span]
        if not self.uniform:  # a row's keys end at its own index
            reach = self._index[None, : self.span] <= self.write_at[:, None]
            key_valid = reach if key_valid is None else key_valid & reach
        return self.positions, key_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_head, 1, head_dim) for the bound rows.
        if isinstance(self.write_at, slice):  # one cache index for all: a plain slice copy
            self.k[layer, self.write_rows, :, self.write_at] = k
            self.v[layer, self.write_rows, :, self.write_at] = v
        else:  # each row at its own index
            self.k[layer, self.write_rows, :, self.write_at] = k[:, :, 0]
            self.v[layer, self.write_rows, :, self.write_at] = v[:, :, 0]
        # Consecutive slots read a view; other slots are gathered into a copy: (B, n_head, span, head_dim).
        return self.k[layer, self.rows, :, : self.span], self.v[layer, self.rows, :, : self.span]


@dataclass(eq=False)
class SampleGroup:
    """Sequences sampled together: one parameter set, one generator, ``width`` columns (one per sequence)."""

    params: SamplingConfig
    generator: torch.Generator | None
    width: int = 0


@dataclass(eq=False)
class DecodeSequence:
    """One sequence being decoded: its slot, position, parameters, budget and text so far."""

    text: TextRow
    params: SamplingConfig
    group: SampleGroup
    column: int  # its row in the group's sampling matrix
    budget: int  # new tokens it may take (max_new_tokens, bounded by the cache)
    offset: int = 0  # cache index of its first token: the left padding of its prompt in the prefill
    index: int = 0  # prompt index x n + choice index, within its ``add`` call
    owner: Any = None  # whatever the caller ties it to (the engine: its request)
    slot: int = -1
    position: int = 0  # tokens in its cache slot so far
    last: int = 0  # the token sampled last, not yet in the cache
    produced: int = 0

    @property
    def finished(self) -> bool:
        return self.text.finish_reason is not None

    def completion(self) -> Completion:
        return Completion(self.text.text, self.text.token_ids, self.text.finish_reason or "length")


Event = tuple[DecodeSequence, str]  # a sequence that took a token (or finished), and the text it adds


class Decoder:
    """Prefill, decode steps and sampling for up to ``slots`` sequences of at most ``max_len`` positions each
    (see the module docstring). ``tokenizer`` None: token ids only, no text or stop sequences."""

    def __init__(
        self,
        model: Phi1ForCausalLM,
        slots: int,
        max_len: int,
        tokenizer: Any | None = None,
        eos: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.n_positions
        self.max_len = min(max_len, self.context)
        self.eos = model.config.eos_token_id if eos is None else eos
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = SlotKVCache(model.config, slots, self.max_len, self.dtype, self.device)
        self.running: list[DecodeSequence] = []
        self._inputs: torch.Tensor | None = None  # (B, 1): the tokens the last step sampled, while ``running`` holds
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: slots 0, 1, 2, ... in order

    @property
    def free_slots(self) -> list[int]:
        """The slots no sequence holds."""
        return list(self._free)

    @torch.inference_mode()
    def add(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingConfig,
        generators: Sequence[torch.Generator | None],
        n: int = 1,
        owner: Any = None,
    ) -> list[Event]:
        """Start ``n`` sequences per prompt (``generators``: one per sequence, prompt-major); prefill the prompts
        together and sample each sequence's first token. One event per new sequence, in order; a sequence without
        budget (``max_new_tokens=0``) is finished at once, without a token or a slot."""
        lengths = [len(p) for p in prompts]
        check_prompt_lengths(lengths, self.context)
        if max(lengths) > self.max_len:
            raise GenerationError(f"a prompt of {max(lengths)} tokens does not fit this decoder's {self.max_len}")
        seqs = self._sequences(lengths, params, generators, n, owner)
        live = [s for s in seqs if s.budget > 0]
        if len(live) > len(self._free):
            raise GenerationError(f"{len(live)} sequences asked for, {len(self._free)} cache slots free")
        deltas: dict[int, str] = {}
        if live:
            prefix, logits = self._prefill(prompts)
            rows = [seq.index // n for seq in live]
            for seq, row in zip(live, rows):
                seq.slot, seq.position = self._free.pop(), lengths[row]
                self.running.append(seq)  # from here on, a failure frees its slot through clear()
                self.cache.fill(seq.slot, prefix, row, seq.offset)
            logits = logits if rows == list(range(len(prompts))) else logits[rows]  # (live, V)
            deltas = {seq.index: delta for seq, delta in self._advance(live, self._sample(live, logits).tolist(), 0)}
            self._inputs = None  # the batch changed
        for seq in seqs:
            if seq.budget <= 0:
                seq.text.finish()
        return [(seq, deltas.get(seq.index, "")) for seq in seqs]

    def _sequences(
        self,
        lengths: list[int],
        params: SamplingConfig,
        generators: Sequence[torch.Generator | None],
        n: int,
        owner: Any,
    ) -> list[DecodeSequence]:
        """``n`` new sequences per prompt; those given the same generator form one :class:`SampleGroup`."""
        if len(generators) != len(lengths) * n:
            raise ValueError(f"{len(generators)} generators for {len(lengths)} prompts x n={n}")
        groups: dict[int, SampleGroup] = {}
        seqs = []
        longest = max(lengths)
        for index, generator in enumerate(generators):
            group = groups.setdefault(id(generator), SampleGroup(params, generator))
            seq = DecodeSequence(
                text=TextRow(self.tokenizer, self.eos, params.stop),
                params=params,
                group=group,
                column=group.width,
                budget=min(params.max_new_tokens, self.max_len - longest),  # its last token is not cached
                offset=longest - lengths[index // n],
                index=index,
                owner=owner,
            )
            group.width += 1
            seqs.append(seq)
        return seqs

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVCache, torch.Tensor]:
        """One forward pass over the left-padded prompts: their cache (B, longest) and last logits (B, V)."""
        lengths = [len(p) for p in prompts]
        B, longest = len(prompts), max(lengths)
        ids = torch.zeros(B, longest, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        key_valid = position_ids = None
        if min(lengths) != longest:
            key_valid = torch.ones(B, longest, dtype=torch.bool, device=self.device)
            for row, n in enumerate(lengths):
                key_valid[row, : longest - n] = False
            position_ids = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        prefix = KVCache(self.model.config, B, longest, self.dtype, self.device)
        logits = self.model(
            ids.to(self.device), position_ids=position_ids, key_valid=key_valid, cache=prefix, last_only=True
        )[:, -1]
        return prefix, logits

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One forward pass for every running sequence; each samples its next token with its own parameters."""
        seqs = list(self.running)
        if not seqs:
            return []
        tokens = self._inputs  # the last step's tokens, while the batch is unchanged
        if tokens is None:
            slots, offsets, positions = [s.slot for s in seqs], [s.offset for s in seqs], [s.position for s in seqs]
            position_ids, key_valid = self.cache.bind(slots, offsets, positions)
            tokens = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=self.device)
        else:
            position_ids, key_valid = self.cache.advance()
        out = self.model(tokens, position_ids=position_ids, key_valid=key_valid, cache=self.cache, last_only=True)
        sampled = self._sample(seqs, out[:, -1])  # (B,)
        self._inputs = sampled[:, None]
        return self._advance(seqs, sampled.tolist(), cached=1)

    def _sample(self, seqs: list[DecodeSequence], logits: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) of ``seqs`` from their logits (B, V): greedy rows at once, sampled rows per group."""
        if len(seqs) == 1:
            return self._draw(seqs, logits)
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(0 if seq.params.temperature == 0.0 else id(seq.group), []).append(i)
        if len(groups) == 1:
            return self._draw(seqs, logits)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            tokens[rows] = self._draw([seqs[i] for i in rows], logits[rows])
        return tokens

    @staticmethod
    def _draw(seqs: list[DecodeSequence], logits: torch.Tensor) -> torch.Tensor:
        """Tokens for greedy rows, or for running rows of one group (their columns of a (width, V) matrix)."""
        if seqs[0].params.temperature == 0.0:
            return logits.argmax(dim=-1)
        group, columns = seqs[0].group, [seq.column for seq in seqs]
        if columns == list(range(group.width)):
            return sample_next(logits, group.params, group.generator)
        full = logits.new_zeros(group.width, logits.size(-1))  # finished rows: uniform placeholders
        full[columns] = logits
        return sample_next(full, group.params, group.generator)[columns]

    def _advance(self, seqs: list[DecodeSequence], tokens: list[int], cached: int) -> list[Event]:
        """Give each sequence its new token (``cached``: 1 when the forward pass cached the one before)."""
        events = []
        for seq, token in zip(seqs, tokens):
            seq.position += cached
            seq.last = token
            seq.produced += 1
            delta = seq.text.push(token)
            if seq.text.finish_reason is not None or seq.produced >= seq.budget:
                delta += seq.text.finish()
                self.remove(seq)
            events.append((seq, delta))
        return events

    def remove(self, seq: DecodeSequence) -> None:
        """Stop decoding ``seq`` (finished or cancelled) and free its slot."""
        if seq in self.running:
            self.running.remove(seq)
            self._inputs = None
        if seq.slot >= 0:
            self._free.append(seq.slot)
            seq.slot = -1

    def clear(self) -> list[DecodeSequence]:
        """Drop every running sequence (after a failed step); return them."""
        dropped = list(self.running)
        for seq in dropped:
            self.remove(seq)
        return dropped
