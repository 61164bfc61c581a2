"""Bilingual word pairs from Debian's FreeDict dictionaries (dictd format).

``freedict-eng-deu.index`` lines are ``headword \\t offset \\t length`` with offset and length in
dictd's base64 digits (``A-Za-z0-9+/``, most significant first) into the gzip-compressed
``.dict.dz``. An entry's first line is ``headword /pronunciation/ <pos>``; its second line lists
the translations separated by commas, with grammatical ``<...>``, domain ``[...]`` and ``(...)``
notes. Only single-word headwords and single-word translations are kept.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

DICTD_DIR = Path("/usr/share/dictd")
_ISO3 = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por",
         "nl": "nld", "ru": "rus", "sv": "swe", "pl": "pol", "tr": "tur", "ja": "jpn"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOTES = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}")
_WORD = re.compile(r"^[^\W\d_]+(?:['’-][^\W\d_]+)*$")  # letters, inner apostrophe or hyphen


def decode_dictd_number(digits: str) -> int:
    """A dictd base64 number (``"B8"`` -> 1 * 64 + 60)."""
    value = 0
    for ch in digits:
        pos = _B64.find(ch)
        if pos < 0:
            raise ValueError(f"{digits!r} is not a dictd base64 number")
        value = value * 64 + pos
    return value


def _code(lang: str) -> str:
    return _ISO3.get(lang, lang)


def dictionary_files(src: str, tgt: str, dict_dir: str | os.PathLike | None = None
                     ) -> tuple[Path, Path]:
    """``(.index, .dict.dz)`` of the FreeDict ``src``-``tgt`` dictionary."""
    directory = Path(dict_dir) if dict_dir is not None else DICTD_DIR
    stem = f"freedict-{_code(src)}-{_code(tgt)}"
    index, data = directory / f"{stem}.index", directory / f"{stem}.dict.dz"
    if not (index.is_file() and data.is_file()):
        raise FileNotFoundError(f"no FreeDict {src}-{tgt} dictionary in {directory}; install the "
                                f"Debian package: apt-get install dict-{stem}")
    return index, data


def _translations(entry: str) -> list[str]:
    lines = entry.split("\n")
    if len(lines) < 2:
        return []
    words = (part.strip() for part in re.split(r"[,;]", _NOTES.sub(" ", lines[1])))
    return [w for w in words if _WORD.match(w)]


@lru_cache(maxsize=8)
def _all_pairs(index: Path, data: Path) -> tuple[tuple[str, str], ...]:
    text = gzip.decompress(data.read_bytes())
    pairs = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        head, offset, length = line.split("\t")
        if head.startswith("00") or not _WORD.match(head):  # dictd metadata, multi-word entries
            continue
        start = decode_dictd_number(offset)
        entry = text[start:start + decode_dictd_number(length)].decode("utf-8", errors="replace")
        pairs.update((head, word) for word in _translations(entry))
    return tuple(sorted(pairs))


def _in_test(word: str, test_fraction: float) -> bool:
    return int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) < test_fraction * 16 ** 8


def load_lexicon(src: str = "en", tgt: str = "de", split: str = "all", *,
                 test_fraction: float = 0.2, dict_dir: str | os.PathLike | None = None
                 ) -> list[tuple[str, str]]:
    """Sorted single-word pairs ``(source word, translation)``.

    ``split`` is ``"all"``, ``"train"`` or ``"test"``; the split is by source word (every
    translation of a word is on one side), deterministic, with about ``test_fraction`` of the
    source words in test.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")
    pairs = _all_pairs(*dictionary_files(src, tgt, dict_dir))
    if split == "all":
        return list(pairs)
    want_test = split == "test"
    return [p for p in pairs if _in_test(p[0], test_fraction) == want_test]
