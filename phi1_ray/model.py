"""The phi-1 network: a decoder-only transformer with parallel blocks and partial rotary embeddings.

Semantics and parameter names follow Hugging Face ``PhiForCausalLM`` so that weights move between the two as an
identity map: ``model.embed_tokens``, ``model.layers.N.input_layernorm``,
``model.layers.N.self_attn.{q_proj,k_proj,v_proj,dense}``, ``model.layers.N.mlp.{fc1,fc2}``,
``model.final_layernorm``, ``lm_head``.

Its config sits beside it: :class:`ModelConfig` (Hugging Face ``PhiForCausalLM`` semantics) and the named presets
(``phi-1``, ``phi-1-small``, ``tiny``; ``ModelConfig.from_name("phi-1", n_layer=4)``), any field overridable next
to the name. Single-device code: nothing here knows about Ray or DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from phi1_ray.config import Section, build

AttnImpl = Literal["sdpa", "flash_attn", "eager"]


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's 1.3B model: 24 layers, hidden 2048, MLP 8192, 32 heads of 64.
    "phi-1": {"n_layer": 24, "n_embd": 2048, "n_inner": 8192, "n_head": 32},
    # The paper's 350M model.
    "phi-1-small": {"n_layer": 20, "n_embd": 1024, "n_inner": 4096, "n_head": 16},
    # A ~1M-parameter model for CPU tests and the demo; small vocab so a CPU step is cheap.
    "tiny": {
        "n_layer": 2,
        "n_embd": 128,
        "n_inner": 512,
        "n_head": 2,
        # the offline tokenizer of phi1_ray.tokenizer: 4096 entries, <|endoftext|> = 0
        "vocab_size": 4096,
        "eos_token_id": 0,
        "bos_token_id": 0,
    },
}


class ModelConfig(Section):
    """Sizes and options of the phi-1 network (Hugging Face ``PhiForCausalLM`` semantics)."""

    name: str | None = None
    """Preset the other fields start from (``phi-1``, ``phi-1-small``, ``tiny``); None means all fields given."""
    vocab_size: int = 51200
    n_layer: int = 24
    n_embd: int = 2048
    n_inner: int = 8192
    n_head: int = 32
    rotary_dim: int = 32
    """Rotary embedding on the first ``rotary_dim`` dims of each head (NeoX style); the rest pass through."""
    rope_theta: float = 10000.0
    n_positions: int = 2048
    """Context length."""
    layer_norm_eps: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    initializer_range: float = 0.02
    attn_impl: AttnImpl = "sdpa"
    doc_mask: bool = False
    """Packed rows: positions restart after each EOS and no token attends across a document boundary."""
    eos_token_id: int = 50256
    bos_token_id: int = 50256
    gradient_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is not None:
            name = data["name"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        positive = ("vocab_size", "n_layer", "n_embd", "n_inner", "n_head", "n_positions")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id ({self.eos_token_id}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """``ModelConfig.from_name("phi-1", n_layer=4)``."""
        return build(cls, {"name": name, **overrides}, where="model")


FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


@dataclass
class AttentionBias:
    """What each query may attend to, in the forms the backends take.

    ``causal`` alone means plain causal attention over a full row (q_len == kv_len). ``mask`` is a boolean
    (B, 1, q_len, kv_len) tensor, True where attention is allowed. ``cu_seqlens``/``max_seqlen`` describe packed
    documents for flash-attn's varlen kernel (document masking without padding).
    """

    causal: bool = True
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


class KVCache:
    """Preallocated key/value cache for incremental decoding: one (B, nh, max_len, hd) buffer per layer."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values of ``layer`` and return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class RotaryEmbedding(nn.Module):
    """NeoX-style rotary embedding of the first ``rotary_dim`` dims of each head, from cached cos/sin tables.

    ``rotate_half(x) * sin`` is computed as ``roll(x) * sin_signed`` with ``sin_signed = cat(-sin, sin)``:
    the same products, in fewer kernels.
    """

    def __init__(self, rotary_dim: int, theta: float, max_positions: int = 2048) -> None:
        super().__init__()
        self.rotary_dim, self.theta, self.max_positions = rotary_dim, theta, max_positions
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=self.inv_freq.device).float()
        with torch.no_grad():
            self.inv_freq.copy_(1.0 / (self.theta ** (exponent / self.rotary_dim)))
        self._tables = {}

    def _table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._tables.get((device, dtype), (None, None))
        if cos is None or cos.size(0) < length:
            freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * self.inv_freq.float()[None, :]
            cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(dtype)  # (size, rd)
            sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype)
            self._tables[(device, dtype)] = (cos, sin)
        return cos, sin

    def forward(
        self, position_ids: torch.Tensor | None, length: int, past: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed), each (B or 1, T, 1, 1, rd), to rotate (B, T, 2, nh, hd) q/k stacks.

        Positions are ``position_ids`` (B, T) when given, else past..past+T for every row.
        """
        cos, sin = self._table(max(past + length, self.max_positions), device, dtype)
        if position_ids is None:
            return cos[None, past : past + length, None, None], sin[None, past : past + length, None, None]
        return cos[position_ids][:, :, None, None], sin[position_ids][:, :, None, None]


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.size(-1)`` dims of each head of x (..., hd); the rest pass through."""
    rd = cos.size(-1)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    rotated = x_rot * cos + x_rot.roll(rd // 2, dims=-1) * sin_signed
    return torch.cat((rotated, x_pass), dim=-1)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, dropout: float
) -> torch.Tensor:
    """Reference attention. q and k are upcast to fp32 before the product (fp16 overflows otherwise)."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, nh, T, S)
    if bias.mask is not None:
        scores = scores.masked_fill(~bias.mask, torch.finfo(scores.dtype).min)
    elif bias.causal:
        T, S = scores.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout).to(v.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, dropout: float
) -> torch.Tensor:
    # SDPA scales inside the kernel (FlashAttention / memory-efficient kernels accumulate q.k in fp32).
    if bias.mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask, dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=bias.causal and q.size(2) > 1)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, dropout: float
) -> torch.Tensor:
    """flash-attn kernels; (B, nh, T, hd) in and out. Varlen kernel for packed documents."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, nh, T, hd = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, nh, hd)
    if bias.cu_seqlens is not None:
        flat = [t.reshape(B * T, nh, hd) for t in (q, k, v)]
        out = flash_attn_varlen_func(
            *flat,
            cu_seqlens_q=bias.cu_seqlens,
            cu_seqlens_k=bias.cu_seqlens,
            max_seqlen_q=bias.max_seqlen,
            max_seqlen_k=bias.max_seqlen,
            dropout_p=dropout,
            causal=True,
        )
        return out.view(B, T, nh, hd).transpose(1, 2)
    return flash_attn_func(q, k, v, dropout_p=dropout, causal=bias.causal).transpose(1, 2)


class PhiAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.attn_pdrop = cfg.attn_pdrop
        # q, k and v projections as one (3C, C) matmul; state dicts keep transformers' q_proj/k_proj/v_proj names.
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.backend = cfg.attn_impl
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_merge_qkv)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k = apply_partial_rotary(qkv[:, :, :2], cos, sin).unbind(dim=2)  # q and k at once: (B, T, nh, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hd)
        dropout = self.attn_pdrop if self.training else 0.0
        if self.backend == "eager":
            y = eager_attention(q, k, v, bias, dropout)
        elif self.backend == "flash_attn" and _flash_usable(q, bias):
            y = flash_attention(q, k, v, bias, dropout)
        else:
            y = sdpa_attention(q, k, v, bias, dropout)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


_QKV = ("q_proj", "k_proj", "v_proj")


def _split_qkv(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local_metadata: dict) -> None:
    """state_dict hook: ``qkv_proj`` is saved as transformers' ``q_proj``, ``k_proj``, ``v_proj``."""
    for param in ("weight", "bias"):
        fused = state.pop(f"{prefix}qkv_proj.{param}", None)
        if fused is not None:
            for name, part in zip(_QKV, fused.chunk(3, dim=0)):
                state[f"{prefix}{name}.{param}"] = part


def _merge_qkv(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: stack ``q_proj``, ``k_proj``, ``v_proj`` back into ``qkv_proj``."""
    for param in ("weight", "bias"):
        keys = [f"{prefix}{name}.{param}" for name in _QKV]
        if all(k in state for k in keys):
            state[f"{prefix}qkv_proj.{param}"] = torch.cat([state.pop(k) for k in keys], dim=0)


def _flash_usable(q: torch.Tensor, bias: AttentionBias) -> bool:
    """flash-attn needs the package, a CUDA tensor in fp16/bf16, and no padding mask."""
    return (
        FLASH_ATTN_AVAILABLE
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and (bias.mask is None or bias.cu_seqlens is not None)
    )


class PhiMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.fc2 = nn.Linear(cfg.n_inner, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PhiDecoderLayer(nn.Module):
    """Parallel block: ``h = x + attn(ln(x)) + mlp(ln(x))`` with one LayerNorm shared by both branches."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg, layer_idx)
        self.mlp = PhiMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.resid_dropout(self.self_attn(h, cos, sin, bias, cache))
        ff = self.resid_dropout(self.mlp(h))
        return x + attn + ff


class PhiModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg, i) for i in range(cfg.n_layer))
        self.final_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.n_positions)


def document_layout(input_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting after each EOS, and the document index of every token, for packed rows.

    The EOS token closes its document; the token after it starts the next one at position 0.
    Returns (position_ids, doc_ids), both (B, T).
    """
    is_eos = input_ids == eos_token_id
    doc_ids = torch.cumsum(is_eos, dim=1) - is_eos.long()
    idx = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(is_eos)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx, doc_ids


def _document_bias(input_ids: torch.Tensor, doc_ids: torch.Tensor, backend: str) -> AttentionBias:
    T = input_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    bias = AttentionBias(causal=True, mask=(same_doc & causal)[:, None])
    if backend == "flash_attn" and FLASH_ATTN_AVAILABLE and input_ids.is_cuda:
        # Each (row, document) pair is one sequence of the flattened batch.
        flat = doc_ids + torch.arange(doc_ids.size(0), device=doc_ids.device)[:, None] * (T + 1)
        _, counts = torch.unique_consecutive(flat.flatten(), return_counts=True)
        bias.cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        bias.max_seqlen = int(counts.max())
    return bias


def padding_bias(key_valid: torch.Tensor, q_len: int) -> AttentionBias:
    """Mask for left-padded rows: key_valid (B, S) marks real tokens; queries are the last ``q_len`` positions.

    A query with no valid key (a padding position) attends to itself only, so no row of the softmax is empty
    (which would give NaN). Rows of a serving batch that end before ``S`` mark their own tail invalid.
    """
    S = key_valid.size(1)
    q_pos = torch.arange(S - q_len, S, device=key_valid.device)[:, None]
    k_pos = torch.arange(S, device=key_valid.device)[None, :]
    causal = k_pos <= q_pos  # (T, S)
    allowed = causal[None] & key_valid[:, None, :]  # (B, T, S)
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | (empty & (k_pos == q_pos)[None])
    return AttentionBias(causal=True, mask=allowed[:, None])


class Phi1ForCausalLM(nn.Module):
    """phi-1 with an untied language-model head (with bias)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.attn_impl == "flash_attn" and not FLASH_ATTN_AVAILABLE:
            warnings.warn("attn_impl=flash_attn but the flash-attn package is not installed; using sdpa", stacklevel=2)
        self.model = PhiModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); (B, 1, vocab) with ``last_only``.

        ``key_valid`` (B, S), S = cached + new positions, marks real tokens of left-padded batches; with it,
        ``position_ids`` should count real tokens only. With ``cfg.doc_mask`` and no cache, positions and the
        attention mask follow the EOS-separated documents of each row.
        """
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if key_valid is not None:
            bias = padding_bias(key_valid, T)
        elif cfg.doc_mask and cache is None:
            position_ids, doc_ids = document_layout(input_ids, cfg.eos_token_id)
            bias = _document_bias(input_ids, doc_ids, cfg.attn_impl)
        else:
            bias = AttentionBias(causal=True)
        x = self.model.embed_dropout(self.model.embed_tokens(input_ids))  # (B, T, C)
        cos, sin = self.model.rotary_emb(position_ids, T, past, x.device, x.dtype)
        use_ckpt = cfg.gradient_checkpointing and self.training and cache is None
        for layer in self.model.layers:
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, bias, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, bias, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.final_layernorm(x))


def build_empty(cfg: ModelConfig, device: torch.device | str = "cpu") -> Phi1ForCausalLM:
    """Allocate a model without random initialization, for weights that are about to be loaded."""
    with torch.device("meta"):
        model = Phi1ForCausalLM(cfg)
    model = model.to_empty(device=device)
    model.model.rotary_emb.reset_parameters()  # a buffer, not in the state dict
    return model


def next_token_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.

    ``loss_mask`` (B, T), aligned with ``input_ids``: only tokens where it is 1 are predicted (finetuning on
    completions). The targets are shifted (the last position gets ``ignore_index``) rather than the logits, which
    would copy them.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=ignore_index)
    if loss_mask is not None:
        keep = F.pad(loss_mask[:, 1:], (0, 1), value=0).bool()
        targets = targets.masked_fill(~keep, ignore_index)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)
