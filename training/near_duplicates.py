"""Near-duplicate prompts, exactly: word-shingle sets and every pair whose Jaccard similarity reaches a
threshold (the all-pairs prefix-filter join of Bayardo, Ma and Srikant, "Scaling Up All Pairs Similarity
Search", WWW 2007), so each prompt is compared only with the few that could qualify."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from gateway.conversation import Prompt

SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def shingles(prompt: Prompt) -> frozenset[str]:
    """The word 3-shingles of a prompt's non-system messages (a system prompt shared by all would make every
    pair alike: `same_system` compares those apart)."""
    return _text_shingles(_joined(prompt, system=False))


def system_shingles(prompt: Prompt) -> frozenset[str]:
    """The word 3-shingles of a chat prompt's system messages (empty for a text prompt; `{""}` for a chat prompt
    without one, as for any text without words: prompts without a system message are alike among themselves)."""
    return _text_shingles(_joined(prompt, system=True)) if isinstance(prompt, list) else frozenset()


def same_system(a: frozenset[str], b: frozenset[str], threshold: float) -> bool:
    """Whether two prompts' system messages (`system_shingles`) are alike enough for their prompts to be one group.
    Answers to one user message under two different system prompts ("answer in French", "answer in JSON") are
    not interchangeable: pooled, a DPO pair would prefer one instruction's answer over the other's. System prompts
    that are near duplicates themselves (a date that changes in a long one) still group."""
    if not a and not b:
        return True
    return len(a & b) >= threshold * len(a | b) - 1e-9


def _joined(prompt: Prompt, *, system: bool) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(_said(m) for m in prompt if (m["role"] == "system") == system)


def _said(message: dict[str, Any]) -> str:
    """A message's content, and the tools it called with their arguments."""
    calls = [f"{c['function']['name']} {json.dumps(c['function']['arguments'])}" for c in message.get("tool_calls", ())]
    return "\n".join([message["content"], *calls])


def _text_shingles(text: str) -> frozenset[str]:
    """Word 3-shingles; a text with no word characters ("🙂", "???") is its own one shingle (its characters,
    case and runs of white space aside): as the empty shingle, every such text would be a duplicate of every
    other, and their answers pooled. Word shingles hold a word character, so the two kinds never meet."""
    words = _WORD.findall(text.lower())
    if not words:
        return frozenset({" ".join(text.lower().split())})
    spans = range(max(1, len(words) - SHINGLE_WORDS + 1))
    return frozenset(" ".join(words[i : i + SHINGLE_WORDS]) for i in spans)


def near_pairs(sets: list[frozenset[str]], threshold: float) -> Iterator[tuple[int, int]]:
    """Every pair (i, j) with Jaccard(sets[i], sets[j]) >= threshold, exactly: the all-pairs prefix filter.
    Two such sets share a token among the rarest |s| - ceil(t|s|) + 1 of each, so each set meets as
    candidates only the earlier sets indexed under its own prefix, of a size that could qualify."""
    frequency = Counter(token for s in sets for token in s)
    index: dict[str, list[int]] = {}
    for i in sorted(range(len(sets)), key=lambda i: len(sets[i])):
        size = len(sets[i])
        tokens = sorted(sets[i], key=lambda token: (frequency[token], token))
        candidates: set[int] = set()
        for token in tokens[: size - math.ceil(threshold * size - 1e-9) + 1]:
            candidates.update(j for j in index.get(token, ()) if len(sets[j]) >= threshold * size - 1e-9)
            index.setdefault(token, []).append(i)
        for j in sorted(candidates):
            overlap = len(sets[i] & sets[j])
            if overlap >= threshold * (size + len(sets[j]) - overlap) - 1e-9:
                yield min(i, j), max(i, j)
