"""Near-duplicate prompts, exactly: word-shingle sets and every pair whose Jaccard similarity reaches a
threshold (the all-pairs prefix-filter join of Bayardo, Ma and Srikant, "Scaling Up All Pairs Similarity
Search", WWW 2007), so each prompt is compared only with the few that could qualify."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator

from gateway.export import Prompt

SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+")


def shingles(prompt: Prompt) -> frozenset[str]:
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m["role"] != "system")
    words = _WORD.findall(text.lower())
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
