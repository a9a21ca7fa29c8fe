"""Nested-dataclass configuration: defaults -> preset -> YAML file -> `--set key=value`.

Generic machinery only; the project's config classes live in `pipeline.config` (ML) and
`jobs.config` (ML + SLURM resources). Every layer is a plain dict merged onto the previous one;
the final dict is turned into dataclasses with strict checks (unknown keys, wrong types), and each
dataclass's own `__post_init__` checks values.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def check(condition: bool, field: str, message: str) -> None:
    """A config value check: `field: message` as a ValueError (the message says the fix)."""
    if not condition:
        raise ValueError(f"{field}: {message}")


class CliValue(str):
    """A `--set` value kept as the raw string until the target field's type is known.

    YAML would turn `01:30` into an integer or `0.1e-3` into a string; parsing by the declared
    type avoids those surprises: a `str` field gets the text verbatim, others go through YAML.
    """


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` updated recursively with `override` (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_assignment(assignment: str) -> dict:
    """`"dpo.learning_rate=1e-5"` -> `{"dpo": {"learning_rate": CliValue("1e-5")}}`."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. --set dpo.learning_rate=1e-5")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError(f"--set {assignment!r}: empty key in {dotted!r}")
    nested: dict = {keys[-1]: CliValue(raw)}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice (plain YAML would silently keep the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (`<<` merges may still override)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # an unhashable key; the base class reports it
                    continue
                if seen is not None:
                    raise DuplicateKeyError(None, None, f"key {key!r} given twice (first on line {seen}); "
                                            "keep one of them", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where the YAML is malformed and what the parser expected."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    fix = "" if isinstance(exc, DuplicateKeyError) else "; fix the YAML syntax"
    return f"{where}{problem}{' (' + context + ')' if context else ''}{fix}".replace("\n", " ")


def _parse_cli(value: CliValue, where: str) -> Any:
    """A `--set` value as YAML (numbers, lists, null, booleans)."""
    try:
        return safe_load(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: cannot parse {str(value)!r}: {_yaml_problem(exc)}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if isinstance(value, CliValue) and str in options:
            return str(value) if value.strip().lower() not in ("null", "none", "~") else None
        if isinstance(value, CliValue):
            value = _parse_cli(value, where)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if isinstance(value, CliValue):
        if tp is str:
            return str(value)
        value = _parse_cli(value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r} (e.g. --set {where}=[1,2])")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where}.{k}"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf/.nan, or the strings inf/nan float() accepts
            raise ValueError(f"{where}: {value!r} is not a finite number; give a finite value (e.g. 0.1, 1e-5)")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r} (quote it in YAML)")
        return value
    raise ValueError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ValueError."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ValueError(unknown_keys_message(where, unknown, sorted(fields), getattr(cls, "MOVED_FIELDS", {})))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], sub)
    if "_where" in inspect.signature(cls).parameters:  # lets nested classes name their fields fully
        kwargs["_where"] = where
    return cls(**kwargs)


def unknown_keys_message(where: str, unknown: list[str], valid: list[str], moved: dict | None = None) -> str:
    """`slurm.dpo: unknown key(s) gpus; did you mean slurm.dpo.gpus_per_node ...; valid keys: ...`.

    `moved` (a config class's MOVED_FIELDS) maps a field that no longer exists to where it went.
    """
    def dotted(key: str) -> str:
        return f"{where}.{key}" if where else key

    hints = []
    for key in unknown:
        if key in (moved or {}):
            hints.append(f"{dotted(key)} was replaced by {moved[key]}")
            continue
        close = [v for v in valid if v.startswith(key)][:1] or difflib.get_close_matches(key, valid, n=1)
        if close:
            hints.append(f"did you mean {dotted(close[0])} instead of {dotted(key)}?")
    head = f"{where}: unknown key(s)" if where else "unknown top-level key(s)"
    return (f"{head} {', '.join(unknown)}{'; ' + '; '.join(hints) if hints else ''}; "
            f"valid {'keys' if where else 'sections'}: {', '.join(valid)}")


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field; used by `launch.py config --fields`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((name, f.metadata.get("help", ""), default))
    return rows


def doc(help_text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its one-line help (as TRL does for its configs)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})
