import subprocess
import sys

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from phi1_ray.hf import config_to_hf
from phi1_ray.model import (
    FLASH_ATTN_AVAILABLE,
    AttentionBias,
    ModelConfig,
    Phi1ForCausalLM,
    document_layout,
    eager_attention,
    next_token_loss,
)
from tests.conftest import random_model


@pytest.mark.parametrize("preset", ["phi-1", "phi-1-small"])
def test_parameter_count_equals_transformers(preset):
    cfg = ModelConfig.from_name(preset)
    hf_cfg = PhiConfig(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        ours = Phi1ForCausalLM(cfg).num_parameters()
        theirs = sum(p.numel() for p in PhiForCausalLM(hf_cfg).parameters())
    assert ours == theirs
    if preset == "phi-1":
        assert ours == 1_418_270_720  # the paper's 1.3B model with the 51,200 vocab


def _with_impl(model, impl):
    other = Phi1ForCausalLM(model.config.model_copy(update={"attn_impl": impl})).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_eager_and_sdpa_agree():
    model = random_model(attn_impl="sdpa")
    eager = _with_impl(model, "eager")
    ids = torch.randint(1, 512, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), eager(ids), atol=1e-5, rtol=0)


def test_document_layout_restarts_after_eos():
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4]])
    pos, doc = document_layout(ids, eos_token_id=0)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_document_masking_isolates_documents(impl):
    model = random_model(attn_impl=impl, doc_mask=True)
    first, second = torch.randint(1, 512, (1, 9)), torch.randint(1, 512, (1, 14))
    packed = torch.cat([first, torch.zeros(1, 1, dtype=torch.long), second], dim=1)
    with torch.no_grad():
        logits_packed = model(packed)
        logits_alone = model(second)
        torch.testing.assert_close(logits_packed[:, 10:], logits_alone, atol=1e-5, rtol=0)
        plain = Phi1ForCausalLM(model.config.model_copy(update={"doc_mask": False})).eval()
        plain.load_state_dict(model.state_dict())
        # Without document masking the second document sees the first one.
        assert (plain(packed)[:, 10:] - logits_alone).abs().max() > 1e-3


def test_eager_upcasts_q_and_k_in_fp16():
    q = torch.full((1, 1, 4, 64), 300.0, dtype=torch.float16)  # q.k = 5.76e6 overflows fp16 (max 65504)
    v = torch.randn(1, 1, 4, 64).to(torch.float16)
    out = eager_attention(q, q.clone(), v, AttentionBias(causal=True), dropout=0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model(resid_pdrop=0.0).train()
    ckpt = Phi1ForCausalLM(model.config.model_copy(update={"gradient_checkpointing": True})).train()
    ckpt.load_state_dict(model.state_dict())
    ids = torch.randint(1, 512, (2, 24))
    next_token_loss(model(ids), ids).backward()
    next_token_loss(ckpt(ids), ids).backward()
    for (name, a), b in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(FLASH_ATTN_AVAILABLE, reason="flash-attn is installed")
def test_flash_attn_without_the_package_falls_back_to_sdpa():
    model = random_model()
    with pytest.warns(UserWarning, match="flash-attn"):
        flash = _with_impl(model, "flash_attn")
    ids = torch.randint(1, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), flash(ids))


def test_model_code_imports_no_distribution_stack():
    code = (
        "import sys, phi1_ray.model, phi1_ray.generate, phi1_ray.hf, phi1_ray.config;"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
