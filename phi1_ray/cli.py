"""The one command line of every job: ``--config FILE``, the output flag (``--run-dir DIR`` or ``--out DIR``), the
job's own flags (each sets one dotted key of its config), dotted overrides ``key.path=value``, and ``--help`` listing
every key of the config with its docstring. The resolved config is printed at start; user errors are printed as one
``error: ...`` message with exit status 2 instead of a traceback.

A job declares its typed config and, for the flags its users type, a table of flag -> dotted key::

    FLAGS = {"--temperature": "sampling.temperature", "--gpu": Flag("use_gpu", kind="switch")}
    cfg = config_from_argv(EvalJobConfig, __doc__, flags=FLAGS)

so ``--temperature 0.8`` and ``sampling.temperature=0.8`` give the same config. Precedence, lowest first: the
``--config`` file, the dotted overrides, the flags, then the job's ``fixed`` overrides.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from phi1_ray.config import apply_overrides, build, config_keys, field_at, field_doc, read_yaml, set_dotted, to_yaml
from phi1_ray.errors import ConfigError, Phi1Error

C = TypeVar("C", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A command-line flag of a job: the dotted config key it sets and how it takes its value.

    ``kind``: ``value`` (``--flag VALUE``), ``switch`` (``--flag`` alone sets true), ``append`` (repeatable, the
    values as a list) or ``list`` (``--flag V1 V2 ...``). ``convert`` maps what was typed (for ``append`` and
    ``list``: the whole list) to the key's value; without it the config's types read the text. ``help`` defaults to
    the key's docstring."""

    key: str
    kind: Literal["value", "switch", "append", "list"] = "value"
    convert: Callable[[Any], Any] | None = None
    help: str | None = None
    metavar: str | None = None


def unescape(values: list[str]) -> list[str]:
    r"""Stop sequences as typed in a shell: ``--stop '\ndef'`` means a newline, then ``def``."""
    # backslashreplace keeps any character beyond latin-1 as an escape that decoding turns back into it
    return [v.encode("latin-1", "backslashreplace").decode("unicode_escape") for v in values]


FlagTable = Mapping[str, "str | Flag"]
OUTPUT_FLAGS: dict[str, Flag] = {"--run-dir": Flag("run_dir", metavar="DIR"), "--out": Flag("out", metavar="DIR")}
"""Added to every job whose config has the key: where its outputs go."""


def run_main(main: Callable[[], object]) -> None:
    """Run a job's main; a :class:`Phi1Error` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        main()
    except Phi1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def config_from_argv(
    cls: type[C],
    description: str | None,
    argv: Sequence[str] | None = None,
    fixed: Sequence[str] = (),
    flags: FlagTable | None = None,
    echo: bool = True,
) -> C:
    """Parse ``[--config FILE] [--run-dir DIR | --out DIR] [job flags] [key.path=value ...]`` into a validated config.

    ``flags``: the job's own flags (flag -> dotted key, or a :class:`Flag`). ``fixed`` overrides apply last
    (``job=finetune`` for the finetuning job, whatever the file says). ``echo``: print the resolved config (jobs
    whose stdout is their result turn it off). A bad key or value raises ConfigError naming it and its flag."""
    table = job_flags(cls, flags or {})
    args = _parser(cls, description, table).parse_intermixed_args(argv)
    data = apply_overrides(read_yaml(args.config) if args.config else {}, list(args.overrides))
    for name, flag in table.items():
        value = getattr(args, _dest(name))
        if value is not None:
            set_dotted(data, flag.key, _converted(name, flag, value))
    data = apply_overrides(data, list(fixed))
    cfg = build(cls, data, source=args.config, flags={flag.key: name for name, flag in table.items()})
    if echo:
        print("# resolved config\n" + to_yaml(cfg), flush=True)
    return cfg


def job_flags(cls: type[BaseModel], flags: FlagTable) -> dict[str, Flag]:
    """The output flags ``cls`` has keys for, then the job's own; each must name a key of ``cls``."""
    table = {name: flag for name, flag in OUTPUT_FLAGS.items() if flag.key in cls.model_fields}
    table.update({name: flag if isinstance(flag, Flag) else Flag(flag) for name, flag in flags.items()})
    for name, flag in table.items():
        if field_at(cls, flag.key) is None:
            raise TypeError(f"flag {name} names {flag.key!r}, which is not a key of {cls.__name__}")
    return table


def _converted(name: str, flag: Flag, value: Any) -> Any:
    if flag.convert is None:
        return value
    try:
        return flag.convert(value)
    except ValueError as exc:  # e.g. a bad escape in --stop: one line, no traceback
        raise ConfigError(f"{name} {value!r}: {exc}") from None


def _dest(name: str) -> str:
    return "flag_" + name.lstrip("-").replace("-", "_")


def _parser(cls: type[BaseModel], description: str | None, table: Mapping[str, Flag]) -> argparse.ArgumentParser:
    by_key = {flag.key: name for name, flag in table.items()}
    parser = argparse.ArgumentParser(
        description=description, epilog=keys_help(cls, by_key), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys (under configs/)")
    for name, flag in table.items():
        options: dict[str, Any] = {"dest": _dest(name), "default": None, "help": _flag_help(cls, flag)}
        if flag.kind == "switch":
            options.update(action="store_const", const=True)
        else:
            options["metavar"] = flag.metavar or flag.key.rpartition(".")[2].upper()
            if flag.kind == "append":
                options["action"] = "append"
            elif flag.kind == "list":
                options["nargs"] = "*"
        parser.add_argument(name, **options)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides (keys below)")
    return parser


def _flag_help(cls: type[BaseModel], flag: Flag) -> str:
    found = field_at(cls, flag.key)
    doc = flag.help or (" ".join(field_doc(*found).split()) if found else "")
    text = f"{doc} [{flag.key}]" if doc else f"[{flag.key}]"
    return text.replace("%", "%%")  # argparse formats help strings with %


def keys_help(cls: type[BaseModel], flags: Mapping[str, str] | None = None, width: int = 118) -> str:
    """The config's keys for ``--help``: ``key  type = default  (--flag)`` and, indented below, its docstring."""
    flags = flags or {}
    lines = ["config keys (in the --config file, or key.path=value on the command line):"]
    for key in config_keys(cls):
        flag = f"  ({flags[key.key]})" if key.key in flags else ""
        lines.append(f"  {key.key}  {key.type} = {key.default}{flag}")
        if key.doc:
            lines.extend(textwrap.wrap(key.doc, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
