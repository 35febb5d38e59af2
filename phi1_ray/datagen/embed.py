"""Documents as unit vectors: mean-pooled final hidden states.

``EncoderConfig.path`` is a phi1_ray checkpoint (or a Hugging Face phi model, a training run directory): its final
LayerNorm output, mean-pooled over the document's tokens (the paper embeds with a pretrained codegen model). Any
other Hugging Face model directory loads with ``AutoModel`` / ``AutoTokenizer`` and pools ``last_hidden_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi1_ray.datagen.config import EncoderConfig
from phi1_ray.errors import CheckpointError


def _is_phi(path: Path) -> bool:
    from phi1_ray.checkpoint import MANIFEST, RUN_FILE, is_train_checkpoint

    if (path / MANIFEST).is_file() or is_train_checkpoint(path) or (path / RUN_FILE).is_file():
        return True
    config = path / "config.json"
    if config.is_file():
        import json

        return json.loads(config.read_text()).get("model_type") in ("phi", "phi-msft", "mixformer-sequential")
    return False


class Encoder:
    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        if cfg.random_init:
            from phi1_ray.model import ModelConfig, Phi1ForCausalLM
            from phi1_ray.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer)
            torch.manual_seed(cfg.seed)
            size = {"vocab_size": len(self.tokenizer), "eos_token_id": self.tokenizer.eos_token_id or 0}
            self.model = Phi1ForCausalLM(ModelConfig.from_name(cfg.random_init, **size)).eval()
            self.phi = True
            self._hidden = None
            self.model.model.final_layernorm.register_forward_hook(self._keep)
            self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return
        if not cfg.path:
            raise CheckpointError("encoder.path is not set")
        path = Path(cfg.path).expanduser()
        self.phi = _is_phi(path)
        if self.phi:
            from phi1_ray.checkpoint import load_model

            self.model, self.tokenizer = load_model(path)
            if self.tokenizer is None:
                raise CheckpointError(f"{path}: the encoder checkpoint has no tokenizer")
            self._hidden: torch.Tensor | None = None
            self.model.model.final_layernorm.register_forward_hook(self._keep)
        else:
            from transformers import AutoModel, AutoTokenizer

            if not path.is_dir():
                raise CheckpointError(f"encoder.path {path}: not a directory (a local model is needed offline)")
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _keep(self, module: Any, inputs: Any, output: torch.Tensor) -> None:
        self._hidden = output

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32, each row of unit L2 norm."""
        out = []
        for start in range(0, len(texts), self.cfg.batch_size):
            chunk = texts[start : start + self.cfg.batch_size]
            ids = [self.tokenizer(t or " ")["input_ids"][: self.cfg.max_tokens] or [self.pad] for t in chunk]
            width = max(len(i) for i in ids)
            tokens = torch.full((len(ids), width), self.pad, dtype=torch.long)
            valid = torch.zeros((len(ids), width), dtype=torch.bool)
            for row, seq in enumerate(ids):  # right padding: positions of real tokens are 0..len-1
                tokens[row, : len(seq)] = torch.tensor(seq)
                valid[row, : len(seq)] = True
            if self.phi:
                self.model(tokens, key_valid=valid, position_ids=torch.arange(width).expand(len(ids), -1))
                hidden = self._hidden
            else:
                hidden = self.model(input_ids=tokens, attention_mask=valid.long()).last_hidden_state
            mask = valid.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
