"""A near match for a name that is not one of the known ones, to answer "did you mean …?" (any
thread; pure): flags, settings in a YAML file or the environment, fields of a request."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The known name most like `word`, when one is close enough to be a typo of it."""
    by_key = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(by_key), n=1, cutoff=0.6)
    return by_key[found[0]] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)', or '' when nothing is close."""
    match = closest(word, choices)
    return f" (did you mean {match}?)" if match is not None else ""
