"""What makes a text acceptable to embed, said once for requests, jobs and uploads."""

from __future__ import annotations


def text_problem(text: str, max_chars: int) -> str | None:
    """Why a text cannot be embedded (to follow its name, e.g. "input[3]"), or None."""
    if not text:
        return "is empty; every text needs at least one character"
    if len(text) > max_chars:
        return f"has {len(text)} characters; the limit is {max_chars}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode ({exc.reason})"
    return None
