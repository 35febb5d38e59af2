"""The config machinery every phi1_ray job uses, and the one section shared across components.

A job's config is a tree of :class:`Section` models (pydantic). It is built from a YAML file under ``configs/``
plus dotted command-line overrides (``model.n_layer=4``) and validated at load time: an unknown key or a bad value
raises :class:`ConfigError` naming the key and what it accepts ("did you mean").

Each section lives beside the code it configures: the model's sizes and presets in ``model.py``, Ray in
``runtime.py``, MLflow in ``tracking.py``, tokenizers in ``tokenizer.py``, data in ``data/config.py``, training in
``train/config.py``, sweeps in ``tune/config.py``, evaluation in ``evals/``, data generation in
``datagen/config.py``, serving in ``serving/app.py``, the pipeline in ``pipeline/config.py``. Only
:class:`SamplingConfig`, the decoding settings shared by generation, evaluation, serving and the teacher, is here.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo

from phi1_ray.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and the docstring under a
    field is its description (what a job's ``--help`` lists)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), use_attribute_docstrings=True
    )

    renamed_keys: ClassVar[dict[str, str]] = {}
    """Old spellings still read: a key this section once had -> its name now."""

    @model_validator(mode="before")
    @classmethod
    def _read_renamed_keys(cls, data: Any) -> Any:
        if not cls.renamed_keys or not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in cls.renamed_keys.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old} is the old name of {new}: give one of them")
                data[new] = data.pop(old)
        return data


DEFAULT_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a benchmark completion ends: the function body stops where a new top-level block begins."""


class SamplingConfig(Section):
    """Decoding settings shared by the generate job, evaluation, serving and the data-generation teacher."""

    max_new_tokens: int = 128
    """Tokens generated at most after the prompt."""
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability; 1 disables it."""
    seed: int | None = None
    """Seed of the sampling generator; None: unseeded."""
    stop: list[str] = []
    """Stop sequences: the text ends before the first one."""

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


C = TypeVar("C", bound=BaseModel)
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _format_error(err: dict[str, Any], cls: type[BaseModel], where: str, flags: Mapping[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(([where] if where else []) + loc)
    if err["type"] == "extra_forbidden":
        section = _section_at(cls, loc[:-1])
        valid = sorted(section.model_fields) if section else []
        renamed = list(getattr(section, "renamed_keys", {}))
        close = difflib.get_close_matches(loc[-1], valid + renamed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: unknown key{hint}; valid keys: {', '.join(valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{key or '<root>'}{_flags_of(key, msg, flags)}: {msg}"


def _flags_of(key: str, msg: str, flags: Mapping[str, str]) -> str:
    """`` (--flag)`` for the command-line flags behind ``key``: the flag that sets it or, for a section's own
    check, the flags of the section's keys its message names."""
    named = []
    for dotted, flag in flags.items():
        section, _, name = dotted.rpartition(".")
        if dotted == key or (section == key and re.search(rf"\b{re.escape(name)}\b", msg)):
            named.append(flag)
    return f" ({', '.join(named)})" if named else ""


def _section_at(cls: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = cls.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def build(
    cls: type[C],
    data: dict[str, Any],
    where: str = "",
    source: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> C:
    """Validate ``data`` as ``cls``; every problem is reported with its dotted key (and, from ``flags``: dotted key
    -> command-line flag, the flag that set it)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, cls, where, flags or {}) for e in exc.errors()]
        origin = f" in {source}" if source else ""
        raise ConfigError(f"invalid config{origin}:\n  " + "\n  ".join(lines)) from None


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config, as ``--help`` lists it."""

    key: str
    type: str
    default: str
    doc: str


def config_keys(cls: type[BaseModel], prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of ``cls``, sections expanded (``optim.lr``), with its type, default and field docstring."""
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from config_keys(ann, f"{prefix}{name}.")
            continue
        default = "required" if field.is_required() else _short(_plain(field.get_default(call_default_factory=True)))
        yield KeyDoc(prefix + name, _type_name(ann), default, " ".join(field_doc(cls, name).split()))


def field_doc(cls: type[BaseModel], name: str) -> str:
    """A field's docstring; a field redeclared without one (a subclass's new default) keeps its base's."""
    for base in cls.__mro__:
        field = getattr(base, "model_fields", {}).get(name)
        if isinstance(field, FieldInfo) and field.description:
            return field.description
    return ""


def field_at(cls: type[BaseModel], key: str) -> tuple[type[BaseModel], str] | None:
    """(the section holding dotted ``key``, the key's last part), or None when ``cls`` has no such key."""
    *path, name = key.split(".")
    section = _section_at(cls, path)
    return (section, name) if section is not None and name in section.model_fields else None


def _type_name(ann: Any) -> str:
    if ann is type(None):
        return "null"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are read as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string
    return parts, value


def set_dotted(data: dict[str, Any], key: str | list[str], value: Any) -> None:
    """Set ``key`` (``"optim.lr"`` or its parts) in a nested dict, creating sections as needed."""
    parts = key.split(".") if isinstance(key, str) else key
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested dict (a copy), creating sections as needed."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        parts, value = parse_override(item)
        try:
            set_dotted(out, parts, value)
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load ``cls`` from an optional YAML file plus dotted overrides, validating everything."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return build(cls, data, source=str(path) if path else None)


def to_yaml(cfg: BaseModel) -> str:
    """The fully resolved config, as printed at the start of every job."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
