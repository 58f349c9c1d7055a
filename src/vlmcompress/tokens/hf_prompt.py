"""Where the question is in a chat prompt's token ids, for :func:`~vlmcompress.tokens.hf.attach`.

The question that text-guided methods read is the user turn holding the image, between the
template's user and assistant markers. Kept apart from the handle because it is plain list
code on token ids (no torch, no model), checked on hand-written id lists.
"""
from __future__ import annotations

from typing import Any


def marker_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of a template marker (e.g. ``ASSISTANT:``) as it appears inside a prompt."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)      # a processor holds its tokenizer
    return list(tok(text, add_special_tokens=False)["input_ids"])


def find_last(seq: list[int], sub: list[int], end: int) -> int:
    """Start of the last occurrence of ``sub`` in ``seq[:end]``, or -1."""
    n = len(sub)
    for i in range(end - n, -1, -1):
        if seq[i:i + n] == sub:
            return i
    return -1


def question_ids(ids: list[int], image_token_id: int, user: list[int], assistant: list[int],
                 ignore: set[int]) -> list[int]:
    """The user turn holding the (last) image: after the user marker, up to the assistant
    marker, without image, padding or special tokens (``ignore``)."""
    img = max(i for i, t in enumerate(ids) if t == image_token_id)
    end = len(ids)
    for j in range(img + 1, len(ids) - len(assistant) + 1):
        if assistant and ids[j:j + len(assistant)] == assistant:
            end = j
            break
    at = find_last(ids, user, img) if user else -1
    start = at + len(user) if at >= 0 else 0          # no user marker: from the start
    return [t for t in ids[start:end] if t != image_token_id and t not in ignore]
