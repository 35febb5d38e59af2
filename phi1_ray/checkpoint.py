"""phi1_ray model checkpoints: one directory with the model config, the weights and (optionally) the tokenizer.

Layout: ``phi1_ray.json`` (format tag and the :class:`ModelConfig`), ``model.safetensors`` (Hugging Face parameter
names), tokenizer files. :func:`load_model` also takes a Hugging Face ``PhiForCausalLM`` directory or hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from phi1_ray.config import ModelConfig, build
from phi1_ray.errors import CheckpointError, ConfigError
from phi1_ray.hf import load_hf_model, load_state_into, read_json, read_weights
from phi1_ray.model import Phi1ForCausalLM, build_empty
from phi1_ray.tokenizer import has_tokenizer, load_tokenizer

MANIFEST = "phi1_ray.json"
FORMAT_VERSION = 1
CACHE_ENV = "PHI1_CACHE"


def localize(path: str | Path) -> str:
    """A local directory for ``path``: itself when local; for a URI (``s3://``, ``gs://``, ``file://``) a copy in
    ``$PHI1_CACHE`` (default ``~/.cache/phi1_ray``), made once per content (names, sizes, times of its files)."""
    path = str(path)
    if "://" not in path:
        return path
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(path)
        files = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot list the checkpoint ({exc})") from None
    files = [f for f in files if f.type == fs.FileType.File]
    if not files:
        raise CheckpointError(f"{path}: no files there")
    listing = sorted((f.path, f.size, str(f.mtime_ns)) for f in files)
    key = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV, "~/.cache/phi1_ray")).expanduser() / "checkpoints"
    local = cache / f"{Path(root.rstrip('/')).name}-{key}"
    if (local / ".complete").is_file():
        return str(local)
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fs.copy_files(root, str(partial), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    (partial / ".complete").touch()
    shutil.rmtree(local, ignore_errors=True)
    partial.rename(local)
    return str(local)


def save_checkpoint(model: Phi1ForCausalLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    manifest = {"format": "phi1_ray", "version": FORMAT_VERSION, "model": model.config.model_dump(mode="json")}
    # Written last: a directory with a manifest is complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str | None = None
) -> tuple[Phi1ForCausalLM, Any]:
    """(model in eval mode, tokenizer or None) from a phi1_ray checkpoint, a training checkpoint or run directory
    (its best, else latest checkpoint, ZeRO shards consolidated), or a Hugging Face directory / hub id."""
    from phi1_ray.train.checkpoints import RUN_FILE, find_checkpoint, is_train_checkpoint, load_train_checkpoint

    path = localize(path)
    directory = Path(path).expanduser()
    if is_train_checkpoint(directory) or (directory / RUN_FILE).is_file():
        found = find_checkpoint(directory)
        if found is None:
            raise CheckpointError(f"{directory}: a training run without a checkpoint yet")
        return load_train_checkpoint(found, dtype)
    if (directory / MANIFEST).is_file():
        manifest = read_json(directory / MANIFEST)
        if manifest.get("format") != "phi1_ray" or not isinstance(manifest.get("model"), dict):
            raise CheckpointError(f"{directory / MANIFEST}: not a phi1_ray manifest (no format/model keys)")
        model_fields = dict(manifest["model"])
        if attn_impl is not None:
            model_fields["attn_impl"] = attn_impl
        try:
            cfg = build(ModelConfig, model_fields, where="model", source=str(directory / MANIFEST))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        model = build_empty(cfg)
        load_state_into(model, read_weights(directory), str(directory))
        model = model.to(dtype).eval()
    elif directory.is_dir() and not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory} is neither a phi1_ray checkpoint (no {MANIFEST}) nor a Hugging Face model (no config.json)"
        )
    else:
        model = load_hf_model(str(path), dtype=dtype, attn_impl=attn_impl or "sdpa")
        directory = Path(path) if directory.is_dir() else None
    tokenizer = None
    if directory is not None and has_tokenizer(directory):
        tokenizer = load_tokenizer(directory)
    elif directory is None:
        tokenizer = load_tokenizer(str(path))  # hub id: its tokenizer lives beside the weights
    return model, tokenizer
