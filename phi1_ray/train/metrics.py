"""Throughput bookkeeping: model FLOPs per token, the accelerator's peak, MFU, and the progress line."""

from __future__ import annotations

import math

from phi1_ray.model import ModelConfig

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets; SXM parts.
PEAK_TFLOPS: dict[str, float] = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense half-precision peak of ``device_name`` (``torch.cuda.get_device_name()``), or ``override``.

    None where the table has no entry (CPUs, other GPUs): MFU is then not reported unless the config names a peak.
    """
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name.upper()), None)


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls: everything but the input embedding table (the LM head counts)."""
    d, f, L, V = cfg.n_embd, cfg.n_inner, cfg.n_layer, cfg.vocab_size
    per_layer = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 2 * d  # qkv, dense, fc1, fc2, layernorm
    return L * per_layer + 2 * d + d * V + V  # final layernorm, lm_head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) plus 12 L d T for attention scores
    (the PaLM appendix B convention; recomputation from activation checkpointing is not counted)."""
    return 6.0 * non_embedding_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilization over ``num_devices`` accelerators, or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_token / (peak * 1e12 * num_devices)


def eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(
    step: int,
    total: int,
    loss: float,
    lr: float,
    tokens_per_s: float,
    mfu_value: float | None,
    eta_s: float,
    extra: str = "",
) -> str:
    """``step 120/36000 | loss 2.3141 | lr 9.6e-04 | 512,334 tok/s | MFU 47.1% | ETA 4h12m``."""
    mfu_text = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
    line = (
        f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} "
        f"| ETA {eta(eta_s)}"
    )
    return f"{line} | {extra}" if extra else line
