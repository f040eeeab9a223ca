"""Keys of the OpenTelemetry Collector's processors that podmeter's do not have.

A configuration copied from the collector must either do what the collector documents or be refused; a plain
"unknown key" would not tell the user what to write instead, so these keys are refused with a hint, at their own
key path (processors::filter::metrics::metric: ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


def refuse_keys(value: Any, hints: dict[str | tuple[str, ...], str], title: str) -> Any:
    """For a model_validator(mode="before"): `value` unchanged, or a ValidationError naming each key of `hints`
    (a key, or a path of keys into nested mappings) that `value` has, with its hint."""
    errors = []
    for path, hint in hints.items():
        node = value
        for key in path if isinstance(path, tuple) else (path,):
            node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            errors.append(InitErrorDetails(type=PydanticCustomError("collector_key", "{hint}", {"hint": hint}),
                                           loc=path if isinstance(path, tuple) else (path,), input=node))
    if errors:
        raise ValidationError.from_exception_data(title, errors)
    return value


_ABSENT = object()
