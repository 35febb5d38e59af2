"""Model checkpoints, every kind phi1_ray reads or writes, in one room.

:func:`resolve` tells the kinds apart and says what one holds (:class:`Resolved`: its kind, the local directory,
the model's config, where its tokenizer is); :func:`load_model` loads any of them. The kinds:

- a **phi1_ray checkpoint**: ``phi1_ray.json`` (format tag and the :class:`ModelConfig`, written last),
  ``model.safetensors`` (Hugging Face parameter names), tokenizer files (:func:`save_checkpoint`);
- a **training checkpoint** (what each Ray Train worker hands to ``ray.train.report``; Ray Train merges the ranks'
  files into one directory under ``storage_path/name``)::

      phi1_ray_train.json      step, model config, metrics, data position (rank 0, written last)
      tokenizer/               the run's tokenizer (rank 0)
      latest, ds/...           DeepSpeed: module states, each rank's ZeRO optimizer shard, scheduler, loss scaler

  or a **training run directory** (``run.json``, written by the driver, names its latest and best checkpoints):
  its best, else latest checkpoint; ZeRO shards are consolidated into fp32 weights (:func:`consolidated_state`);
- a **Hugging Face** ``PhiForCausalLM`` (or MixFormer) directory, or a **hub id** (fetched when online).

Any of them may sit on object storage (``s3://``, ``gs://``, ``file://``): it is read through a local copy
(:func:`phi1_ray.storage.localize`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phi1_ray import storage
from phi1_ray.config import build
from phi1_ray.errors import CheckpointError, ConfigError
from phi1_ray.hf import config_from_hf, load_hf_model, load_state_into, read_json, read_weights, resolve_hf_path
from phi1_ray.model import ModelConfig, Phi1ForCausalLM, build_empty
from phi1_ray.tokenizer import has_tokenizer, load_tokenizer

MANIFEST = "phi1_ray.json"
FORMAT_VERSION = 1
TRAIN_MANIFEST = "phi1_ray_train.json"
DS_TAG = "ds"
RUN_FILE = "run.json"
"""Written by the driver in the run directory: where the run's checkpoints live and which is latest / best."""


@dataclass(frozen=True)
class Resolved:
    """What a checkpoint path holds, found without loading any weights."""

    kind: str
    """``phi1_ray``, ``train`` (a training checkpoint, also when a run directory was given) or ``hf``."""
    source: str
    """The path, URI or hub id as given."""
    directory: Path
    """The local directory holding the weights (for ``train``: the checkpoint found in the run)."""
    model: dict[str, Any]
    """The :class:`ModelConfig` fields of the model it holds."""
    origin: str
    """The file the model's config was read from (for error messages)."""
    tokenizer: str | None
    """Where its tokenizer is (a local directory), None when it has none."""
    root: Path | None = None
    """The local directory ``source`` names (its copy, for a URI or hub id); None: ``directory``."""

    @property
    def portable_tokenizer(self) -> str | None:
        """The tokenizer as a reference every node can load: for a URI or hub id the source itself (or the URI of
        the tokenizer inside it), not this machine's local copy; for a local path the local directory."""
        if self.tokenizer is None or not (storage.is_uri(self.source) or not Path(self.source).expanduser().exists()):
            return self.tokenizer
        try:
            inside = Path(self.tokenizer).relative_to(self.root or self.directory).as_posix()
        except ValueError:
            return self.tokenizer
        if inside == ".":
            return self.source
        return storage.join(self.source, inside) if storage.is_uri(self.source) else self.tokenizer

    def model_config(self, **runtime: Any) -> ModelConfig:
        """Its model's config, with runtime options (``attn_impl``, dropout, ...) replaced."""
        fields = {k: v for k, v in self.model.items() if k != "name"}
        try:
            return build(ModelConfig, {**fields, **runtime}, where="model", source=self.origin)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None


def _first_tokenizer(*candidates: Path) -> str | None:
    return next((str(c) for c in candidates if has_tokenizer(c)), None)


def resolve(source: str | Path) -> Resolved:
    """Tell what ``source`` is (a phi1_ray checkpoint, a training checkpoint or run directory, a Hugging Face
    directory or hub id; local or on object storage) and what it holds; a :class:`CheckpointError` naming what
    was expected when it is none of them."""
    given = str(source)
    directory = Path(storage.localize(given)).expanduser()
    if not directory.exists():
        directory = resolve_hf_path(given)  # a hub id, fetched; else "does not exist"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file; expected a directory")
    if is_train_checkpoint(directory) or (directory / RUN_FILE).is_file():
        return _resolve_train(given, directory)
    if (directory / MANIFEST).is_file():
        manifest = read_json(directory / MANIFEST)
        if manifest.get("format") != "phi1_ray" or not isinstance(manifest.get("model"), dict):
            raise CheckpointError(f"{directory / MANIFEST}: not a phi1_ray manifest (no format/model keys)")
        origin = str(directory / MANIFEST)
        return Resolved("phi1_ray", given, directory, manifest["model"], origin, _first_tokenizer(directory))
    if (directory / "config.json").is_file():
        origin = str(directory / "config.json")
        fields = config_from_hf(read_json(directory / "config.json"), origin).model_dump(mode="json")
        return Resolved("hf", given, directory, fields, origin, _first_tokenizer(directory))
    if _checkpoints_under(directory):
        return _resolve_train(given, directory)
    raise CheckpointError(
        f"{directory} is neither a phi1_ray checkpoint (no {MANIFEST}), a training run or checkpoint (no "
        f"{TRAIN_MANIFEST} or {RUN_FILE}) nor a Hugging Face model (no config.json)"
    )


def _resolve_train(given: str, directory: Path) -> Resolved:
    found = find_checkpoint(directory)
    if found is None:
        raise CheckpointError(f"{directory}: a training run without a checkpoint yet")
    tokenizer = _first_tokenizer(found / "tokenizer", directory, directory / "hf")
    origin = str(found / TRAIN_MANIFEST)
    return Resolved("train", given, found, read_train_manifest(found)["model"], origin, tokenizer, directory)


def load_resolved(
    found: Resolved, dtype: torch.dtype = torch.float32, attn_impl: str | None = None
) -> tuple[Phi1ForCausalLM, Any]:
    """(model in eval mode, tokenizer or None) of a resolved checkpoint."""
    if found.kind == "hf":
        model = load_hf_model(found.directory, dtype=dtype, attn_impl=attn_impl or "sdpa")
    else:
        cfg = found.model_config(**({"attn_impl": attn_impl} if attn_impl else {}))
        model = build_empty(cfg)
        if found.kind == "train":
            _load_train_state(model, found.directory)
        else:
            load_state_into(model, read_weights(found.directory), str(found.directory))
        model = model.to(dtype).eval()
    tokenizer = load_tokenizer(found.tokenizer) if found.tokenizer else None
    return model, tokenizer


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str | None = None
) -> tuple[Phi1ForCausalLM, Any]:
    """(model in eval mode, tokenizer or None) from any checkpoint :func:`resolve` knows."""
    return load_resolved(resolve(path), dtype, attn_impl)


def save_checkpoint(model: Phi1ForCausalLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """A phi1_ray checkpoint of ``model`` (and its tokenizer) in ``out_dir``; the manifest is written last."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    manifest = {"format": "phi1_ray", "version": FORMAT_VERSION, "model": model.config.model_dump(mode="json")}
    storage.write_json(out / MANIFEST, manifest)  # a directory with a manifest is complete
    return out


# -- training checkpoints ---------------------------------------------------------------------------------------


def is_train_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAIN_MANIFEST).is_file()


def read_train_manifest(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / TRAIN_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{Path(path) / TRAIN_MANIFEST}: unreadable training manifest ({exc})") from None


def write_train_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    storage.write_json(Path(path) / TRAIN_MANIFEST, manifest)


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """A training run directory's ``run.json`` (None before the run finished)."""
    return storage.read_json(Path(run_dir) / RUN_FILE)


def write_run(run_dir: str | Path, run: dict[str, Any]) -> None:
    storage.write_json(Path(run_dir) / RUN_FILE, run)


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
    run = read_run(root) if (root / RUN_FILE).is_file() else None
    for key in (prefer, "latest", "best") if run else ():
        candidate = run.get(key)
        if candidate:
            candidate = storage.localize(candidate)  # on object storage: a local copy
            if is_train_checkpoint(candidate):
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


def _load_train_state(model: Phi1ForCausalLM, path: Path) -> None:
    missing, unexpected = model.load_state_dict(consolidated_state(path), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_train_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) from one training checkpoint."""
    path = Path(path)
    if not is_train_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint")
    return load_resolved(_resolve_train(str(path), path), dtype)
