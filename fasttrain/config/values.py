"""What a config field can hold, and TOML values to and from it: the accepted types, each value checked and
converted as its field's type, a list of tables as a list of dataclasses, and a value written back as a TOML
literal (config files and error messages alike).

Imports from fasttrain: system.errors.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Literal, NewType, get_args, get_origin, get_type_hints

from fasttrain.system.errors import UsageError

Seconds = NewType("Seconds", float)  # a duration: a number of seconds, or text such as "3m" or "1h30m"
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(text: str) -> float | None:
    """Seconds in `text`: a number ("90", "2.5") or hours, minutes and seconds in that order ("1h30m", "3m",
    "45s", "1m30s"); None if it is neither."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d*)?", text):
        total = float(text)
    else:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            return None
        hours, minutes, seconds = (float(part or 0) for part in match.groups())
        total = 3600 * hours + 60 * minutes + seconds
    return total if math.isfinite(total) else None  # 400 nines of seconds: no budget


def format_duration(seconds: float) -> str:
    """`seconds` as a budget is written: "2.5s", "45s", "3m", "1h30m", "2m5s"."""
    if seconds < 59.5:
        return f"{seconds:.3g}s"
    whole = round(seconds)
    hours, minutes, rest = whole // 3600, whole % 3600 // 60, whole % 60
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (rest, "s")) if n)


def _finite(v: Any) -> bool:
    """A number a float holds: not bool, not inf or nan, and no integer beyond a float's range (1 and 400 zeros)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v) if isinstance(v, float) else abs(v) <= sys.float_info.max


def _text(v: Any) -> bool:
    """A string that can be written as UTF-8 (config.toml, a path) and holds no NUL (no file name can)."""
    if not isinstance(v, str) or "\0" in v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a file name's undecodable byte, say
        return False
    return True


# How a TOML value is accepted for each field type: (accepts, convert, what an error says was expected).
# bool is a subclass of int in Python, but `n_layers = true` is a mistake, never a number.
# No setting means anything as inf or nan, and nan would slip through every range check.
_TYPES: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    # TOML's integers are 64-bit; Python's parser takes any, which torch then cannot hold (a traceback)
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63, int, "an integer"),
    float: (_finite, float, "a finite number"),
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    str: (_text, str, "a string of UTF-8 text without NUL"),
    list[str]: (lambda v: isinstance(v, list) and all(map(_text, v)), list, "a list of strings of UTF-8 text"),
    list[float]: (
        lambda v: isinstance(v, list) and all(map(_finite, v)),
        lambda v: list(map(float, v)),
        "a list of finite numbers",
    ),
    Seconds: (
        lambda v: (isinstance(v, str) and parse_duration(v) is not None) or _finite(v),
        lambda v: parse_duration(v) if isinstance(v, str) else float(v),
        'seconds or a duration such as "90s", "3m" or "1h30m"',
    ),
}


def _unknown(source: str, kind: str, name: str, known: list[str], show: Callable[[str], str]) -> UsageError:
    """The error for a misspelt section or key, suggesting the closest real one if any is close."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {show(close[0])}?" if close else ""
    return UsageError(f"{source}: unknown {kind} {show(name)}{hint}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as field type `tp`, or raise UsageError prefixed with `where`."""
    if get_origin(tp) is list and is_dataclass(get_args(tp)[0]):
        return _tables_of(value, get_args(tp)[0], where)
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        expected = "one of " + ", ".join(map(toml_value, allowed))
    else:
        accepts, convert, expected = _TYPES[tp]
        if accepts(value):
            return convert(value)
    raise UsageError(f"{where}: expected {expected}, got {_show(value)} ({type(value).__name__})")


def _tables_of(value: Any, cls: type, where: str) -> list:
    """`value`, a list of TOML tables ([[data.sources]]), as a list of `cls`, each key checked as its field's type."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{where}: expected a list of tables, got {_show(value)} ({type(value).__name__})")
    types = get_type_hints(cls)
    parts = []
    for i, table in enumerate(value):
        for key in table:
            if key not in types:
                raise _unknown(f"{where}[{i}]", "key", key, list(types), str)
        parts.append(cls(**{k: _coerce(v, types[k], f"{where}[{i}].{k}") for k, v in table.items()}))
    return parts


def toml_value(value: Any) -> str:
    """`value` as a TOML literal (an inline table for a dataclass); covers the types config fields can hold: what
    config.toml is written with, and a --set item's value (train.resume_command)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has a "." or an exponent, so it reads back as a float
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if is_dataclass(value):  # a table of a list of tables, inline
        return "{" + ", ".join(f"{f.name} = {toml_value(getattr(value, f.name))}" for f in fields(value)) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _show(value: Any) -> str:
    """`value` for an error message: as the user would write it in TOML where possible."""
    try:
        text = toml_value(value)
    except TypeError:  # a table or a date where a plain value was expected
        text = repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate shown as \udcff, printable
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"  # errors stay one short line
