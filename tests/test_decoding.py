"""The decoding loop shared by batch generation and the serving engine, driven directly: sequences added at
different steps (the engine's continuous batching) decode as they do alone."""

import torch

from phi1_ray.config import SamplingConfig
from phi1_ray.decoding import Decoder, seeded
from phi1_ray.generate import generate_ids
from tests.conftest import random_model

NEVER = -1  # an EOS id no model emits


def test_sequences_joining_and_leaving_a_running_batch_decode_as_alone():
    model = random_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42, 43], [7, 7]]
    budgets = [12, 5, 9, 7]
    alone = [generate_ids(model, [p], SamplingConfig(max_new_tokens=n), NEVER)[0] for p, n in zip(prompts, budgets)]
    decoder = Decoder(model, slots=3, max_len=64, eos=NEVER)
    out: dict[int, list[int]] = {}
    for i in range(2):  # two sequences in slots 0 and 1, then one more with a different length two steps later
        ((seq, _),) = decoder.add([prompts[i]], SamplingConfig(max_new_tokens=budgets[i]), [None])
        out[i] = seq.text.token_ids
    decoder.step()
    decoder.step()
    ((seq, _),) = decoder.add([prompts[2]], SamplingConfig(max_new_tokens=budgets[2]), [None])
    out[2] = seq.text.token_ids
    while len(decoder.running) == 3:  # the second ends first and frees slot 1: the fourth takes it
        decoder.step()
    assert decoder.free_slots == [1]
    ((seq, _),) = decoder.add([prompts[3]], SamplingConfig(max_new_tokens=budgets[3]), [None])
    out[3] = seq.text.token_ids
    while decoder.running:
        decoder.step()
    assert [out[i] for i in range(4)] == alone
    assert sorted(decoder.free_slots) == [0, 1, 2]


def test_a_seeded_row_does_not_depend_on_when_its_batch_mates_finish():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5]]
    hot = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=3)
    full = generate_ids(model, prompts, hot, NEVER)
    decoder = Decoder(model, slots=2, max_len=64, eos=NEVER)
    generator = seeded(hot.seed, hot, torch.device("cpu"))
    events = decoder.add(prompts, hot, [generator, generator])
    first, second = (seq for seq, _ in events)
    for _ in range(4):
        decoder.step()
    decoder.remove(second)  # the second row leaves early (as at EOS); the first keeps its own draws
    while decoder.running:
        decoder.step()
    assert first.text.token_ids == full[0] and second.text.token_ids == full[1][:5]
