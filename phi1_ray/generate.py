"""Batch generation: complete a list of prompts (token ids or text), or stream one, with greedy or sampled
decoding, stop sequences and EOS.

Each call runs on the decoding loop the serving engine runs (:class:`phi1_ray.decoding.Decoder`), synchronously in
the caller's thread, with no thread of its own: a decoder with one cache slot per prompt and as many positions as
the longest prompt plus ``max_new_tokens`` (bounded by the context), all prompts added at once (one left-padded
prefill), then decode steps until every row is finished. Each row finishes on its own: EOS, a stop sequence,
``max_new_tokens``, or the context left after the longest prompt. The rows of one call share one generator seeded
with ``params.seed``.

``sample_next``, ``Completion`` and ``check_prompt_lengths`` live in :mod:`phi1_ray.decoding` and are named here too.

:class:`GenerateJobConfig` is ``jobs/generate.py``'s config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from phi1_ray.config import SamplingConfig, Section
from phi1_ray.decoding import (
    Completion,
    Decoder,
    DecodeSequence,
    Event,
    check_prompt_lengths,
    sample_next,
    seeded,
)
from phi1_ray.model import Phi1ForCausalLM


class GenerateJobConfig(Section):
    """``jobs/generate.py``: one prompt completed by a checkpoint."""

    checkpoint: str
    """A phi1_ray checkpoint or training run, a Hugging Face directory or hub id, or an ``s3://`` / ``gs://`` URI."""
    prompt: str
    tokenizer: str | None = None
    """Tokenizer directory or hub id, when the checkpoint has none."""
    sampling: SamplingConfig = SamplingConfig()
    stream: bool = False
    """Print the text as it is decoded."""
    json_output: bool = False
    """Print one JSON object, ``{"completion": str, "token_ids": [int, ...]}`` (the new tokens only)."""


__all__ = ["Completion", "check_prompt_lengths", "decode", "generate", "generate_ids", "sample_next", "stream"]


def _start(
    model: Phi1ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingConfig,
    tokenizer: Any | None,
    eos_token_id: int | None,
) -> tuple[Decoder, list[Event]]:
    """A decoder for this batch, its prompts added: the first token's event of every row, in row order."""
    longest = max((len(p) for p in prompts), default=0)
    decoder = Decoder(model, len(prompts), longest + params.max_new_tokens, tokenizer, eos_token_id)
    generator = seeded(params.seed, params, decoder.device)
    return decoder, decoder.add(prompts, params, [generator] * len(prompts)) if prompts else []


def decode(
    model: Phi1ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingConfig,
    tokenizer: Any | None = None,
    eos_token_id: int | None = None,
) -> Iterator[Event]:
    """(sequence, text delta) for every token as it is decoded: the first token of each row, then one event per
    running row and step, until every row is finished. ``sequence.index`` is the row's index in ``prompts``."""
    decoder, events = _start(model, prompts, params, tokenizer, eos_token_id)
    yield from events
    while decoder.running:
        yield from decoder.step()


def _finished(
    model: Phi1ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingConfig,
    tokenizer: Any | None,
    eos_token_id: int | None,
) -> list[DecodeSequence]:
    """Decode every row to its end; the sequences in row order."""
    decoder, events = _start(model, prompts, params, tokenizer, eos_token_id)
    while decoder.running:
        decoder.step()
    return [seq for seq, _ in events]


def generate_ids(
    model: Phi1ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingConfig,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt; a row ends at EOS (not included) or after ``max_new_tokens``."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    return [seq.text.token_ids for seq in _finished(model, prompts, params, None, eos)]


def _encode(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]


def _eos(model: Phi1ForCausalLM, tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return model.config.eos_token_id if eos is None else int(eos)


def generate(
    model: Phi1ForCausalLM, tokenizer: Any, prompts: Sequence[str], params: SamplingConfig
) -> list[Completion]:
    """Complete a batch of text prompts."""
    rows = _finished(model, _encode(tokenizer, prompts), params, tokenizer, _eos(model, tokenizer))
    return [seq.completion() for seq in rows]


def stream(model: Phi1ForCausalLM, tokenizer: Any, prompt: str, params: SamplingConfig) -> Iterator[str]:
    """Text deltas of one completion as they are decoded; joined, they equal ``generate(...)[0].text``."""
    for _, delta in decode(model, _encode(tokenizer, [prompt]), params, tokenizer, _eos(model, tokenizer)):
        if delta:
            yield delta
