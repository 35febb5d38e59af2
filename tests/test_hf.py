"""Parity with transformers' PhiForCausalLM, both directions, and the bad checkpoints users hand us."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PhiConfig, PhiForCausalLM

from phi1_ray.checkpoint import load_model, save_checkpoint
from phi1_ray.config import SamplingConfig
from phi1_ray.errors import CheckpointError
from phi1_ray.generate import generate_ids
from phi1_ray.hf import export_hf
from tests.conftest import assert_user_error, random_model, run_job

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 300, 400, 17]]
EOS = 511  # never produced by these random models, so every row runs the full 32 tokens


def hf_greedy(model, prompts, n):
    """transformers' own generate, left-padded batch with an attention mask."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=gen)
    return out[:, width:].tolist()


def random_hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = PhiConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        partial_rotary_factor=0.5,
        eos_token_id=EOS,
        bos_token_id=EOS,
        max_position_embeddings=2048,
    )
    model = PhiForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def assert_same_model(ours, theirs):
    ids = torch.randint(0, 512, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    ours_tokens = generate_ids(ours, PROMPTS, SamplingConfig(max_new_tokens=32))
    theirs_tokens = hf_greedy(theirs, PROMPTS, 32)
    assert all(len(t) == 32 for t in ours_tokens)
    assert ours_tokens == theirs_tokens


def test_export_loads_in_transformers(tmp_path):
    ours = random_model(eos_token_id=EOS, bos_token_id=EOS)
    export_hf(ours, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(theirs).__name__ == "PhiForCausalLM"
    assert_same_model(ours, theirs)


def test_import_from_transformers(tmp_path):
    theirs = random_hf_model()
    theirs.save_pretrained(tmp_path)
    ours, tokenizer = load_model(tmp_path)
    assert tokenizer is None
    assert ours.config.rotary_dim == 32 and ours.config.eos_token_id == EOS
    assert_same_model(ours, theirs)


def test_import_pytorch_bin(tmp_path):
    theirs = random_hf_model(seed=3)
    (tmp_path / "config.json").write_text(theirs.config.to_json_string())
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        ids = torch.randint(0, 512, (2, 20))
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def mixformer_state(model, sequential):
    """The layouts of the first microsoft/phi-1 uploads, written from transformers' own weights."""
    sd, n = model.state_dict(), model.config.num_hidden_layers
    out = {}
    embed, block, final = (
        ("layers.0.wte", "layers.{}", f"layers.{n + 1}")
        if sequential
        else ("transformer.embd.wte", "transformer.h.{}", "lm_head")
    )
    out[f"{embed}.weight"] = sd["model.embed_tokens.weight"]
    for i in range(n):
        src, dst = f"model.layers.{i}", block.format(i + 1 if sequential else i)
        for p in ("weight", "bias"):
            out[f"{dst}.ln.{p}"] = sd[f"{src}.input_layernorm.{p}"]
            out[f"{dst}.mixer.Wqkv.{p}"] = torch.cat([sd[f"{src}.self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[f"{dst}.mixer.out_proj.{p}"] = sd[f"{src}.self_attn.dense.{p}"]
            out[f"{dst}.mlp.fc1.{p}"] = sd[f"{src}.mlp.fc1.{p}"]
            out[f"{dst}.mlp.fc2.{p}"] = sd[f"{src}.mlp.fc2.{p}"]
        out[f"{dst}.mixer.rotary_emb.inv_freq"] = torch.zeros(16)
    for p in ("weight", "bias"):
        out[f"{final}.ln.{p}"] = sd[f"model.final_layernorm.{p}"]
        out[f"{final}.linear.{p}"] = sd[f"lm_head.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("sequential", [True, False])
def test_import_mixformer_layout(tmp_path, sequential):
    from safetensors.torch import save_file

    theirs = random_hf_model(seed=5)
    config = {
        "model_type": "mixformer-sequential" if sequential else "phi-msft",
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": None,
        "rotary_dim": 32,
        "n_positions": 2048,
        "vocab_size": 512,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(mixformer_state(theirs, sequential), tmp_path / "model.safetensors")
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        ids = torch.randint(0, 512, (2, 20))
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_phi1_ray_checkpoint_round_trip(tmp_path, tokenizer):
    model = random_model()
    save_checkpoint(model, tmp_path, tokenizer)
    loaded, tok = load_model(tmp_path)
    assert tok is not None and len(tok) == len(tokenizer)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a phi1_ray checkpoint"):
        load_model(tmp_path)


def test_corrupt_weights(tmp_path):
    export_hf(random_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_corrupt_config(tmp_path):
    export_hf(random_model(), tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "phi",\n "hidden_size": }')
    with pytest.raises(CheckpointError, match=r"config.json:2: not valid JSON"):
        load_model(tmp_path)


def test_config_sizes_that_do_not_match_the_weights(tmp_path):
    export_hf(random_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path)
    assert "model.layers.0.mlp.fc1.weight: weights (512, 128), config expects (1024, 128)" in str(exc.value)


def test_not_a_phi_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a phi-1 model"):
        load_model(tmp_path)


def test_cli_bad_checkpoints_give_one_line_errors(tmp_path):
    result = run_job("jobs/generate.py", "--checkpoint", str(tmp_path / "missing"), "--prompt", "def f():")
    assert_user_error(result, "does not exist")
    export_hf(random_model(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    result = run_job("jobs/export.py", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    assert_user_error(result, "corrupt")
    assert not (tmp_path / "out").exists()
