"""Regular expressions from configuration, compiled once at validation."""

from __future__ import annotations

import re
import warnings


def compile_pattern(pattern: str, what: str) -> re.Pattern:
    """`pattern` compiled, or a ValueError that says which setting holds it and why not. Besides re.error, a
    pattern can overflow the engine's limits (`a{4294967296}`) or nest deeper than it recurses: each is a bad
    setting, never an internal error."""
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: the pattern is the user's as written
            warnings.simplefilter("ignore")
            return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"{what} {pattern!r:.80} is not a valid regular expression: {exc}") from None
