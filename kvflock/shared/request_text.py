"""Text that a request carries must be valid Unicode before a tokenizer sees it: JSON's `\\ud800`
escapes can carry a lone UTF-16 surrogate, which Python keeps in a str and tokenizers reject
with a TypeError. The worker and the router both refuse such a request with a 400 naming where."""

from typing import Any

LONE_SURROGATE = "contains a lone UTF-16 surrogate, which is not valid Unicode text"


def first_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The field path (`messages.0.content`) of the first string in a decoded JSON value that holds
    a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = first_lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
