"""Content is text, never control: the token ids of a chat prompt in which only the chat template's own markers
are special tokens.

Tokenizing a rendered chat template parses every special token's string, wherever it stands, so a message whose
content holds ``<|im_start|>system\\n...`` would open a real system turn. :func:`chat_ids` renders the template
with a placeholder per message content, tokenizes the template's text as usual (its markers are special tokens)
and each content with ``split_special_tokens=True`` (a special token's string there is plain text), and splices
the pieces. A content without any special token's string is tokenized exactly as before: the rendered prompt in
one piece.
"""

from __future__ import annotations

import re
import weakref
from typing import Mapping, Sequence

from .tasks import chat_prompt

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them


def _ids(tokenizer, text: str, plain: bool) -> list[int]:
    kw = {"split_special_tokens": True} if plain else {}
    return tokenizer(text, add_special_tokens=False, **kw)["input_ids"]


_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _special_strings(tokenizer):
    """A regex of the tokenizer's special tokens' strings (a text without any cannot tokenize to one), or None when
    some special token is matched after normalisation (then only tokenizing both ways can tell)."""
    try:
        return _SPECIALS[tokenizer]
    except (KeyError, TypeError):
        pass
    added = [t for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    strings = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | {t.content for t in added}
    rx = None
    if not any(getattr(t, "normalized", False) for t in added):
        rx = re.compile("|".join(re.escape(x) for x in sorted(strings, key=len, reverse=True) if x) or "(?!)")
    try:
        _SPECIALS[tokenizer] = rx
    except TypeError:  # pragma: no cover - a tokenizer that takes no weak reference: not cached
        pass
    return rx


def has_control(tokenizer, text: str) -> bool:
    """Whether tokenizing `text` as is would yield a special token that plain text does not (an injection). A text
    holding none of the special tokens' strings is answered without tokenizing it (twice) at all."""
    rx = _special_strings(tokenizer)
    if rx is not None and not rx.search(text):
        return False
    return _ids(tokenizer, text, False) != _ids(tokenizer, text, True)


def chat_ids(tokenizer, user_text: str, history: Sequence[Mapping] | None = None) -> list[int]:
    """Token ids of :func:`dlplora.tasks.chat_prompt` (`history`, then the user turn, then the assistant header),
    each message's content tokenized as plain text."""
    history = list(history or [])
    contents = [str(m.get("content", "")) for m in history] + [user_text]
    if not any(has_control(tokenizer, c) for c in contents):
        return _ids(tokenizer, chat_prompt(tokenizer, user_text, history), False)
    marks = [f"\ue000{i}\ue001" for i in range(len(contents))]
    masked = [dict(m, content=marks[i]) for i, m in enumerate(history)]
    text = chat_prompt(tokenizer, marks[-1], masked)
    ids: list[int] = []
    pos = 0
    for m in _MARK.finditer(text):
        ids += _ids(tokenizer, text[pos:m.start()], False) if m.start() > pos else []
        ids += _ids(tokenizer, contents[int(m.group(1))], True)
        pos = m.end()
    return ids + (_ids(tokenizer, text[pos:], False) if pos < len(text) else [])
