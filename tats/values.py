"""Typed config values: every value a recipe, an options file or the command line sets is
checked against the type of the config field it sets (pydantic, strict JSON types: `5` is not
`5.0`, `true` is not `1`, a string is not a number) before a config is built, with one line
naming where the value came from:

    check_table(TrainConfig, {"way": "five"}, "hmdb.toml: [train]")
    # ValueError: hmdb.toml: [train] way = "five": expected an integer

Ranges (at least 1, ascending, one of ...) stay with each config (`__post_init__`); `blame`
names where the value a config refused came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing

from pydantic import TypeAdapter, ValidationError

WORDS = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer", "float_type": "expected a number",
    "float_parsing": "expected a number", "string_type": "expected a string",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "tuple_type": "expected a list", "list_type": "expected a list",
    "dataclass_type": "expected a table", "dict_type": "expected a table",
}  # fmt: skip


@functools.cache
def field_types(cls: type) -> dict[str, object]:
    """The type of each field of the dataclass `cls`, resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _adapter(kind: object) -> TypeAdapter:
    return TypeAdapter(kind)


def _nested(kind: object) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    for option in typing.get_args(kind) or (kind,):
        if dataclasses.is_dataclass(option):
            return option
    return None


def _problem(error: ValidationError) -> str:
    """One phrase for a failed value (for `int | None`, the non-None alternative's)."""
    errors = [e for e in error.errors() if e["type"] != "none_required"] or error.errors()
    first = errors[0]
    if first["type"] in WORDS:
        return WORDS[first["type"]]
    return first["msg"][0].lower() + first["msg"][1:]


def show(value: object) -> str:
    """A value as it would be written in a TOML or JSON file."""
    return json.dumps(value, default=str)


def check_value(kind: object, value: object, where: str) -> None:
    """ValueError "`where` = `value`: expected ..." unless `value` is of type `kind`."""
    try:
        _adapter(kind).validate_json(json.dumps(value, default=str), strict=True)
    except ValidationError as error:
        raise ValueError(f"{where} = {show(value)}: {_problem(error)}") from None
    except TypeError:  # a value JSON cannot hold (a TOML date)
        raise ValueError(f"{where} = {value!r}: not a value tats reads") from None


def check_table(cls: type, values: dict, where: str, extra: dict | None = None) -> None:
    """Check each value of `values` whose key is a field of the dataclass `cls` (`extra`: more
    key types, e.g. "method"); tables of a nested config are checked field by field. Unknown
    keys are left to the caller, whose message lists what is known."""
    types = {**field_types(cls), **(extra or {})}
    for key, value in values.items():
        if key not in types:
            continue
        nested = _nested(types[key])
        if nested is not None and isinstance(value, dict):
            inner = f"{where[:-1]}.{key}]" if where.endswith("]") else f"{where}.{key}"
            check_table(nested, value, inner)
            continue
        check_value(types[key], value, f"{where} {key}")


def blame(error: Exception, origins: dict[str, str], fallback: str) -> ValueError:
    """A config's refusal of a value as one line starting with where that value came from:
    the first field named in the message that `origins` knows (field -> "--grid", "m.toml
    [tracks]", ...), else `fallback`."""
    text = " ".join(str(error).split())
    for name in re.findall(r"[A-Za-z_]+", text):
        if name in origins:
            return ValueError(f"{origins[name]}: {text}")
    return ValueError(f"{fallback}: {text}")
