"""Local file formats (CoNLL, JSONL, TSV) and Hugging Face ``datasets`` loaders for online use.

The ``datasets`` loaders need the ``datasets`` package and either the hub or a local copy
(``data_files``); everything else reads plain files.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from xlt_fast.data.core import ClassificationDataset, PairDataset, TokenDataset

TAG_SCHEMES = ("IOB1", "IOB2", "BIOES")
_INT = re.compile(r"-?[0-9]+")
_Rows = list[tuple[int, dict]]  # (1-based line number, fields) of every record of a file


# --- shared by every local-file reader ----------------------------------------------------------

def file_error(message: str, path: str | os.PathLike, line: int | None = None,
               column: int | None = None) -> ValueError:
    """``ValueError("{path}, line {line}, column {column}: {message}")``, the parts that apply
    (1-based): the form of every reader error."""
    where = [str(path)] + [f"{name} {n}" for name, n in (("line", line), ("column", column))
                           if n is not None]
    return ValueError(f"{', '.join(where)}: {message}")


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file without their ``\\n`` or ``\\r\\n``, a leading byte-order mark
    removed; bytes that are not valid ``encoding`` raise a ``ValueError`` naming the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].decode(encoding, errors="replace").count("\n") + 1
        raise file_error(f"byte {data[exc.start]:#04x} is not valid {encoding}; if the file has "
                         "another encoding, pass it, e.g. encoding='latin-1'", path,
                         line) from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


# --- CoNLL --------------------------------------------------------------------------------------

def read_conll(path: str | os.PathLike, token_column: int = 0, tag_column: int = -1,
               scheme: str = "IOB2", convert_to: str | None = None, *,
               encoding: str = "utf-8") -> TokenDataset:
    """Sentences of a CoNLL file: one token per line (whitespace-separated columns, as many on
    every line), a blank line between sentences, ``-DOCSTART-`` lines skipped. Tags are checked
    against ``scheme`` and converted to ``convert_to`` if given."""
    _check_scheme(scheme)
    if convert_to is not None:
        _check_scheme(convert_to)
    need = max(2, *(c + 1 if c >= 0 else -c for c in (token_column, tag_column)))
    sentences: list[list[tuple[int, str, str]]] = [[]]  # (line, token, tag)
    width = first = 0  # columns of the first token line, and its number
    for lineno, line in enumerate(read_lines(path, encoding), 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if sentences[-1]:
                sentences.append([])
            continue
        if not width:
            if len(cols) < need:
                raise file_error(f"{len(cols)} columns, expected at least {need} (token_column="
                                 f"{token_column}, tag_column={tag_column})", path, lineno)
            width, first = len(cols), lineno
        elif len(cols) != width:
            raise file_error(f"{len(cols)} columns, but line {first} has {width}", path, lineno)
        sentences[-1].append((lineno, cols[token_column], cols[tag_column]))
    sentences = [s for s in sentences if s]
    if not sentences:
        raise file_error("no sentences (the file is empty or has only blank and -DOCSTART- "
                         "lines)", path)
    for sent in sentences:
        bad = _bad_tag([tag for _, _, tag in sent], scheme)
        if bad is not None:
            lineno, _, tag = sent[bad[0]]
            raise file_error(f"tag {tag!r} {bad[1]}", path, lineno, tag_column % width + 1)
    tokens = [[word for _, word, _ in sent] for sent in sentences]
    tags = [[tag for _, _, tag in sent] for sent in sentences]
    if convert_to is not None:
        tags = [convert_tags(sent, scheme, convert_to) for sent in tags]
    return TokenDataset(tokens, tags, str(path), [sent[0][0] for sent in sentences])


def write_conll(path: str | os.PathLike, data: TokenDataset) -> None:
    """Write ``token tag`` lines with a blank line between sentences."""
    for i, (words, tags) in enumerate(zip(data.tokens, data.tags)):
        for item in (*words, *tags):
            if item.split() != [item]:
                raise ValueError(f"sentence {i}: {item!r} is empty or holds whitespace, which a "
                                 "CoNLL line cannot")
    with open(path, "w", encoding="utf-8") as fh:
        for words, tags in zip(data.tokens, data.tags):
            fh.writelines(f"{w} {t}\n" for w, t in zip(words, tags))
            fh.write("\n")


def _check_scheme(scheme: str) -> None:
    if scheme not in TAG_SCHEMES:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {TAG_SCHEMES}")


def _parse(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def _bad_tag(tags: Sequence[str], scheme: str) -> tuple[int, str] | None:
    """Index of the first tag that ``scheme`` does not allow and why, or ``None``."""
    allowed = {"B", "I"} | ({"E", "S"} if scheme == "BIOES" else set())
    prev = ("O", "")
    for i, tag in enumerate(tags):
        prefix, kind = _parse(tag)
        if prefix != "O" and (prefix not in allowed or not kind):
            return i, f"is not valid {scheme}"
        if scheme != "IOB1" and prefix in ("I", "E") and not (
                prev[0] in ("B", "I") and prev[1] == kind):
            return i, f"does not continue an entity ({scheme})"
        prev = (prefix, kind)
    return None


def validate_tags(tags: Sequence[str], scheme: str, where: str = "") -> None:
    """Raise ``ValueError`` on a tag that ``scheme`` does not allow (IOB1/IOB2: O, B-, I-;
    BIOES also E- and S-; IOB2 and BIOES: an I-/E- must continue an entity of its type)."""
    _check_scheme(scheme)
    bad = _bad_tag(tags, scheme)
    if bad is not None:
        raise ValueError(f"{where}: tag {tags[bad[0]]!r} at {bad[0]} {bad[1]}")


def convert_tags(tags: Sequence[str], source: str, target: str) -> list[str]:
    """Convert a tag sequence between IOB1, IOB2 and BIOES (entities read by conlleval's rules)."""
    from xlt_fast.metrics import get_entities

    _check_scheme(source)
    _check_scheme(target)
    out = ["O"] * len(tags)
    entities = get_entities(tags)
    ends = {(kind, last) for kind, _, last in entities}
    for kind, first, last in entities:
        for i in range(first, last + 1):
            out[i] = f"I-{kind}"
        # IOB1 marks B- only on an entity right after another one of its type
        if target == "IOB2" or (target == "IOB1" and (kind, first - 1) in ends):
            out[first] = f"B-{kind}"
        elif target == "BIOES":
            if first == last:
                out[first] = f"S-{kind}"
            else:
                out[first], out[last] = f"B-{kind}", f"E-{kind}"
    return out


# --- JSONL and TSV -----------------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike, *, encoding: str = "utf-8") -> list[dict]:
    """One JSON object per non-empty line."""
    return [row for _, row in _jsonl(path, encoding)]


def _jsonl(path: str | os.PathLike, encoding: str) -> _Rows:
    rows = []
    for lineno, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise file_error(f"invalid JSON: {exc.msg} (character {exc.colno})", path,
                             lineno) from None
        if not isinstance(row, dict):
            raise file_error(f"expected a JSON object, got {type(row).__name__} {row!r:.40}",
                             path, lineno)
        rows.append((lineno, row))
    if not rows:
        raise file_error("no rows (the file is empty)", path)
    return rows


def _tsv(path: str | os.PathLike, encoding: str) -> tuple[_Rows, dict[str, int]]:
    """Rows of a tab-separated file with a header line, and the 1-based column of each field.
    Fields are not quoted (a quote is an ordinary character), so none can hold a tab."""
    lines = read_lines(path, encoding)
    if not lines:
        raise file_error("the file is empty (expected a header line)", path)
    header = lines[0].split("\t")
    columns: dict[str, int] = {}
    for column, name in enumerate(header, 1):
        if name in columns:
            raise file_error(f"field {name!r} is also column {columns[name]}", path, 1, column)
        columns[name] = column
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise file_error(f"{len(fields)} fields, but the header has {len(header)} "
                             f"({', '.join(header)}); a field cannot hold a tab", path, lineno,
                             min(len(fields), len(header)) + 1)
        rows.append((lineno, dict(zip(header, fields))))
    if not rows:
        raise file_error("a header but no rows", path, 1)
    return rows, columns


def _rows(path: str | os.PathLike, encoding: str) -> tuple[_Rows, dict[str, int]]:
    """Rows of a ``.jsonl`` or ``.tsv`` file, and the TSV column of each field (JSONL: none)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path, encoding), {}
    if suffix == ".tsv":
        return _tsv(path, encoding)
    raise ValueError(f"{path}: expected a .jsonl or .tsv file")


def _values(path: str | os.PathLike, rows: _Rows, columns: dict[str, int], key: str,
            types: tuple[type, ...] = (str,)) -> list:
    """``row[key]`` of every row, each one of ``types`` (never a bool)."""
    if columns and key not in columns:
        raise file_error(f"no field {key!r} in the header ({', '.join(columns)})", path, 1)
    out = []
    for lineno, row in rows:
        if key not in row:
            raise file_error(f"no field {key!r}", path, lineno)
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise file_error(f"field {key!r} is {type(value).__name__} {value!r:.40}, expected "
                             f"{expected}", path, lineno, columns.get(key))
        out.append(value)
    return out


def _labels(path: str | os.PathLike, rows: _Rows, columns: dict[str, int], key: str,
            label_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Class ids of the ``key`` values and the class names. Ints (in a TSV without
    ``label_names``: integer strings) are ids, strings are names in ``label_names``. Without
    ``label_names`` the labels must be all ids (names ``"0"`` up to the largest) or all names
    (sorted)."""
    raw = _values(path, rows, columns, key, (int, str))
    if columns and label_names is None:
        raw = [int(v) if _INT.fullmatch(v) else v for v in raw]
    column, lines = columns.get(key), [lineno for lineno, _ in rows]
    if label_names is None:
        is_id = [isinstance(v, int) for v in raw]
        if not all(is_id) and any(is_id):
            i = is_id.index(not is_id[0])
            raise file_error(f"label {raw[i]!r} mixes class ids and names (line {lines[0]} has "
                             f"{raw[0]!r}); pass label_names", path, lines[i], column)
        label_names = [str(i) for i in range(max(raw) + 1)] if is_id[0] else sorted(set(raw))
    names = list(label_names)
    if len(set(names)) != len(names):
        raise ValueError(f"label_names {names} repeats a name")
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for lineno, value in zip(lines, raw):
        if isinstance(value, str) and value not in index:
            raise file_error(f"label {value!r} not in label_names {names}", path, lineno, column)
        if isinstance(value, int) and not 0 <= value < len(names):
            raise file_error(f"label {value} is not a class id 0..{len(names) - 1}", path, lineno,
                             column)
        ids.append(index[value] if isinstance(value, str) else value)
    return ids, names


def load_classification_file(path: str | os.PathLike, text_field: str = "text",
                             label_field: str = "label",
                             label_names: Sequence[str] | None = None, *,
                             encoding: str = "utf-8") -> ClassificationDataset:
    """A text classification file: ``.jsonl`` (objects) or ``.tsv`` (header row with the fields;
    no quoting, so a field cannot hold a tab). String labels become ids in ``label_names`` order
    (default: sorted names). Errors name the file, line and (TSV) column."""
    rows, columns = _rows(path, encoding)
    texts = _values(path, rows, columns, text_field)
    labels, names = _labels(path, rows, columns, label_field, label_names)
    return ClassificationDataset(texts, labels, names)


def load_pair_file(path: str | os.PathLike, first_field: str = "premise",
                   second_field: str = "hypothesis", label_field: str | None = "label",
                   label_names: Sequence[str] | None = None, *,
                   encoding: str = "utf-8") -> PairDataset:
    """A sentence-pair file (``.jsonl`` or ``.tsv``); ``label_field=None`` for unlabelled pairs."""
    rows, columns = _rows(path, encoding)
    first = _values(path, rows, columns, first_field)
    second = _values(path, rows, columns, second_field)
    if label_field is None:
        return PairDataset(first, second)
    labels, names = _labels(path, rows, columns, label_field, label_names)
    return PairDataset(first, second, labels, names)


def read_bitext(path: str | os.PathLike, *, encoding: str = "utf-8") -> PairDataset:
    """A parallel corpus in the Europarl/OPUS style: one sentence pair per line, two tab-separated
    sentences (``first``, ``second``), no header; blank lines are skipped. A line without exactly
    one tab, or with an empty side, is an error naming the file, line and column."""
    first, second = [], []
    for lineno, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise file_error(f"expected 'sentence<TAB>sentence', got {len(fields)} tab-separated fields", path, lineno)
        for column, text in enumerate(fields, 1):
            if not text.strip():
                raise file_error("empty sentence", path, lineno, column)
        first.append(fields[0].strip())
        second.append(fields[1].strip())
    if not first:
        raise file_error("no sentence pairs", path)
    return PairDataset(first, second)


# --- Hugging Face datasets (online, or local copies through data_files) ------------------------

def _load_dataset(*args: Any, **kwargs: Any):
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading hub datasets needs the `datasets` package: "
                          "pip install datasets") from exc
    return datasets.load_dataset(*args, **kwargs)


NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
"""Tag ids of CoNLL-2002/2003 on the hub (WikiANN uses the first seven)."""
XNLI_LABELS = ["entailment", "neutral", "contradiction"]
_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _hub_or_files(default: str, config: str | None, split: str, kwargs: dict):
    """``load_dataset`` of the hub dataset, or of local files with ``path="json"`` (or another
    file builder) and ``data_files=...``, which take no configuration name."""
    path = kwargs.pop("path", default)
    return _load_dataset(path, None if path in _FILE_BUILDERS else config, split=split, **kwargs)


def _names(ds, column: str, default: list[str]) -> list[str]:
    feature = getattr(ds.features[column], "feature", ds.features[column])
    return list(getattr(feature, "names", None) or default)


def load_xnli(language: str, split: str = "train", **kwargs: Any) -> PairDataset:
    """XNLI (``facebook/xnli``): premise, hypothesis, label (entailment, neutral, contradiction)."""
    ds = _hub_or_files("facebook/xnli", language, split, kwargs)
    return PairDataset(list(ds["premise"]), list(ds["hypothesis"]), list(ds["label"]),
                       _names(ds, "label", XNLI_LABELS))


def _token_dataset(ds) -> TokenDataset:
    names = _names(ds, "ner_tags", NER_TAGS)
    return TokenDataset([list(s) for s in ds["tokens"]],
                        [[names[t] for t in sent] for sent in ds["ner_tags"]])


def load_wikiann(language: str, split: str = "train", **kwargs: Any) -> TokenDataset:
    """WikiANN (``unimelb-nlp/wikiann``) NER in IOB2."""
    return _token_dataset(_hub_or_files("unimelb-nlp/wikiann", language, split, kwargs))


def load_conll_ner(language: str, split: str = "train", **kwargs: Any) -> TokenDataset:
    """CoNLL-2003 (``en``, ``eriktks/conll2003``) or CoNLL-2002 (``es``/``nl``,
    ``eriktks/conll2002``) NER in IOB2."""
    if language == "en":
        return _token_dataset(_hub_or_files("eriktks/conll2003", None, split, kwargs))
    if language in ("es", "nl"):
        return _token_dataset(_hub_or_files("eriktks/conll2002", language, split, kwargs))
    raise ValueError(f"CoNLL NER exists for en (2003), es and nl (2002), not {language!r}")


def load_marc(language: str, split: str = "train", **kwargs: Any) -> ClassificationDataset:
    """Multilingual Amazon Reviews (MARC): review body -> star rating 1..5 as labels 0..4.

    Reads ``mteb/amazon_reviews_multi`` (``text``, ``label`` 0..4) or local files with
    ``path="json", data_files=...`` in the original layout (``review_body``, ``stars``,
    ``language``; rows of other languages are dropped)."""
    ds = _hub_or_files("mteb/amazon_reviews_multi", language, split, kwargs)
    if "language" in ds.column_names:
        ds = ds.filter(lambda row: row["language"] == language)
    if "stars" in ds.column_names:
        texts, labels = ds["review_body"], [int(s) - 1 for s in ds["stars"]]
    else:
        texts, labels = ds["text"], [int(v) for v in ds["label"]]
    return ClassificationDataset(list(texts), labels, [f"{i} stars" for i in range(1, 6)])
