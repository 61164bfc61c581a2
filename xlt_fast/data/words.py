"""Words of parallel sentences: Moses tokenisation, word links from a bilingual lexicon (gold, for
evaluation) and from the unsupervised aligner eflomal (for the L2 baseline of Cao et al. 2020)."""
from __future__ import annotations

import io
import os
import re
import tempfile
from functools import lru_cache
from typing import Iterable, Sequence

Links = list[tuple[int, int]]  # (source word index, target word index) pairs of one sentence pair
_PUNCT = re.compile(r"^\W+|\W+$")


@lru_cache(maxsize=32)
def _moses(lang: str):
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)


@lru_cache(maxsize=1 << 18)
def _moses_one(text: str, lang: str) -> tuple[str, ...]:
    return tuple(_moses(lang).tokenize(text, escape=False))


def moses_words(texts: Sequence[str], lang: str) -> list[list[str]]:
    """Each text split into words by the Moses tokenizer (``sacremoses``; no XML escaping), as
    seed 003 tokenises its parallel data (Sec. 5.1); memoised per text. An empty text is an error
    naming its index."""
    out = []
    for i, text in enumerate(texts):
        words = _moses_one(text, lang)
        if not words:
            raise ValueError(f"text {i} ({lang}) has no words: {text!r}")
        out.append(list(words))
    return out


def normalise(word: str) -> str:
    """Lowercased, with leading and trailing punctuation stripped (how words meet the lexicon)."""
    return _PUNCT.sub("", word.lower())


def lexicon_links(src: Sequence[str], tgt: Sequence[str], lexicon: set[tuple[str, str]]) -> Links:
    """Gold links of one sentence pair (spec wca_wordot A5, E-A0): source word i is linked to target
    word j when j is the only target word of the sentence that the lexicon gives as a translation
    of it (pairs ``(source word, target word)``, normalised), and i the only source word so linked
    to j (one-to-one)."""
    tgt_norm = [normalise(w) for w in tgt]
    candidates = {}
    for i, w in enumerate(src):
        w = normalise(w)
        if not w:
            continue
        hits = {j for j, t in enumerate(tgt_norm) if t and (w, t) in lexicon}
        if len(hits) == 1:
            candidates[i] = hits.pop()
    counts: dict[int, int] = {}
    for j in candidates.values():
        counts[j] = counts.get(j, 0) + 1
    return sorted((i, j) for i, j in candidates.items() if counts[j] == 1)


def eflomal_links(src: Sequence[Sequence[str]], tgt: Sequence[Sequence[str]]) -> list[Links]:
    """Unsupervised word links of a bitext by eflomal (Östling and Tiedemann 2016): forward and
    reverse alignments intersected, so every kept link is one-to-one (the ``keep_1to1`` filtering
    of Cao et al.'s baseline). Words are lowercased for the aligner. eflomal seeds its samplers
    from ``/dev/urandom``, so callers that need the same links twice cache them."""
    from eflomal import Aligner

    if len(src) != len(tgt):
        raise ValueError(f"eflomal_links: {len(src)} source sentences but {len(tgt)} target sentences")
    text = lambda sents: io.StringIO("".join(" ".join(w.lower() for w in s) + "\n" for s in sents))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        fwd, rev = os.path.join(tmp, "fwd"), os.path.join(tmp, "rev")
        Aligner().align(text(src), text(tgt), links_filename_fwd=fwd, links_filename_rev=rev)
        forward, reverse = (_read_links(path) for path in (fwd, rev))
    return [sorted(set(f) & set(r)) for f, r in zip(forward, reverse)]


def _read_links(path: str) -> list[Links]:
    with open(path, encoding="utf-8") as fh:
        return [[tuple(map(int, pair.split("-"))) for pair in line.split()] for line in fh]


def lexicon_set(pairs: Iterable[tuple[str, str]], reverse: bool = False) -> set[tuple[str, str]]:
    """A lexicon as a set of normalised ``(source, target)`` pairs (``reverse`` swaps the sides)."""
    out = set()
    for a, b in pairs:
        a, b = normalise(a), normalise(b)
        if a and b:
            out.add((b, a) if reverse else (a, b))
    return out
