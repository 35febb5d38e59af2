import json

import pytest
import torch

from phi1_ray.checkpoint import save_checkpoint
from phi1_ray.config import SamplingConfig
from phi1_ray.errors import GenerationError
from phi1_ray.generate import generate, generate_ids, stream
from tests.conftest import assert_user_error, random_model, run_job

NEVER = -1  # an EOS id no model emits: rows run to max_new_tokens


def full_recompute_greedy(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence goes through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_decoding_equals_full_recomputation(impl):
    model = random_model(attn_impl=impl)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42, 43]]
    cached = generate_ids(model, prompts, SamplingConfig(max_new_tokens=24), eos_token_id=NEVER)
    assert cached == [full_recompute_greedy(model, p, 24) for p in prompts]
    # A batch gives each row what it gets alone (left padding is invisible).
    assert cached[1] == generate_ids(model, [prompts[1]], SamplingConfig(max_new_tokens=24), eos_token_id=NEVER)[0]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate_ids(model, prompts, SamplingConfig(max_new_tokens=16), NEVER)
    hot = SamplingConfig(max_new_tokens=16, temperature=1.5, seed=7)
    a = generate_ids(model, prompts, hot, NEVER)
    assert a == generate_ids(model, prompts, hot, NEVER)
    assert a != generate_ids(model, prompts, hot.model_copy(update={"seed": 8}), NEVER)
    assert a != greedy
    assert generate_ids(model, prompts, hot.model_copy(update={"top_k": 1}), NEVER) == greedy
    assert generate_ids(model, prompts, hot.model_copy(update={"top_p": 1e-6}), NEVER) == greedy


def test_top_p_keeps_the_nucleus_only():
    from phi1_ray.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingConfig(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, params, g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_eos_ends_a_row():
    model = random_model()
    first = generate_ids(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8), NEVER)[0]
    assert generate_ids(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8), eos_token_id=first[3])[0] == first[:3]


def test_prompt_longer_than_context():
    model = random_model(n_positions=64)
    with pytest.raises(GenerationError, match="prompt 0 is 65 tokens, longer than the model's context of 64"):
        generate_ids(model, [list(range(1, 66))], SamplingConfig(max_new_tokens=4))
    # Generation stops at the context length.
    out = generate_ids(model, [list(range(1, 61))], SamplingConfig(max_new_tokens=10), NEVER)
    assert len(out[0]) == 4


def test_stop_sequences_and_streaming(tokenizer):
    model = random_model()
    params = SamplingConfig(max_new_tokens=40)
    prompt = "def add(a, b):\n"
    full = generate(model, tokenizer, [prompt], params)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    assert full.text == tokenizer.decode(full.token_ids)
    assert "".join(stream(model, tokenizer, prompt, params)) == full.text

    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = full.text[: full.text.find(stop)]
    stopped = generate(model, tokenizer, [prompt, "x"], params.model_copy(update={"stop": [stop]}))[0]
    assert stopped.finish_reason == "stop" and stopped.text == cut
    assert len(stopped.token_ids) < 40
    assert "".join(stream(model, tokenizer, prompt, params.model_copy(update={"stop": [stop]}))) == cut


def test_generate_cli_json_contract(tmp_path, tokenizer):
    model = random_model()
    save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    prompt = "import os\n"
    result = run_job(
        "jobs/generate.py",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = generate_ids(model, [ids], SamplingConfig(max_new_tokens=12), tokenizer.eos_token_id)[0]
    assert out["token_ids"] == expected
    assert out["completion"] == tokenizer.decode(expected)

    plain = run_job(
        "jobs/generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "12"
    )
    assert plain.stdout == out["completion"] + "\n"

    bad = run_job("jobs/generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x" * 3000)
    assert_user_error(bad, "longer than the model's context of 2048 tokens")
    bad = run_job("jobs/generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x", "--top-p", "2")
    assert_user_error(bad, "top_p must be in (0, 1]")
