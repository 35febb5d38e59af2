"""The worker loop's bookkeeping without Ray: data position across a restart, FLOPs, MFU, the progress line."""

from itertools import islice

import pytest
import torch

from phi1_ray.errors import Phi1Error
from phi1_ray.model import ModelConfig, Phi1ForCausalLM
from phi1_ray.train.loop import BatchStream, block_loss
from phi1_ray.train.metrics import flops_per_token, mfu, non_embedding_params, peak_tflops, progress_line


def _epochs(n_batches: int):
    return lambda epoch: ({"tokens": torch.tensor([[epoch, i]])} for i in range(n_batches))


def test_batch_stream_resumes_at_the_recorded_position():
    uninterrupted = [tuple(b["tokens"][0].tolist()) for b in islice(iter(BatchStream(_epochs(5))), 17)]
    assert uninterrupted[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]  # epochs follow each other

    first = BatchStream(_epochs(5))
    seen = [tuple(b["tokens"][0].tolist()) for b in islice(iter(first), 8)]
    state = first.state()  # what a checkpoint after 8 micro-batches records
    assert state == {"epoch": 1, "batch": 3}
    resumed = BatchStream(_epochs(5), **state)
    seen += [tuple(b["tokens"][0].tolist()) for b in islice(iter(resumed), 9)]
    assert seen == uninterrupted


def test_an_empty_train_split_is_an_error_not_a_hang():
    with pytest.raises(Phi1Error, match="no batch"):
        next(iter(BatchStream(_epochs(0))))


def test_flops_count_the_parameters_the_model_has():
    for name in ("tiny", "phi-1-small", "phi-1"):
        cfg = ModelConfig.from_name(name)
        with torch.device("meta"):
            model = Phi1ForCausalLM(cfg)
        assert non_embedding_params(cfg) == model.num_parameters() - model.model.embed_tokens.weight.numel()
    cfg = ModelConfig.from_name("phi-1")
    assert flops_per_token(cfg, 2048) == 6 * non_embedding_params(cfg) + 12 * 24 * 2048 * 2048
    # the paper's implied throughput: ~18.4k tokens/s per A100 is ~46% MFU by 6·N (N = 1.3B)
    assert mfu(18_400, 6 * 1.3e9, peak_tflops("NVIDIA A100-SXM4-80GB")) == pytest.approx(0.46, abs=0.005)
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("cpu") is None and mfu(1000.0, 1e9, None) is None
    assert peak_tflops("NVIDIA L4", override=121.0) == 121.0


def test_progress_line():
    line = progress_line(120, 36000, 2.31412, 9.6e-4, 512334.4, 0.4712, 4 * 3600 + 12 * 60 + 5)
    assert line == "step 120/36000 | loss 2.3141 | lr 9.60e-04 | 512,334 tok/s | MFU 47.1% | ETA 4h12m"
    assert "MFU n/a" in progress_line(1, 10, 1.0, 1e-3, 10.0, None, 61) and "ETA 1m01s" in progress_line(
        1, 10, 1.0, 1e-3, 10.0, None, 61
    )


def test_block_loss_predicts_the_next_token_and_masks_prompts():
    torch.manual_seed(0)
    model = Phi1ForCausalLM(ModelConfig.from_name("tiny", vocab_size=64, eos_token_id=0, bos_token_id=0)).eval()
    block = torch.randint(0, 64, (2, 9))
    logits = model(block[:, :-1])
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), block[:, 1:].reshape(-1))
    torch.testing.assert_close(block_loss(model, block), full)
    mask = torch.zeros_like(block)
    mask[:, 5:] = 1  # completion tokens only
    masked = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 64), block[:, 5:].reshape(-1))
    torch.testing.assert_close(block_loss(model, block, mask), masked)
    assert block_loss(model, block, torch.zeros_like(block)).item() == 0.0  # nothing to predict: 0, not NaN
