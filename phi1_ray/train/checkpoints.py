"""Training checkpoints: DeepSpeed's files from every rank plus a small manifest, and their consolidation.

A training checkpoint directory (what each worker hands to ``ray.train.report``; Ray Train merges the ranks'
files into one directory under ``storage_path/name``)::

    phi1_ray_train.json      step, model config, metrics, data position (rank 0, written last)
    tokenizer/               the run's tokenizer (rank 0)
    latest, ds/...           DeepSpeed: module states, each rank's ZeRO optimizer shard, scheduler, loss scaler

:func:`consolidated_state` turns the ZeRO shards back into one fp32 state dict, the input of the Hugging Face
export; :func:`find_checkpoint` finds the checkpoint to start from in a run directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from phi1_ray.errors import CheckpointError

TRAIN_MANIFEST = "phi1_ray_train.json"
DS_TAG = "ds"
RUN_FILE = "run.json"
"""Written by the driver in the run directory: where the run's checkpoints live and which is latest / best."""


def is_train_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAIN_MANIFEST).is_file()


def read_train_manifest(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / TRAIN_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{Path(path) / TRAIN_MANIFEST}: unreadable training manifest ({exc})") from None


def write_train_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    (Path(path) / TRAIN_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _checkpoints_under(root: Path) -> list[Path]:
    """Complete training checkpoints below ``root`` (at most three levels down), in step order."""
    found = [p.parent for depth in ("*", "*/*", "*/*/*") for p in root.glob(f"{depth}/{TRAIN_MANIFEST}")]
    return sorted(found, key=lambda p: (read_train_manifest(p).get("step", 0), p.name))


def find_checkpoint(path: str | Path, prefer: str = "best") -> Path | None:
    """The checkpoint to start from in ``path``: itself if it is one, else from the run directory's ``run.json``
    (``prefer`` = ``best`` or ``latest``), else the highest step found below it. None when there is none."""
    root = Path(path)
    if is_train_checkpoint(root):
        return root
    run_file = root / RUN_FILE
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        for key in (prefer, "latest", "best"):
            candidate = run.get(key)
            if candidate and "://" in candidate:  # on object storage: a local copy
                from phi1_ray.checkpoint import localize

                candidate = localize(candidate)
            if candidate and is_train_checkpoint(candidate):
                return Path(candidate)
    if root.is_dir():
        found = _checkpoints_under(root)
        return found[-1] if found else None
    return None


def consolidated_state(path: str | Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed checkpoint: ZeRO shards gathered (any stage), else the module."""
    path = Path(path)
    ds_dir = path / DS_TAG
    if not ds_dir.is_dir():
        raise CheckpointError(f"{path}: no DeepSpeed checkpoint ({DS_TAG}/ is missing)")
    if any(re.match(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$", f.name) for f in ds_dir.iterdir()):
        import logging

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    else:
        files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ds_dir}: no model states (mp_rank_00_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_train_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) from a training checkpoint."""
    from phi1_ray.config import ModelConfig, build
    from phi1_ray.model import build_empty
    from phi1_ray.tokenizer import has_tokenizer, load_tokenizer

    path = Path(path)
    manifest = read_train_manifest(path)
    cfg = build(ModelConfig, manifest["model"], where="model", source=str(path / TRAIN_MANIFEST))
    model = build_empty(cfg)
    state = consolidated_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tokenizer = load_tokenizer(path / "tokenizer") if has_tokenizer(path / "tokenizer") else None
    return model.to(dtype).eval(), tokenizer
