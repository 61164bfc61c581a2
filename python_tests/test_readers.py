"""Malformed local files for every reader of xlt_fast.data.formats and xlt_fast.data.lexicons:
each error names the file and the 1-based line (and column where one applies)."""
import gzip
import json

import pytest

from xlt_fast.data import formats, lexicons


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def _fails(call, path, where, text):
    """``call()`` raises a ValueError reading ``"{path}, {where}: ..."`` that contains ``text``."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    prefix = f"{path}, {where}: " if where else f"{path}: "
    assert message.startswith(prefix), message
    assert text in message, message
    return message


# --- CoNLL --------------------------------------------------------------------------------------

def test_conll_bom_crlf_and_encoding(tmp_path):
    path = _write(tmp_path / "bom.conll", "\ufeffEU B-ORG\r\nrejects O\r\n\r\nBerlin B-LOC\r\n")
    data = formats.read_conll(path)
    assert data.tokens == [["EU", "rejects"], ["Berlin"]]
    assert data.tags == [["B-ORG", "O"], ["B-LOC"]]
    latin = _write(tmp_path / "latin.conll", "EU B-ORG\n\nMünchen B-LOC\n", "latin-1")
    message = _fails(lambda: formats.read_conll(latin), latin, "line 3", "not valid utf-8")
    assert "encoding=" in message
    assert formats.read_conll(latin, encoding="latin-1").tokens == [["EU"], ["München"]]


def test_conll_columns(tmp_path):
    few = _write(tmp_path / "few.conll", "EU\n")
    _fails(lambda: formats.read_conll(few), few, "line 1", "1 columns, expected at least 2")
    two = _write(tmp_path / "two.conll", "EU B-ORG\n")
    _fails(lambda: formats.read_conll(two, token_column=3), two, "line 1",
           "expected at least 4")
    # a line missing a column would otherwise read its chunk tag as the NER tag
    shifted = _write(tmp_path / "shifted.conll", "EU NNP B-NP B-ORG\n\ncall NN O\n")
    _fails(lambda: formats.read_conll(shifted), shifted, "line 3", "3 columns, but line 1 has 4")


def test_conll_bad_tag_and_empty(tmp_path):
    path = _write(tmp_path / "tags.conll", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\n\n"
                                           "Peter NNP B-NP O\nSmith NNP I-NP I-PER\n")
    _fails(lambda: formats.read_conll(path), path, "line 6, column 4",
           "tag 'I-PER' does not continue an entity (IOB2)")
    bad = _write(tmp_path / "bad.conll", "EU X-ORG\n")
    _fails(lambda: formats.read_conll(bad, scheme="IOB1"), bad, "line 1, column 2",
           "is not valid IOB1")
    for text in ("", "\n\n", "-DOCSTART- O\n\n"):
        empty = _write(tmp_path / "empty.conll", text)
        _fails(lambda: formats.read_conll(empty), empty, "", "no sentences")
    with pytest.raises(ValueError, match="unknown tagging scheme 'BIO'"):
        formats.read_conll(path, convert_to="BIO")


def test_write_conll_refuses_what_it_cannot_read_back(tmp_path):
    data = formats.TokenDataset([["New York", "is"]], [["B-LOC", "O"]])
    with pytest.raises(ValueError, match="sentence 0: 'New York' is empty or holds whitespace"):
        formats.write_conll(tmp_path / "out.conll", data)
    assert not (tmp_path / "out.conll").exists()


# --- JSONL --------------------------------------------------------------------------------------

def test_jsonl_syntax_objects_and_empty(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n')
    _fails(lambda: formats.read_jsonl(path), path, "line 2", "invalid JSON: Expecting ','")
    _fails(lambda: formats.load_classification_file(path), path, "line 2", "invalid JSON")
    path = _write(tmp_path / "c.jsonl", '{"text": "a", "label": 0}\n\n["b", 1]\n')
    _fails(lambda: formats.read_jsonl(path), path, "line 3", "expected a JSON object, got list")
    empty = _write(tmp_path / "empty.jsonl", "\n  \n")
    _fails(lambda: formats.read_jsonl(empty), empty, "", "no rows")
    bom = _write(tmp_path / "bom.jsonl", '\ufeff{"text": "a", "label": 0}\n')
    assert formats.read_jsonl(bom) == [{"text": "a", "label": 0}]
    latin = _write(tmp_path / "latin.jsonl", '{"text": "a", "label": 0}\n{"text": "é"}\n',
                   "latin-1")
    _fails(lambda: formats.read_jsonl(latin), latin, "line 2", "encoding='latin-1'")
    assert formats.read_jsonl(latin, encoding="latin-1")[1] == {"text": "é"}


def _jsonl(path, *rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("row, where, text", [
    ({"text": "b"}, "line 2", "no field 'label'"),
    ({"text": "b", "label": 1.5}, "line 2", "field 'label' is float 1.5, expected int or str"),
    ({"text": "b", "label": True}, "line 2", "field 'label' is bool True"),
    ({"text": "b", "label": None}, "line 2", "field 'label' is NoneType None"),
    ({"text": ["b"], "label": 1}, "line 2", "field 'text' is list ['b'], expected str"),
    ({"text": "b", "label": "pos"}, "line 2", "label 'pos' mixes class ids and names"),
    ({"text": "b", "label": -1}, "line 2", "label -1 is not a class id 0..0"),
])
def test_jsonl_fields(tmp_path, row, where, text):
    path = _jsonl(tmp_path / "c.jsonl", {"text": "a", "label": 0}, row)
    _fails(lambda: formats.load_classification_file(path), path, where, text)


def test_jsonl_labels_against_label_names(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": 2})
    assert formats.load_classification_file(path, label_names=["a", "b", "pos"]).labels == [2, 2]
    _fails(lambda: formats.load_classification_file(path, label_names=["neg", "pos"]), path,
           "line 2", "label 2 is not a class id 0..1")
    path = _jsonl(tmp_path / "c.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "x"})
    _fails(lambda: formats.load_classification_file(path, label_names=["neg", "pos"]), path,
           "line 2", "label 'x' not in label_names ['neg', 'pos']")
    with pytest.raises(ValueError, match="repeats a name"):
        formats.load_classification_file(path, label_names=["pos", "x", "pos"])


def test_pair_jsonl(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"premise": "A", "hypothesis": "B"}, {"premise": "C"})
    _fails(lambda: formats.load_pair_file(path, label_field=None), path, "line 2",
           "no field 'hypothesis'")
    path = _jsonl(tmp_path / "p.jsonl", {"premise": "A", "hypothesis": "B"})
    assert formats.load_pair_file(path, label_field=None).second == ["B"]


# --- TSV ----------------------------------------------------------------------------------------

def test_tsv_field_counts(tmp_path):
    path = _write(tmp_path / "c.tsv", "text\tlabel\nok\t0\na text\twith a tab\t1\n")
    _fails(lambda: formats.load_classification_file(path), path, "line 3, column 3",
           "3 fields, but the header has 2 (text, label)")
    path = _write(tmp_path / "c.tsv", "text\tlabel\nno label\n")
    _fails(lambda: formats.load_classification_file(path), path, "line 2, column 2",
           "1 fields, but the header has 2")
    path = _write(tmp_path / "p.tsv", "premise\thypothesis\tlabel\nA\tB\tneutral\nC\tneutral\n")
    _fails(lambda: formats.load_pair_file(path), path, "line 3, column 3", "2 fields")


def test_tsv_quotes_bom_crlf_and_encoding(tmp_path):
    path = _write(tmp_path / "c.tsv", '\ufefftext\tlabel\r\n"quoted" text\t1\r\nsay "hi"\t0\r\n')
    data = formats.load_classification_file(path)
    assert data.texts == ['"quoted" text', 'say "hi"'] and data.labels == [1, 0]
    latin = _write(tmp_path / "l.tsv", "text\tlabel\nok\t0\ncafé\t1\n", "latin-1")
    message = _fails(lambda: formats.load_classification_file(latin), latin, "line 3",
                     "byte 0xe9 is not valid utf-8")
    assert "encoding=" in message
    assert formats.load_classification_file(latin, encoding="latin-1").texts == ["ok", "café"]


def test_tsv_header_and_labels(tmp_path):
    path = _write(tmp_path / "c.tsv", "text\tlabel\ngut\tpos\nschlecht\tmaybe\n")
    _fails(lambda: formats.load_classification_file(path, text_field="sentence"), path, "line 1",
           "no field 'sentence' in the header (text, label)")
    _fails(lambda: formats.load_classification_file(path, label_names=["neg", "pos"]), path,
           "line 3, column 2", "label 'maybe' not in label_names")
    path = _write(tmp_path / "c.tsv", "text\tlabel\ngut\t1\nschlecht\t--1\n")
    _fails(lambda: formats.load_classification_file(path), path, "line 3, column 2",
           "label '--1' mixes class ids and names (line 2 has 1)")
    path = _write(tmp_path / "c.tsv", "text\tlabel\ttext\n")
    _fails(lambda: formats.load_classification_file(path), path, "line 1, column 3",
           "field 'text' is also column 1")
    path = _write(tmp_path / "c.tsv", "text\tlabel\n\n")
    _fails(lambda: formats.load_classification_file(path), path, "line 1", "a header but no rows")
    path = _write(tmp_path / "c.tsv", "")
    _fails(lambda: formats.load_classification_file(path), path, "", "the file is empty")
    path = _write(tmp_path / "c.csv", "text,label\n")
    _fails(lambda: formats.load_classification_file(path), path, "", "expected a .jsonl or .tsv")


# --- FreeDict (dictd) ---------------------------------------------------------------------------

def _dictd(directory, index, blob=b"house /haus/\nHaus\n", encoding="utf-8"):
    """A dictd dictionary ``freedict-eng-xyz`` in ``directory``: its index file."""
    directory.mkdir(exist_ok=True)
    (directory / "freedict-eng-xyz.dict.dz").write_bytes(gzip.compress(blob))
    return _write(directory / "freedict-eng-xyz.index", index, encoding)


def _lexicon(index, **kwargs):
    return lambda: lexicons.load_lexicon("en", "xyz", dict_dir=index.parent, **kwargs)


@pytest.mark.parametrize("text, where, message", [
    ("house\tA\tS\nrun\tA\n", "line 2, column 3", "2 fields, expected 3"),
    ("house\tA\tS\tx\n", "line 1, column 4", "4 fields, expected 3"),
    ("house\t!!\tS\n", "line 1, column 2", "'!!' is not a dictd base64 number"),
    ("house\tA\t\n", "line 1, column 3", "an empty field is not a dictd base64 number"),
    ("house\tA\tZ\n", "line 1", "entry 'house' ends at byte 25, past the end of "
                                "freedict-eng-xyz.dict.dz (18 bytes uncompressed)"),
    ("", "", "the index is empty"),
])
def test_dictd_index_errors(tmp_path, text, where, message):
    index = _dictd(tmp_path, text)
    _fails(_lexicon(index), index, where, message)


def test_dictd_bom_encoding_and_compression(tmp_path):
    index = _dictd(tmp_path / "bom", "\ufeffhouse\tA\tS\n")
    assert _lexicon(index)() == [("house", "Haus")]
    index = _dictd(tmp_path / "index", "maisoné\tA\tB\nhouse\tA\tS\n", encoding="latin-1")
    message = _fails(_lexicon(index), index, "line 1", "byte 0xe9 is not valid utf-8")
    assert "encoding=" in message
    index = _dictd(tmp_path / "entry", "house\tA\tN\n", "house\nHäuser\n".encode("latin-1"))
    _fails(_lexicon(index), index, "line 1",
           "entry 'house' in freedict-eng-xyz.dict.dz is not valid utf-8")
    assert _lexicon(index, encoding="latin-1")() == [("house", "Häuser")]
    index = _dictd(tmp_path / "gzip", "house\tA\tS\n")
    (tmp_path / "gzip" / "freedict-eng-xyz.dict.dz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="freedict-eng-xyz.dict.dz: not a gzip-compressed"):
        _lexicon(index)()


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan")])
def test_lexicon_test_fraction_range(tmp_path, fraction):
    _dictd(tmp_path, "house\tA\tS\n")
    with pytest.raises(ValueError, match=r"test_fraction must be in the open interval \(0, 1\)"):
        lexicons.load_lexicon("en", "xyz", "test", test_fraction=fraction, dict_dir=tmp_path)
