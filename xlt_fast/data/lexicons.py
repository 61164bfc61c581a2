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
import zlib
from functools import lru_cache
from pathlib import Path

from xlt_fast.data.formats import file_error, read_lines

DICTD_DIR = Path("/usr/share/dictd")
_ISO3 = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por",
         "nl": "nld", "ru": "rus", "sv": "swe", "pl": "pol", "tr": "tur", "ja": "jpn"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOTES = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}")
_WORD = re.compile(r"^[^\W\d_]+(?:['’-][^\W\d_]+)*$")  # letters, inner apostrophe or hyphen


def decode_dictd_number(digits: str) -> int:
    """A dictd base64 number (``"B8"`` -> 1 * 64 + 60)."""
    if not digits:
        raise ValueError("an empty field is not a dictd base64 number")
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


def _number(field: str, index: Path, lineno: int, column: int) -> int:
    try:
        return decode_dictd_number(field)
    except ValueError as exc:
        raise file_error(str(exc), index, lineno, column) from None


@lru_cache(maxsize=8)
def _all_pairs(index: Path, data: Path, encoding: str = "utf-8") -> tuple[tuple[str, str], ...]:
    """Every pair of the dictionary; parsed once per version of its files (a JSON copy under
    ``$XLT_FAST_CACHE/lexicons``, keyed by their paths, sizes and modification times)."""
    import json

    from xlt_fast.models.e5_offline import cache_root
    from xlt_fast.training import atomic

    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in (index, data)] + [encoding]
    cached = cache_root() / "lexicons" / f"{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]}.json"
    try:
        return tuple(tuple(p) for p in json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pairs = _parse(index, data, encoding)
        atomic.write_json(cached, pairs)
        return pairs


def _parse(index: Path, data: Path, encoding: str) -> tuple[tuple[str, str], ...]:
    compressed = data.read_bytes()
    try:
        text = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{data}: not a gzip-compressed dictd file ({exc})") from None
    lines = read_lines(index, encoding)
    if not lines:
        raise file_error("the index is empty", index)
    pairs = set()
    for lineno, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise file_error(f"{len(fields)} fields, expected 3 (headword, offset, length)", index,
                             lineno, min(len(fields), 3) + 1)
        head = fields[0]
        start, length = _number(fields[1], index, lineno, 2), _number(fields[2], index, lineno, 3)
        if start + length > len(text):
            raise file_error(f"entry {head!r} ends at byte {start + length}, past the end of "
                             f"{data.name} ({len(text)} bytes uncompressed)", index, lineno)
        if head.startswith("00") or not _WORD.match(head):  # dictd metadata, multi-word entries
            continue
        try:
            entry = text[start:start + length].decode(encoding)
        except UnicodeDecodeError:
            raise file_error(f"entry {head!r} in {data.name} is not valid {encoding}; pass the "
                             "dictionary's encoding, e.g. encoding='latin-1'", index,
                             lineno) from None
        pairs.update((head, word) for word in _translations(entry))
    return tuple(sorted(pairs))


def _in_test(word: str, test_fraction: float) -> bool:
    return int(hashlib.sha256(word.encode()).hexdigest()[:8], 16) < test_fraction * 16 ** 8


def load_lexicon(src: str = "en", tgt: str = "de", split: str = "all", *,
                 test_fraction: float = 0.2, dict_dir: str | os.PathLike | None = None,
                 encoding: str = "utf-8") -> list[tuple[str, str]]:
    """Sorted single-word pairs ``(source word, translation)``.

    ``split`` is ``"all"``, ``"train"`` or ``"test"``; the split is by source word (every
    translation of a word is on one side), deterministic, with about ``test_fraction`` of the
    source words in test; ``encoding`` is that of the dictionary files.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in the open interval (0, 1), got "
                         f"{test_fraction!r}")
    pairs = _all_pairs(*dictionary_files(src, tgt, dict_dir), encoding)
    if split == "all":
        return list(pairs)
    want_test = split == "test"
    return [p for p in pairs if _in_test(p[0], test_fraction) == want_test]
