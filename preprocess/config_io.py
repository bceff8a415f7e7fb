"""Typed dataclass configs <-> YAML <-> command-line flags.

Configs are plain dataclasses with a comment per field and checks in
``__post_init__``. YAML only serialises them; every field maps one-to-one onto a
flag (``--field`` or ``--section.field`` for nested dataclasses). No code is ever
evaluated from a config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from preprocess.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``where``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        return [_coerce(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):  # from the command line: an inline YAML mapping, e.g. '{depth: 4}'
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{where}: expected a mapping like '{{key: value}}', got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is Path:
        return Path(value)
    return value


def from_dict(
    cls: type[T], data: dict[str, Any], where: str = "config", flags: frozenset[str] = frozenset(), _prefix: str = ""
) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones.

    ``flags`` are the dotted field names whose values came from the command line: errors
    about them name the flag (``--optim.lr``) rather than the file ``where``.
    """
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        dotted = f"{_prefix}{k}"
        tp, _ = _unwrap_optional(hints[k])
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = from_dict(tp, v, f"{where}.{k}", flags, f"{dotted}.")
        else:
            label = flag_name(dotted) if dotted in flags else f"{where}.{k}"
            kwargs[k] = _coerce(v, hints[k], label)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain YAML-safe dict (tuples become lists, Paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def load_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read ``path`` into ``cls``; ``overrides`` (dotted keys allowed) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(cls, data, where=str(path), flags=frozenset(overrides or {}))


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass as YAML (sorted as declared)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def option(default: Any, help: str) -> Any:
    """A dataclass field with the help text its command-line flag shows.

    Mutable defaults (lists, dicts) are copied per instance.
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _comment_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``# comment`` lines right above each field in ``cls``'s source,
    so configs documented the house way (a comment per field) get flag help for free."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    comment: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0].strip()
        if comment and name.isidentifier() and ":" in text:
            out[name] = " ".join(comment)
        comment = []
    return out


def _help_of(field: dataclasses.Field, comments: dict[str, str]) -> str:
    text = field.metadata.get("help") or comments.get(field.name, "")
    return text.replace("%", "%%")  # argparse formats help with %


def flag_name(field: str) -> str:
    """The command-line flag of a dotted config field: ``ingest.uneven_policy`` -> ``--ingest.uneven-policy``."""
    return "--" + field.replace("_", "-")


def flag_hint(field: str, value: Any) -> str:
    """How to set a config field, as the flag and the YAML line, for error messages:
    ``flag_hint("ingest.uneven_policy", "resample")`` -> ``"pass --ingest.uneven-policy resample
    (or ingest.uneven_policy: resample in the config)"``. Booleans use ``--x`` / ``--no-x``;
    sequences are space-separated on the command line and a YAML list in the config."""
    if isinstance(value, bool):
        flag = flag_name(field) if value else "--no-" + flag_name(field)[2:]
        yaml = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        flag = f"{flag_name(field)} {' '.join(str(v) for v in value)}"
        yaml = "[" + ", ".join(str(v) for v in value) + "]"
    else:
        flag, yaml = f"{flag_name(field)} {value}", str(value)
    return f"pass {flag} (or {field}: {yaml} in the config)"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of ``cls`` (recursing into nested dataclasses as ``--a.b``).

    Flags default to ``argparse.SUPPRESS`` so only flags the user typed override the
    config file; read them back with :func:`overrides_from_args`.
    """
    hints = _field_types(cls)
    comments = _comment_help(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, prefix=f"{name}.")
            continue
        flag = flag_name(name)
        kw: dict[str, Any] = {"dest": f"cfg:{name}", "default": argparse.SUPPRESS, "help": _help_of(f, comments)}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif origin in (tuple, list):
            kw["nargs"] = "+"
            kw["metavar"] = f.name.upper()
        else:
            kw["metavar"] = f.name.upper()
        parser.add_argument(flag, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set on the command line, as dotted keys."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def build_config(cls: type[T], config_path: str | Path | None, args: argparse.Namespace) -> T:
    """Config from an optional YAML file plus command-line overrides (flags win)."""
    overrides = overrides_from_args(args)
    if config_path is not None:
        return load_yaml(cls, config_path, overrides)
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return from_dict(cls, data, where="command line", flags=frozenset(overrides))
