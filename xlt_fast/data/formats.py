"""Local file formats (CoNLL, JSONL, TSV) and Hugging Face ``datasets`` loaders for online use.

The ``datasets`` loaders need the ``datasets`` package and either the hub or a local copy
(``data_files``); everything else reads plain files.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

from xlt_fast.data.core import ClassificationDataset, PairDataset, TokenDataset

TAG_SCHEMES = ("IOB1", "IOB2", "BIOES")


def read_conll(path: str | os.PathLike, token_column: int = 0, tag_column: int = -1,
               scheme: str = "IOB2", convert_to: str | None = None) -> TokenDataset:
    """Sentences of a CoNLL file: one token per line (whitespace-separated columns), a blank
    line between sentences, ``-DOCSTART-`` lines skipped. Tags are checked against ``scheme``
    and converted to ``convert_to`` if given."""
    _check_scheme(scheme)
    tokens, tags, words, labels = [], [], [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    tokens.append(words)
                    tags.append(labels)
                    words, labels = [], []
                continue
            if len(cols) < 2:
                raise ValueError(f"{path}:{lineno}: expected a token and a tag, got {line!r}")
            words.append(cols[token_column])
            labels.append(cols[tag_column])
    if words:
        tokens.append(words)
        tags.append(labels)
    for i, sent in enumerate(tags):
        validate_tags(sent, scheme, where=f"{path}, sentence {i}")
    if convert_to is not None:
        tags = [convert_tags(sent, scheme, convert_to) for sent in tags]
    return TokenDataset(tokens, tags)


def write_conll(path: str | os.PathLike, data: TokenDataset) -> None:
    """Write ``token tag`` lines with a blank line between sentences."""
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


def validate_tags(tags: Sequence[str], scheme: str, where: str = "") -> None:
    """Raise ``ValueError`` on a tag that ``scheme`` does not allow (IOB1/IOB2: O, B-, I-;
    BIOES also E- and S-; IOB2 and BIOES: an I-/E- must continue an entity of its type)."""
    _check_scheme(scheme)
    allowed = {"B", "I"} | ({"E", "S"} if scheme == "BIOES" else set())
    prev = ("O", "")
    for i, tag in enumerate(tags):
        prefix, kind = _parse(tag)
        if prefix != "O" and (prefix not in allowed or not kind):
            raise ValueError(f"{where}: tag {tag!r} at {i} is not valid {scheme}")
        if scheme != "IOB1" and prefix in ("I", "E") and not (
                prev[0] in ("B", "I") and prev[1] == kind):
            raise ValueError(f"{where}: {tag!r} at {i} does not continue an entity ({scheme})")
        prev = (prefix, kind)


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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One JSON object per non-empty line."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _label_ids(raw: list, label_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    if label_names is None:
        if all(isinstance(v, int) for v in raw):
            return raw, [str(i) for i in range(max(raw, default=-1) + 1)]
        label_names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(label_names)}
    try:
        return [v if isinstance(v, int) else index[str(v)] for v in raw], list(label_names)
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} not in label_names {list(label_names)}") from None


def load_classification_file(path: str | os.PathLike, text_field: str = "text",
                             label_field: str = "label",
                             label_names: Sequence[str] | None = None) -> ClassificationDataset:
    """A text classification file: ``.jsonl`` (objects) or ``.tsv`` (header row with the fields).
    String labels become ids in ``label_names`` order (default: sorted names)."""
    rows = _rows(path)
    try:
        texts = [str(r[text_field]) for r in rows]
        raw = [r[label_field] for r in rows]
    except KeyError as exc:
        raise ValueError(f"{path}: a row has no field {exc.args[0]!r}") from None
    if str(path).endswith(".tsv"):
        raw = [int(v) if v.lstrip("-").isdigit() and label_names is None else v for v in raw]
    labels, names = _label_ids(raw, label_names)
    return ClassificationDataset(texts, labels, names)


def load_pair_file(path: str | os.PathLike, first_field: str = "premise",
                   second_field: str = "hypothesis", label_field: str | None = "label",
                   label_names: Sequence[str] | None = None) -> PairDataset:
    """A sentence-pair file (``.jsonl`` or ``.tsv``); ``label_field=None`` for unlabelled pairs."""
    rows = _rows(path)
    try:
        first = [str(r[first_field]) for r in rows]
        second = [str(r[second_field]) for r in rows]
        raw = None if label_field is None else [r[label_field] for r in rows]
    except KeyError as exc:
        raise ValueError(f"{path}: a row has no field {exc.args[0]!r}") from None
    if raw is None:
        return PairDataset(first, second)
    labels, names = _label_ids(raw, label_names)
    return PairDataset(first, second, labels, names)


def _rows(path: str | os.PathLike) -> list[dict]:
    name = str(path)
    if name.endswith(".jsonl"):
        return read_jsonl(path)
    if name.endswith(".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    raise ValueError(f"{path}: expected a .jsonl or .tsv file")


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
