"""Stop strings: where a row's text ends, and which tokens can end it.

A stop string (the next "### Instruction:", a chat end marker) usually spans several tokens, so a
decode loop cannot compare token ids; it decodes a row's tail, and only after a token that can
complete a stop string (`stop_enders`), not at every step.
"""

from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


_STOP_ENDERS: dict[tuple[int, tuple[str, ...]], frozenset[int]] = {}


def stop_enders(tokenizer, stops: tuple[str, ...]) -> frozenset[int]:
    """Token ids whose text contains the last character of a stop string: a stop string can only be
    completed by one of them, so the decode loop decodes a row's tail only after such a token
    instead of at every step. Built once per tokenizer and stop set (one pass over the vocabulary)."""
    key = (id(tokenizer), stops)
    if key not in _STOP_ENDERS:
        finals = {stop[-1] for stop in stops if stop}
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        _STOP_ENDERS[key] = frozenset(i for i, piece in enumerate(pieces) if any(c in piece for c in finals))
    return _STOP_ENDERS[key]


def has_stop(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> bool:
    if not stops:
        return False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(stop in text for stop in stops if stop)
