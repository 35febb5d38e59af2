"""Hugging Face interop: read ``PhiForCausalLM`` directories (and the older MixFormer layout of the first
microsoft/phi-1 upload) into :class:`Phi1ForCausalLM`, and export ours as a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads without ``trust_remote_code``.

Our parameter names are the Hugging Face ones, so both directions are a (checked) identity map.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from phi1_ray.config import Section, build
from phi1_ray.errors import CheckpointError, ConfigError
from phi1_ray.model import ModelConfig, Phi1ForCausalLM, build_empty


class ExportJobConfig(Section):
    """``jobs/export.py``: a checkpoint as a Hugging Face directory (transformers, vLLM; no trust_remote_code)."""

    checkpoint: str
    """A training run directory (its best, else latest checkpoint), a training checkpoint (its ZeRO shards are
    consolidated first), a phi1_ray checkpoint, or a Hugging Face directory / hub id."""
    out: str
    """The output directory."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MIXFORMER_TYPES = ("mixformer-sequential", "phi-msft")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` from a Hugging Face ``config.json`` (``phi`` or the older MixFormer keys)."""
    model_type = hf.get("model_type")
    if model_type in _MIXFORMER_TYPES:
        n_embd = hf["n_embd"]
        fields = {
            "vocab_size": hf["vocab_size"],
            "n_layer": hf["n_layer"],
            "n_embd": n_embd,
            "n_inner": hf.get("n_inner") or 4 * n_embd,
            "n_head": hf["n_head"],
            "rotary_dim": hf.get("rotary_dim", 32),
            "n_positions": hf.get("n_positions", 2048),
            "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "embd_pdrop": hf.get("embd_pdrop", 0.0),
            "resid_pdrop": hf.get("resid_pdrop", 0.0),
        }
    elif model_type == "phi":
        if hf.get("qk_layernorm"):
            raise CheckpointError(f"{source}: qk_layernorm=true is not part of the phi-1 architecture")
        kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        if kv_heads != hf["num_attention_heads"]:
            raise CheckpointError(f"{source}: grouped-query attention (num_key_value_heads={kv_heads}) is not phi-1")
        if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not phi-1's gelu (tanh)")
        rope = hf.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        fields = {
            "vocab_size": hf["vocab_size"],
            "n_layer": hf["num_hidden_layers"],
            "n_embd": hf["hidden_size"],
            "n_inner": hf["intermediate_size"],
            "n_head": hf["num_attention_heads"],
            "rotary_dim": int(head_dim * factor),
            "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            "n_positions": hf.get("max_position_embeddings", 2048),
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-5),
            "embd_pdrop": hf.get("embd_pdrop", 0.0),
            "attn_pdrop": hf.get("attention_dropout") or 0.0,
            "resid_pdrop": hf.get("resid_pdrop", 0.0),
            "initializer_range": hf.get("initializer_range", 0.02),
        }
    else:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a phi-1 model; expected 'phi' or one of {_MIXFORMER_TYPES}"
        )
    for key in ("eos_token_id", "bos_token_id"):
        if isinstance(hf.get(key), int) and 0 <= hf[key] < fields["vocab_size"]:
            fields[key] = hf[key]
    fields.setdefault("eos_token_id", min(50256, fields["vocab_size"] - 1))
    fields.setdefault("bos_token_id", fields["eos_token_id"])
    try:
        return build(ModelConfig, fields, where="model")
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for ``PhiForCausalLM`` (with the rope keys both transformers 4.x and 5.x read)."""
    factor = cfg.rotary_dim / cfg.head_dim
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_inner,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.n_positions,
        "layer_norm_eps": cfg.layer_norm_eps,
        "resid_pdrop": cfg.resid_pdrop,
        "embd_pdrop": cfg.embd_pdrop,
        "attention_dropout": cfg.attn_pdrop,
        "initializer_range": cfg.initializer_range,
        "partial_rotary_factor": factor,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }


_BLOCK = re.compile(r"^(?:transformer\.h|layers)\.(\d+)\.(.+)$")


def from_mixformer(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Rename MixFormer keys (``layers.N.mixer.Wqkv``, ``transformer.h.N``, ``lm_head.ln/linear``) to ours.

    Two uploads exist: ``layers.0.wte`` / ``layers.1..N`` / ``layers.N+1.{ln,linear}`` (sequential), and
    ``transformer.embd.wte`` / ``transformer.h.N`` / ``lm_head.{ln,linear}``. Wqkv is [q; k; v] along its rows.
    """
    sequential = "layers.0.wte.weight" in state
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in ("transformer.embd.wte.weight", "layers.0.wte.weight"):
            out["model.embed_tokens.weight"] = t
            continue
        if key.startswith("lm_head."):
            head, rest = key.removeprefix("lm_head.").split(".", 1)
            out[{"ln": "model.final_layernorm", "linear": "lm_head"}[head] + "." + rest] = t
            continue
        m = _BLOCK.match(key)
        if m is None:
            out[key] = t  # reported as unexpected when loaded
            continue
        idx, rest = int(m[1]) - (1 if sequential else 0), m[2]
        if sequential and idx == n_layer:
            head, rest = rest.split(".", 1)
            out[{"ln": "model.final_layernorm", "linear": "lm_head"}.get(head, head) + "." + rest] = t
            continue
        prefix = f"model.layers.{idx}."
        if rest.startswith("ln."):
            out[prefix + "input_layernorm." + rest[3:]] = t
        elif rest.startswith("mixer.Wqkv."):
            param = rest.removeprefix("mixer.Wqkv.")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{param}"] = part.contiguous()
        elif rest.startswith("mixer.out_proj."):
            out[prefix + "self_attn.dense." + rest.removeprefix("mixer.out_proj.")] = t
        else:
            out[prefix + rest] = t
    return out


def load_state_into(model: Phi1ForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes; mismatches are listed, not guessed."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: weights {tuple(state[k].shape)}, config expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if wrong:
        problems.append("sizes do not match the config:\n    " + "\n    ".join(wrong[:8]))
    if missing:
        problems.append(f"{len(missing)} weights missing, e.g. {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights, e.g. {', '.join(unexpected[:5])}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def count_parameters(directory: str | Path) -> int:
    """Parameters of an exported model, from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, sharded safetensors, or pytorch_model.bin (sharded too)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_one(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing")
        try:
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None

    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(read_json(path).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_one(directory / shard))
            return state
        return load_one(path)
    raise CheckpointError(f"{directory} holds no weights; expected one of {', '.join(WEIGHT_FILES)}")


def resolve_hf_path(path_or_id: str) -> Path:
    """A local directory as is; otherwise a hub id (``microsoft/phi-1``) fetched by huggingface_hub when online."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a file; expected a directory")
        return path
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id) is not None and not path_or_id.startswith(".")
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, or unknown repo: one line for the user
        raise CheckpointError(
            f"checkpoint {path_or_id!r} is not a local directory and could not be fetched from the hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def load_hf_model(
    path_or_id: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa"
) -> Phi1ForCausalLM:
    """Our model from a Hugging Face ``PhiForCausalLM`` (or MixFormer) directory or hub id."""
    directory = resolve_hf_path(str(path_or_id))
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; not a Hugging Face model directory")
    hf_cfg = read_json(config_path)
    cfg = config_from_hf(hf_cfg, str(config_path))
    cfg = build(ModelConfig, {**cfg.model_dump(), "attn_impl": attn_impl}, where="model")
    state = read_weights(directory)
    if hf_cfg.get("model_type") in _MIXFORMER_TYPES or any(".mixer.Wqkv." in k for k in state):
        state = from_mixformer(state, cfg.n_layer)
    model = build_empty(cfg)
    load_state_into(model, state, str(directory))
    return model.to(dtype).eval()


def export_hf(
    model: Phi1ForCausalLM, out_dir: str | Path, tokenizer: Any = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` (and vLLM) loads as ``PhiForCausalLM``.

    config.json, model.safetensors, generation_config.json and, when known, the tokenizer files.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    hf_cfg = config_to_hf(cfg)
    hf_cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    eos = cfg.eos_token_id
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = hf_cfg["eos_token_id"] = hf_cfg["bos_token_id"] = int(tokenizer.eos_token_id)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    generation = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
