"""WordOT and its token-level machinery, on a tiny random BERT over real Bible verses (fast, offline):
the cached-layer path equals the whole encoder, word points follow their spans, the frozen copy
shares nothing, every variant trains, the divergence falls when it is the only loss, resume equals
uninterrupted, init_from refuses other stage-1 settings, GeomLoss gives the same step, the bitext
path runs, and bad inputs fail with the file and line or the argument."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_encoder import bible_texts, make_tiny_encoder
from xlt_fast.data import read_bitext
from xlt_fast.data.bible import load_parallel
from xlt_fast.data.words import eflomal_links, lexicon_links, moses_words, normalise
from xlt_fast.models.tokens import EncoderTop, TokenSentences, frozen_copy, word_points, word_spans
from xlt_fast.trainers import wordot
from xlt_fast.training import ConfigError, FeatureCache, load_config, replace

LANGS = ["de", "fr", "es", "ko"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny"), bible_texts(LANGS), layers=3, hidden=32))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XLT_FAST_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path, tiny, name, **kw):
    fields = dict(encoder=tiny, target_lang=["de", "fr"], eval_langs=["ko"], n_pairs=64, batch_size=8,
                  grad_accum=2, n_eval=40, n_task=64, task_steps=6, task_batch_size=8, progress=False,
                  plots=False, log_every=1, output_dir=str(tmp_path / name))
    return replace(wordot.WordOTConfig(), **{**fields, **kw})


def _rows(cfg):
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- machinery

def test_top_layers_on_cached_states_equal_the_whole_encoder(tmp_path, tiny):
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)
    words = moses_words(load_parallel("de", "en", "test").first[:6], "de")
    cache = FeatureCache(tmp_path / "features")
    states = cache.tokens(words, encoder=tiny, layers=(1, 3), max_length=24, progress=False)
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True).hidden_states
    sents = TokenSentences(words, states[1], word_spans(tok, words, 24))
    x, mask, _ = sents.batch(range(len(words)))
    top = EncoderTop(model, 2).eval()
    with torch.no_grad():
        out = top(x, mask)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out[real], full[3][real], rtol=1e-5, atol=1e-5)
    for i, s in enumerate(states[3]):  # the cache keeps each sentence's own tokens
        torch.testing.assert_close(s, full[3][i, :int(real[i].sum())], rtol=1e-5, atol=1e-5)
    again = FeatureCache(tmp_path / "features")
    assert [torch.equal(a, b) for a, b in zip(again.tokens(words, encoder=tiny, layers=(1,), max_length=24,
                                                           progress=False)[1], states[1])] == [True] * len(words)
    assert again.encoded == 0


def test_word_points_follow_spans_and_skip_special_tokens(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    words = [["in", "the", "beginning"], ["and", "god", "said", "let", "there", "be", "light"]]
    spans = word_spans(tok, words, max_length=6)  # [CLS] + 4 words + [SEP]: the second sentence is cut
    assert spans == [[(1, 2), (2, 3), (3, 4)], [(1, 2), (2, 3), (3, 4), (4, 5)]]
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float64).reshape(2, 6, 3)
    wide = [[(1, 3), (3, 4)], [(1, 2), (2, 5)]]
    for mode, pick in (("first", lambda s, e: hidden[:, s]), ("last", lambda s, e: hidden[:, e - 1]),
                       ("mean", lambda s, e: hidden[:, s:e].mean(1))):
        pts, mask = word_points(hidden, wide, mode)
        assert mask.tolist() == [[True, True], [True, True]]
        torch.testing.assert_close(pts[0, 0], pick(1, 3)[0])
        torch.testing.assert_close(pts[1, 1], pick(2, 5)[1])
    pts, mask = word_points(hidden, wide, "all")  # SubOT: every subword of every word, no special token
    assert mask.sum(1).tolist() == [3, 4]
    torch.testing.assert_close(pts[1, :4], hidden[1, 1:5])
    assert not mask[0, 3] and torch.all(pts[0, 3] == 0)
    for mode in ("first", "last", "mean", "all"):  # one gather/scatter for the batch: its gradient too
        torch.autograd.gradcheck(lambda h: word_points(h, wide, mode)[0], hidden.clone().requires_grad_())


def test_frozen_copy_shares_nothing():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    frozen = frozen_copy(layer)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        layer[0].weight.add_(1.0)
    assert not torch.equal(layer[0].weight, frozen[0].weight)
    x = torch.randn(3, 4)
    torch.testing.assert_close(frozen(x), frozen(x))  # eval mode: no dropout


def test_words_and_links():
    assert moses_words(["L'homme a dit: « Oui »."], "fr") == [["L'", "homme", "a", "dit", ":", "«", "Oui", "»", "."]]
    with pytest.raises(ValueError, match="text 1 \\(de\\) has no words"):
        moses_words(["Am Anfang", "   "], "de")
    assert normalise("«Licht!»") == "licht"
    lexicon = {("licht", "light"), ("gott", "god"), ("sprach", "said"), ("sprach", "spoke")}
    links = lexicon_links(["Und", "Gott", "sprach", ":", "Licht", "Licht"], ["And", "God", "said", "light"], lexicon)
    assert links == [(1, 1), (2, 2)]  # 'Licht' twice: the link is not one-to-one, so it is dropped
    # a synthetic bitext: word k of one language translates word k of the other, order shuffled
    rng = np.random.default_rng(0)
    perms = [rng.permutation(rng.choice(30, rng.integers(3, 8), replace=False)) for _ in range(300)]
    src = [[f"s{k}" for k in p] for p in perms]
    order = [rng.permutation(len(p)) for p in perms]
    tgt = [[f"t{p[i]}" for i in o] for p, o in zip(perms, order)]
    got = eflomal_links(src, tgt)
    assert len(got) == len(src) and all(len({i for i, _ in g}) == len(g) == len({j for _, j in g}) for g in got)
    right = sum(src[n][i][1:] == tgt[n][j][1:] for n, g in enumerate(got) for i, j in g)
    assert right >= 0.9 * sum(len(g) for g in got) and sum(len(g) for g in got) >= 0.7 * sum(map(len, src))


# ----------------------------------------------------------------------------------- trainer

@pytest.mark.parametrize("variant,fields", [("base", {}), ("wordot", {}), ("subot", {}), ("l2_cao", {}),
                                            ("l2_cao", {"links": "lexicon"}), ("mix_languages", {}),
                                            ("wordot", {"scope": "pair", "reg_reduction": "mean"})])
def test_variants_train(tmp_path, tiny, variant, fields):
    cfg = _cfg(tmp_path, tiny, variant, variant=variant, **fields)
    result = wordot.train(cfg)
    align = 0 if variant == "base" else 64 // 16
    assert result.steps == align + 6
    rows = [r for r in _rows(cfg) if r["split"] == "train"]
    assert len(rows) == result.steps and all(np.isfinite(r["loss"]) for r in rows)
    if variant != "base":
        assert all(r["reg"] >= 0 and r["divergence"] > (0 if variant != "l2_cao" else -1e-9) for r in rows
                   if r["phase"] == "align")
    de, ko = result.metrics["de"], result.metrics["ko"]
    assert de["linked_words"] > 20 and 0 <= de["word_p1_cosine"] <= 1 and 0 <= de["coupling_p1"] <= 1
    assert "word_p1_cosine" not in ko and 0 <= ko["sentence_p1"] <= 1 and 0 <= ko["genre_macro_f1"] <= 1
    hits = result.info["hits"]["de"]
    assert len(hits["verse"]) == de["linked_words"] and np.mean(hits["cosine"]) == pytest.approx(de["word_p1_cosine"])


def test_divergence_falls_when_it_is_the_only_loss(tmp_path, tiny):
    # 16 pairs at batch 16: every step sees the same words (pooled OT ignores their order)
    cfg = _cfg(tmp_path, tiny, "fall", target_lang=["de"], n_pairs=16, batch_size=16, grad_accum=1, epochs=25.0,
               lr=3e-3, reg_lambda=0.0, task_steps=0)
    wordot.train(cfg)
    div = [r["divergence"] for r in _rows(cfg) if r["split"] == "train"]
    assert len(div) == 25 and div[-1] < 0.5 * div[0]


def test_regulariser_keeps_english_near_the_frozen_model(tmp_path, tiny):
    runs = {lam: _cfg(tmp_path, tiny, f"reg{lam}", target_lang=["de"], n_pairs=16, batch_size=16, grad_accum=1,
                      epochs=15.0, lr=3e-3, reg_lambda=lam, task_steps=0) for lam in (0.0, 1.0)}
    for cfg in runs.values():
        wordot.train(cfg)
    last = {lam: [r for r in _rows(cfg) if r["split"] == "train"][-1]["reg"] for lam, cfg in runs.items()}
    assert last[1.0] < last[0.0]


def test_resume_equals_uninterrupted(tmp_path, tiny):
    one = _cfg(tmp_path, tiny, "one")
    wordot.train(one)
    two = replace(one, output_dir=str(tmp_path / "two"))
    wordot.train(two, stop_after=3)  # inside stage 1 (4 updates), then the rest
    wordot.train(two, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(_rows(one)) == strip(_rows(two))


def test_init_from_needs_the_same_stage1_settings(tmp_path, tiny):
    first = _cfg(tmp_path, tiny, "stage1", task_steps=0, keep_checkpoints=1)
    wordot.train(first)
    stage2 = wordot.train(_cfg(tmp_path, tiny, "stage2", init_from=first.output_dir, seed=3))
    assert stage2.steps == 6 and [r["phase"] for r in _rows(_cfg(tmp_path, tiny, "stage2")) if r["split"] == "train"
                                  ] == ["task"] * 6
    with pytest.raises(ConfigError, match="init_from: .* other stage-1 settings \\(\\['lr'\\]\\)"):
        wordot.train(_cfg(tmp_path, tiny, "bad", init_from=first.output_dir, lr=1e-4))


def test_geomloss_gives_the_same_training(tmp_path, tiny):
    rows = []
    for backend in ("cpu", "geomloss"):
        cfg = _cfg(tmp_path, tiny, f"ot-{backend}", ot_backend=backend, task_steps=0, target_lang=["de"], grad_accum=1)
        wordot.train(cfg)
        rows.append([(r["divergence"], r["reg"]) for r in _rows(cfg) if r["split"] == "train"])
    # float32: the two solvers round differently (~1e-6 relative), and training carries it along
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-4)


def test_bitext_path(tmp_path, tiny):
    pairs = load_parallel("de", "en", "train_a")
    path = tmp_path / "de-en.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in zip(pairs.first[:48], pairs.second[:48])), encoding="utf-8")
    result = wordot.train(_cfg(tmp_path, tiny, "bitext", bitext=str(path), target_lang=["de"], n_pairs=0))
    assert result.steps == 48 // 16 + 6 and "word_p1_cosine" in result.metrics["de"]


def test_bitext_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("Am Anfang\tIn the beginning\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}, line 2: expected 'sentence<TAB>sentence', got 1"):
        read_bitext(path)
    path.write_text("Am Anfang\tIn the beginning\nUnd Gott sprach\t  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}, line 2, column 2: empty sentence"):
        read_bitext(path)


@pytest.mark.parametrize("args,message", [
    (["--word_langs", "ko", "--eval_langs", "ko"], "word_langs: word retrieval needs a FreeDict lexicon, and there "
                                                   "is none for en-ko"),
    (["--word_langs", "de", "--target_lang", "fr"], "word_langs: \\['de'\\] are not evaluated"),
    (["--variant", "mix_languages", "--target_lang", "de"], "variant: mix_languages mixes two or more"),
    (["--variant", "l2_cao", "--links", "lexicon", "--target_lang", "ko"], "links: no FreeDict lexicon for en-ko"),
    (["--target_lang", "xx"], "target_lang: no Bible translation for \\['xx'\\]"),
    (["--bitext", "nope.tsv", "--target_lang", "de", "fr"], "bitext: a bitext file holds one language pair"),
    (["--variant", "base", "--init_from", "somewhere"], "init_from: base has no stage 1"),
])
def test_bad_configs_fail_before_work(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(wordot.WordOTConfig, None, args)


def test_xnli_stage2_from_local_files(tmp_path, tiny):
    """The online path's stage 2 (XNLI through `datasets`), on small local files in XNLI's layout."""
    rng = np.random.default_rng(0)
    for lang, split, n in (("en", "train", 48), ("en", "test", 12), ("de", "test", 12), ("fr", "test", 12)):
        pairs = load_parallel(lang if lang != "en" else "de", "en", "test")
        side = pairs.second if lang == "en" else pairs.first
        rows = [{"premise": side[i], "hypothesis": side[i + 1], "label": int(rng.integers(3))} for i in range(n)]
        (tmp_path / f"xnli.{lang}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, tiny, "xnli", task="xnli", xnli_files=str(tmp_path / "xnli.{lang}.{split}.jsonl"),
               n_task=48, n_eval=12, eval_langs=[])
    result = wordot.train(cfg)
    assert result.steps == 64 // 16 + 6
    for lang in ("en", "de", "fr"):
        m = result.metrics[lang]
        assert 0 <= m["xnli_accuracy"] <= 1 and "genre_macro_f1" not in m
    assert "word_p1_cosine" in result.metrics["de"]  # the Bible word-level evaluation still runs
    with pytest.raises(ConfigError, match="xnli_files: .* needs both"):
        load_config(wordot.WordOTConfig, None, ["--task", "xnli", "--xnli_files", "x.jsonl"])


def test_data_parallel_is_refused(tmp_path, tiny):
    """A pooled OT over a batch split across processes is another objective: refused, not run."""
    from types import SimpleNamespace

    cfg = _cfg(tmp_path, tiny, "ddp")
    ctx = SimpleNamespace(dist=SimpleNamespace(world_size=2))  # what build reads first
    with pytest.raises(ConfigError, match="world_size: WordOT runs in one process \\(got 2\\)"):
        wordot.build(cfg, ctx)
