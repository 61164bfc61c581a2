"""The WCA trainer (xlt_fast.trainers.wca; spec part A) on a tiny random BERT (3 layers, width 32)
over real Bible verses, fast and offline: every variant trains, the alignment loss falls when it
is trained, cached and trained alignment layers give what the whole encoder gives, resume equals
uninterrupted, the NER task from CoNLL files (and the hub path with a stand-in loader), the
errors name the file and line, entity F1 agrees with seqeval, and bad configs fail naming the
field."""
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from tiny_encoder import bible_texts, make_tiny_encoder

from xlt_fast import metrics
from xlt_fast.data.bible import load_parallel
from xlt_fast.data.core import TokenDataset
from xlt_fast.data.words import moses_words
from xlt_fast.models.tokens import EncoderTop, word_points, word_spans
from xlt_fast.nn import token_alignment as ta
from xlt_fast.trainers import wca
from xlt_fast.training import (
    ConfigError,
    Context,
    Dist,
    checkpoint,
    load_config,
    replace,
)

LANGS = ["de", "fr"]
VARIANTS = ["task_only", "nearest_token", "aligner", "wca_soft", "wca_hard"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny"), bible_texts(LANGS), layers=3, hidden=32))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XLT_FAST_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path, tiny, name, **kw):
    fields = {"encoder": tiny, "target_lang": ["de"], "layers": [1, 2, 3], "trainable_layers": 1, "n_task": 32,
              "n_pairs": 32, "n_eval": 20, "batch_size": 8, "pair_batch_size": 8, "epochs": 1.0, "max_length": 48,
              "progress": False, "plots": False, "log_every": 1, "output_dir": str(tmp_path / name)}
    return replace(wca.WCAConfig(), **{**fields, **kw})


def _rows(cfg, split="train"):
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def _built(cfg):
    """``(state, ctx)`` of a config, as the engine builds it (no training)."""
    ctx = Context(cfg, Dist(cfg.device), Path(cfg.output_dir))
    return ctx.attach(wca.build(cfg, ctx)), ctx


def _full_hidden(tiny, words, max_length):
    """The whole encoder's hidden states (eval mode) of pre-split sentences, and the word spans."""
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    return model, enc, hidden, word_spans(tok, words, max_length)


def _with_top(tiny, top):
    """The whole encoder (eval mode) with its top layers replaced by a copy of ``top``'s weights."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny).eval()
    layers = model.encoder.layer
    for k, layer in enumerate(top.layers):
        layers[len(layers) - len(top.layers) + k].load_state_dict(layer.state_dict())
    return model


def _full_alignment(tiny, cfg, model, src_words, tgt_words):
    """L_w (Eq. 3) of the hard coupling, by hand from ``model``'s hidden states at ``cfg.layers``
    on the real subword tokens of each side (no cache, no trainer code)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)

    def clouds(words):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=cfg.max_length, padding=True,
                  return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        spans = word_spans(tok, words, cfg.max_length)
        pts = [word_points(hs[layer], spans, "all") for layer in cfg.layers]
        return torch.stack([p for p, _ in pts]), pts[0][1]

    xs, xm = clouds(src_words)
    ys, ym = clouds(tgt_words)
    costs = ta.cosine_costs(xs, ys)
    T = ta.token_coupling(costs, xm, ym, "hard", eps=cfg.eps, n_iters=cfg.n_iters, tol=cfg.tol)
    return float(ta.alignment_loss(T, costs))


def _side(cfg, stack, top, idx):
    """One side's alignment-layer states ``(B, T, d)`` for ``wca.alignment``: cached below the top,
    the top's outputs above (``top`` on the cached input states), and the spans."""
    x, mask, spans = stack.input.batch(idx)
    outputs = top(x, mask, every_layer=True)
    first = 3 - len(top.layers) + 1
    states = [outputs[layer - first] if layer >= first else stack.fixed[layer].batch(idx)[0] for layer in cfg.layers]
    return states, spans


# ----------------------------------------------------------------------------------- variants

@pytest.mark.parametrize("variant,fields", [(v, {}) for v in VARIANTS] +
                         [("aligner", {"links": "lexicon"}), ("wca_hard", {"target_lang": ["de", "fr"]})])
def test_variants_train_and_evaluate(tmp_path, tiny, variant, fields):
    cfg = _cfg(tmp_path, tiny, variant, variant=variant, **fields)
    result = wca.train(cfg)
    assert result.steps == 32 // 8
    rows = _rows(cfg)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["task"]) for r in rows)
    if variant == "task_only":
        assert all("align" not in r and r["loss"] == r["task"] for r in rows)
    else:  # Eq. 7 with beta = 1e-2; L_w sums the cosine distance over the 3 layers: in [0, 6]
        assert all(0 <= r["align"] <= 6 and r["loss"] == pytest.approx(r["task"] + 1e-2 * r["align"], rel=1e-5)
                   for r in rows)
    langs = cfg.target_lang
    assert set(result.metrics) == {"en", *langs}
    assert set(result.metrics["en"]) == {"macro_f1", "accuracy"}
    for lang in langs:
        m = result.metrics[lang]
        assert set(m) == {"macro_f1", "accuracy", "align_hard"}
        assert 0 < m["align_hard"] < 6
    for m in result.metrics.values():
        assert 0 <= m["macro_f1"] <= 1 and 0 <= m["accuracy"] <= 1
    if variant == "aligner":
        state, _ = _built(replace(cfg, output_dir=str(tmp_path / "links")))
        links = state.data.pairs["de"].links
        assert len(links) == 32 and sum(map(len, links)) > 32  # word links on most pairs
        src, tgt = state.data.pairs["de"].src.input.words, state.data.pairs["de"].tgt.input.words
        assert all(i < len(src[k]) and j < len(tgt[k]) for k, pair in enumerate(links) for i, j in pair)


def test_several_target_languages_take_turns(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, "turns", target_lang=["de", "fr"], n_pairs=16)
    state, ctx = _built(cfg)
    assert set(state.data.pairs) == {"de", "fr"} and set(state.data.eval_pairs) == {"de", "fr"}
    # one English side, the same verses for both languages (shared ids)
    assert state.data.pairs["de"].src.input.words == state.data.pairs["fr"].src.input.words
    assert state.data.pairs["de"].tgt.input.words != state.data.pairs["fr"].tgt.input.words
    state.modules["top"].eval()  # no dropout: the step's L_w is a function of its batch and the weights
    for step in range(4):  # train_step takes de, fr, de, fr
        state.phase_step = step
        lang = ("de", "fr")[step % 2]
        before = {k: state.streams[f"pairs/{k}"].position for k in ("de", "fr")}
        batch = state.streams[f"pairs/{lang}"].global_batch(before[lang]).tolist()
        ps = state.data.pairs[lang]
        want = _full_alignment(tiny, cfg, _with_top(tiny, state.modules["top"]), [ps.src.input.words[i] for i in batch],
                               [ps.tgt.input.words[i] for i in batch])
        out = wca.train_step(cfg, state, ctx)
        after = {k: state.streams[f"pairs/{k}"].position for k in ("de", "fr")}
        assert after == {k: before[k] + (k == lang) for k in ("de", "fr")}, step
        assert out["align"] == pytest.approx(want, rel=1e-4), step


# ----------------------------------------------------------------------------------- the loss falls

def test_alignment_loss_falls_when_trained(tmp_path, tiny):
    """beta large, the head nearly frozen: the held-out L_w falls below its value at step 0 and
    below task_only's after the same steps (held-out pairs: not the ones trained on)."""
    common = {"trainable_layers": 2, "n_task": 16, "n_pairs": 16, "pair_batch_size": 16, "epochs": 6.0, "lr": 3e-3,
              "head_lr": 1e-6, "beta": 10.0}
    aligned = _cfg(tmp_path, tiny, "aligned", variant="wca_hard", **common)
    state, ctx = _built(replace(aligned, output_dir=str(tmp_path / "start")))
    start = wca.evaluate(state, ctx)["de"]["align_hard"]
    trained = wca.train(aligned).metrics["de"]["align_hard"]
    plain = wca.train(_cfg(tmp_path, tiny, "plain", variant="task_only", **common)).metrics["de"]["align_hard"]
    assert trained < 0.7 * start and trained < 0.7 * plain, (start, trained, plain)
    align = [r["align"] for r in _rows(aligned)]
    assert len(align) == 12 and align[-1] < 0.7 * align[0]


# ------------------------------------------------------------------------------ cached and trained

def test_cached_and_trained_alignment_layers_equal_the_whole_encoder(tmp_path, tiny):
    """trainable_layers=2 of 3 with layers [1, 2, 3]: layer 1 from the cache (a constant), layers
    2-3 from the trained top; the held-out L_w equals the one computed from the whole encoder's
    hidden states, and the gradient of L_w reaches the top's parameters (not the cached layer)."""
    cfg = _cfg(tmp_path, tiny, "split", trainable_layers=2)
    state, ctx = _built(cfg)
    ps = state.data.eval_pairs["de"]
    assert set(ps.src.fixed) == {1} and set(ps.tgt.fixed) == {1}
    src_words, tgt_words = ps.src.input.words, ps.tgt.input.words
    assert len(src_words) == 20

    # EncoderTop(every_layer=True) on the cached layer-1 states = the encoder's hidden states 2 and 3
    model, enc, hidden, _spans = _full_hidden(tiny, tgt_words, cfg.max_length)
    top = EncoderTop(model, 2).eval()
    x, mask, _ = ps.tgt.input.batch(range(len(tgt_words)))
    with torch.no_grad():
        outs = top(x, mask, every_layer=True)
    real = enc["attention_mask"].bool()
    assert len(outs) == 2
    for k, layer in enumerate((2, 3)):
        torch.testing.assert_close(outs[k][real], hidden[layer][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x[real], hidden[1][real], rtol=1e-5, atol=1e-5)

    # held-out L_w of the hard coupling = by hand from the whole encoder
    got = wca.evaluate(state, ctx)["de"]["align_hard"]
    assert got == pytest.approx(_full_alignment(tiny, cfg, model, src_words, tgt_words), rel=1e-4)

    # the gradient of L_w reaches both trained layers; the cached layer's states are constants
    top = state.modules["top"]
    idx = list(range(8))
    src, tgt = _side(cfg, ps.src, top, idx), _side(cfg, ps.tgt, top, idx)
    assert not src[0][0].requires_grad and src[0][1].requires_grad and src[0][2].requires_grad
    loss = wca.alignment(cfg, "hard", src, tgt)
    assert torch.isfinite(loss) and loss.requires_grad
    top.zero_grad()
    loss.backward()
    for k, layer in enumerate(top.layers):
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), k
        assert sum(float(g.abs().sum()) for g in grads) > 0, k
    # and a run of this split trains to finite results
    result = wca.train(cfg)
    assert all(math.isfinite(v) for m in result.metrics.values() for v in m.values())


# ----------------------------------------------------------------------------------- resume

def test_resume_equals_uninterrupted(tmp_path, tiny):
    """Dropout on, two languages in turn: stop after 3 of 6 steps, resume; the same metrics rows,
    the same final weights bit for bit, the same results."""
    one = _cfg(tmp_path, tiny, "one", target_lang=["de", "fr"], trainable_layers=2, n_task=48, n_pairs=24)
    wca.train(one)
    two = replace(one, output_dir=str(tmp_path / "two"))
    assert wca.train(two, stop_after=3) is None
    wca.train(two, resume=True)
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert len(_rows(one)) == 6 and strip(_rows(one, None)) == strip(_rows(two, None))
    states = [torch.load(checkpoint.latest(Path(c.output_dir) / "checkpoints") / "state.pt",
                         weights_only=True)["modules"] for c in (one, two)]
    assert set(states[0]) == {"top", "head"}
    for module in ("top", "head"):
        assert states[0][module].keys() == states[1][module].keys()
        for k in states[0][module]:
            assert torch.equal(states[0][module][k], states[1][module][k]), (module, k)
    results = [json.loads((Path(c.output_dir) / "results.json").read_text()) for c in (one, two)]
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["steps"] == results[1]["steps"] == 6


def test_two_processes_match_one(tmp_path, tiny):
    """torchrun, 2 CPU processes on gloo, the same global batches (8 labelled + 8 pairs, each process
    4 + 4): the couplings are per pair and both losses are means, so the averaged gradients are the
    1-process gradients; equal within fp32 all-reduce rounding after 18 AdamW steps (dropout off:
    per-process masks)."""
    import os
    import subprocess
    import sys

    args = ["train", "wca", "--encoder", tiny, "--target_lang", "de", "fr", "--layers", "1", "2", "3",
            "--trainable_layers", "2", "--n_task", "48", "--n_pairs", "24", "--n_eval", "20", "--batch_size", "8",
            "--pair_batch_size", "8", "--max_length", "48", "--dropout", "0", "--no_progress", "--no_plots"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "xlt_fast.cli"] + args + ["--output_dir", str(tmp_path / "one")],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "xlt_fast.cli"] + args + ["--output_dir", str(tmp_path / "two")], check=True, env=env,
                   timeout=300)
    states = [torch.load(checkpoint.latest(tmp_path / d / "checkpoints") / "state.pt", weights_only=True)["modules"]
              for d in ("one", "two")]
    for module in ("top", "head"):
        for k, v in states[0][module].items():
            torch.testing.assert_close(states[1][module][k], v, rtol=1e-4, atol=1e-5, msg=f"{module}.{k}")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["steps"] == r1["steps"] == 18  # 3 epochs of 48 labelled sentences in batches of 8
    for lang in ("de", "fr"):
        assert r2["metrics"][lang]["align_hard"] == pytest.approx(r1["metrics"][lang]["align_hard"], rel=1e-4)


# ----------------------------------------------------------------------------------- NER

def _rule_tags(words):
    """A capitalised word inside the sentence is a NAME (consecutive ones: one entity), in IOB2."""
    tags = []
    for k, w in enumerate(words):
        name = k > 0 and w[:1].isupper()
        tags.append(("I-NAME" if tags[-1] != "O" else "B-NAME") if name else "O")
    return tags


def _iob1(tags):
    """IOB2 -> IOB1 for tags without two adjacent entities of one type (every entity starts with I-)."""
    return [t.replace("B-", "I-") for t in tags]


def _bioes(tags):
    out = []
    for k, t in enumerate(tags):
        nxt = tags[k + 1] if k + 1 < len(tags) else "O"
        cont = nxt.startswith("I-")
        if t.startswith("B-"):
            out.append(("B-" if cont else "S-") + t[2:])
        elif t.startswith("I-"):
            out.append(("I-" if cont else "E-") + t[2:])
        else:
            out.append(t)
    return out


def _write_conll(path, sentences, tags, extra=None):
    """``-DOCSTART-``, a blank line, then ``word tag`` lines with blank lines between sentences;
    returns each token's line number (1-based). ``extra[(s, w)]`` adds columns to one line."""
    lines, where = ["-DOCSTART- O", ""], []
    for s, (words, ts) in enumerate(zip(sentences, tags)):
        where.append([])
        for w, (word, tag) in enumerate(zip(words, ts)):
            lines.append(" ".join([word, *((extra or {}).get((s, w), [])), tag]))
            where[-1].append(len(lines))
        lines.append("")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return where


def _ner_sentences(lang, n):
    pairs = load_parallel(lang if lang != "en" else "de", "en", "train_a" if lang == "en" else "test")
    return moses_words((pairs.second if lang == "en" else pairs.first)[:n], lang)


def _ner_files(tmp_path, convert=None):
    convert = convert or (lambda t: t)
    out = {}
    for lang, n in (("en", 40), ("de", 12), ("fr", 12)):
        words = _ner_sentences(lang, n)
        path = tmp_path / f"ner.{lang}.conll"
        _write_conll(path, words, [convert(_rule_tags(w)) for w in words])
        out[lang] = path
    return out


def _ner_cfg(tmp_path, tiny, name, files, **kw):
    return _cfg(tmp_path, tiny, name, task="ner", ner_train=str(files["en"]),
                ner_test=str(tmp_path / "ner.{lang}.conll"), n_task=40, **kw)


def test_ner_from_conll_files(tmp_path, tiny):
    files = _ner_files(tmp_path)
    cfg = _ner_cfg(tmp_path, tiny, "ner", files, target_lang=["de", "fr"], trainable_layers=2)
    result = wca.train(cfg)
    assert result.steps == 40 // 8
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["align"]) for r in _rows(cfg))
    assert set(result.metrics) == {"en", "de", "fr"}  # the English test file exists: evaluated too
    for lang in ("en", "de", "fr"):
        assert 0 <= result.metrics[lang]["entity_f1"] <= 1 and "macro_f1" not in result.metrics[lang]
    for lang in ("de", "fr"):
        assert 0 < result.metrics[lang]["align_hard"] < 6


def test_ner_labels_are_the_first_subword_tags_in_iob2_whatever_the_file_scheme(tmp_path, tiny):
    data = {}
    for scheme, convert in (("IOB2", None), ("IOB1", _iob1), ("BIOES", _bioes)):
        where = tmp_path / scheme
        where.mkdir()
        files = _ner_files(where, convert=convert)
        cfg = _cfg(tmp_path, tiny, f"ner-{scheme}", task="ner", ner_train=str(files["en"]), tag_scheme=scheme,
                   ner_test=str(where / "ner.{lang}.conll"), n_task=40)
        data[scheme] = _built(cfg)[0].data
    words = _ner_sentences("en", 40)
    gold = [_rule_tags(w) for w in words]
    for scheme, d in data.items():
        assert d.tag_names == ["O", "B-NAME", "I-NAME"], scheme
        assert [[d.tag_names[t] for t in sent] for sent in d.labels] == gold, scheme
        assert d.task.words == words
        assert d.evals["de"][1] == [_rule_tags(w) for w in _ner_sentences("de", 12)], scheme
    # the task loss: cross entropy on the first subword of each word only (A1.3), in eval mode by hand
    # names written "Name's": several subwords (the tokenizer splits at the apostrophe), one label
    words = [[w + "'s" if t == "B-NAME" else w for w, t in zip(ws, _rule_tags(ws))] for ws in _ner_sentences("en", 40)]
    _write_conll(tmp_path / "possessive.conll", words, [_rule_tags(w) for w in words])
    cfg = _cfg(tmp_path, tiny, "ner-loss", task="ner", ner_train=str(tmp_path / "possessive.conll"),
               ner_test=str(tmp_path / "IOB2" / "ner.{lang}.conll"), n_task=40, variant="task_only", max_length=128)
    state, ctx = _built(cfg)
    d, top, head = state.data, state.modules["top"].eval(), state.modules["head"]
    idx = state.streams["task"].global_batch(0).tolist()
    x, mask, spans = d.task.batch(idx)
    with torch.no_grad():
        logits = head(top(x, mask))
    firsts = [(b, start, d.labels[i][w]) for b, i in enumerate(idx) for w, (start, _) in enumerate(spans[b])]
    assert len(firsts) == sum(len(d.task.words[i]) for i in idx)  # max_length cuts no word here
    assert sum(e - s > 1 for sp in spans for s, e in sp) >= 3  # words of several subwords: their rest is ignored
    want = torch.nn.functional.cross_entropy(torch.stack([logits[b, t] for b, t, _ in firsts]),
                                             torch.tensor([y for _, _, y in firsts]))
    assert wca.train_step(cfg, state, ctx)["task"] == pytest.approx(float(want), rel=1e-5)


def test_ner_test_tag_outside_the_training_tags_names_the_file_and_line(tmp_path, tiny):
    files = _ner_files(tmp_path)
    words = _ner_sentences("de", 12)
    tags = [_rule_tags(w) for w in words]
    tags[2][3] = "B-PLACE"
    where = _write_conll(files["de"], words, tags)
    cfg = _ner_cfg(tmp_path, tiny, "unknown", files)
    message = f"{files['de']}, line {where[2][3]}: tag 'B-PLACE' is not among the training tags"
    with pytest.raises(ValueError, match=re.escape(message)):
        wca.train(cfg)
    assert not (Path(cfg.output_dir) / "results.json").exists()


def test_every_iob2_tag_of_a_training_entity_type_is_a_label(tmp_path, tiny):
    """English training names of one word only (B-NAME, no I-NAME): I-NAME in a test file is still a
    tag of a known type, so it is a label (not an error), and the label set is O, B-NAME, I-NAME."""
    files = _ner_files(tmp_path)
    words = _ner_sentences("en", 40)
    _write_conll(files["en"], words, [[t.replace("I-", "B-") for t in _rule_tags(w)] for w in words])
    de = _ner_sentences("de", 12)
    tags = [_rule_tags(w) for w in de]
    tags[0][1:3] = ["B-NAME", "I-NAME"]
    _write_conll(files["de"], de, tags)
    state, _ = _built(_ner_cfg(tmp_path, tiny, "types", files))
    assert state.data.tag_names == ["O", "B-NAME", "I-NAME"]
    assert state.data.evals["de"][1][0][1:3] == ["B-NAME", "I-NAME"]


def test_malformed_conll_names_the_file_and_line(tmp_path, tiny):
    files = _ner_files(tmp_path)
    words = _ner_sentences("fr", 12)
    where = _write_conll(files["fr"], words, [_rule_tags(w) for w in words], extra={(4, 1): ["NN"]})
    cfg = _ner_cfg(tmp_path, tiny, "malformed", files, target_lang=["de", "fr"])
    message = f"{files['fr']}, line {where[4][1]}: 3 columns, but line {where[0][0]} has 2"
    with pytest.raises(ValueError, match=re.escape(message)):
        wca.train(cfg)


@pytest.mark.parametrize("case", ["I_after_O", "BIOES_as_IOB2"])
def test_tag_scheme_mismatch_names_the_file_and_line(tmp_path, tiny, case):
    files = _ner_files(tmp_path)
    words = _ner_sentences("en", 40)
    tags = [_rule_tags(w) for w in words]
    if case == "I_after_O":
        s, w = next((s, w) for s, t in enumerate(tags) for w in range(1, len(t)) if s > 3 and t[w - 1] == t[w] == "O")
        tags[s][w] = "I-NAME"  # an I- that continues nothing: invalid IOB2
        bad = "tag 'I-NAME' does not continue an entity (IOB2)"
    else:
        tags = [_bioes(t) for t in tags]
        s, w = next((s, t.index("S-NAME")) for s, t in enumerate(tags) if "S-NAME" in t)
        bad = "tag 'S-NAME' is not valid IOB2"
    where = _write_conll(files["en"], words, tags)
    cfg = _ner_cfg(tmp_path, tiny, "scheme", files)
    with pytest.raises(ValueError, match=re.escape(f"{files['en']}, line {where[s][w]}, column 2: {bad}")):
        wca.train(cfg)


def _fixture_set(lang, split, n):
    words = _ner_sentences(lang, n)
    return TokenDataset(words, [_rule_tags(w) for w in words])


def test_ner_from_the_hub_path_reads_the_loader(tmp_path, tiny, monkeypatch):
    """ner_train / ner_test = 'wikiann' go through load_wikiann (here a stand-in: no network)."""
    calls = []

    def fake(lang, split="train", **kw):
        calls.append((lang, split))
        return _fixture_set(lang, split, 48 if split == "train" else 12)

    monkeypatch.setattr(wca, "load_wikiann", fake)
    monkeypatch.setattr(wca, "load_conll_ner", lambda *a, **k: pytest.fail("load_conll_ner must not be called"))
    cfg = _cfg(tmp_path, tiny, "hub", task="ner", ner_train="wikiann", ner_test="wikiann", n_task=40)
    state, _ = _built(replace(cfg, output_dir=str(tmp_path / "hub-built")))
    assert sorted(set(calls)) == [("de", "test"), ("en", "test"), ("en", "train")]
    want = _fixture_set("en", "train", 48)
    assert state.data.task.words == want.tokens[:40]  # the first n_task sentences
    assert [[state.data.tag_names[t] for t in s] for s in state.data.labels] == want.tags[:40]
    assert state.data.evals["de"][1] == _fixture_set("de", "test", 12).tags
    assert state.data.evals["en"][1] == _fixture_set("en", "test", 12).tags
    result = wca.train(cfg)
    assert set(result.metrics) == {"en", "de"} and all(0 <= m["entity_f1"] <= 1 for m in result.metrics.values())

    # an unknown tag in a hub set (no file): the error names the sentence and the word
    def odd(lang, split="train", **kw):
        data = fake(lang, split)
        if split == "test" and lang == "de":
            data.tags[1][2] = "B-MISC"
        return data

    monkeypatch.setattr(wca, "load_wikiann", odd)
    with pytest.raises(ValueError, match=re.escape("sentence 1, word 2: tag 'B-MISC' is not among")):
        wca.prepare(replace(cfg, output_dir=str(tmp_path / "hub-odd")))


# ----------------------------------------------------------------------------------- seqeval

def _random_iob2(rng, n, types):
    tags, k = [], 0
    while k < n:
        if rng.random() < 0.5:
            tags.append("O")
            k += 1
            continue
        kind, length = rng.choice(types), rng.randint(1, 3)
        for i in range(min(length, n - k)):
            tags.append(("B-" if i == 0 else "I-") + kind)
        k += min(length, n - k)
    return tags


def _random_any(rng, n, types, prefixes="BI"):
    """Any sequence of O / prefix-TYPE tags: IOB1 (I- starts entities), BIOES, and tag sequences no
    scheme allows."""
    return [("O" if rng.random() < 0.35 else f"{rng.choice(prefixes)}-{rng.choice(types)}") for _ in range(n)]


@pytest.mark.filterwarnings("ignore:F-score is ill-defined")  # seqeval, on cases without entities (both 0)
@pytest.mark.parametrize("kind", ["IOB2", "IOB1", "BIOES"])
def test_entity_f1_equals_seqeval(kind):
    """seqeval's default mode (conlleval's reading), on many random cases."""
    from seqeval.metrics import f1_score

    rng = random.Random(0)
    types = ["PER", "LOC", "ORG"]
    draw = {"IOB2": _random_iob2, "IOB1": _random_any,
            "BIOES": lambda rng, n, types: _random_any(rng, n, types, "BIES")}[kind]
    values = []
    for case in range(400):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 5))]
        gold = [draw(rng, n, types[:1 + case % 3]) for n in lengths]
        if case % 4 == 0:  # predictions near the gold: partial and exact matches
            pred = [[t if rng.random() < 0.8 else rng.choice(["O", "B-PER", "I-PER"]) for t in s] for s in gold]
        else:
            pred = [draw(rng, n, types[:1 + case % 3]) for n in lengths]
        got, want = metrics.entity_f1(gold, pred), f1_score(gold, pred)
        assert got == pytest.approx(float(want), abs=1e-12), (gold, pred)
        values.append(got)
    assert len({round(v, 6) for v in values}) > 20 and max(values) == 1.0  # not a constant


def test_entity_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG"]]
    # gold: PER(0-1), LOC(3), ORG(1-2); pred: PER(0-1), ORG(3), ORG(1-2): 2 of 3 either way
    assert metrics.entity_f1(gold, pred) == pytest.approx(2 / 3)
    assert metrics.entity_f1([["O"]], [["O"]]) == 0.0
    with pytest.raises(ValueError, match="sentence 0: 2 true tags but 1 predicted"):
        metrics.entity_f1([["O", "O"]], [["O"]])


# ----------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("args,message", [
    (["--task", "ner", "--ner_train", "wikiann", "--ner_test", "test.conll"],
     "ner_test: 'test.conll' needs {lang}"),
    (["--task", "ner"], "ner_train, ner_test: task=ner needs both"),
    (["--task", "ner", "--ner_test", "wikiann"], "ner_train, ner_test: task=ner needs both"),
    (["--task", "ner", "--ner_train", "nope.conll", "--ner_test", "wikiann"], "ner_train: no such file 'nope.conll'"),
    (["--task", "ner", "--ner_train", "wikiann", "--ner_test", "missing.{lang}.conll"],
     "ner_test: no file for \\['de'\\]"),
    (["--ner_train", "wikiann"], "ner_train, ner_test: given, but task is not ner"),
    (["--layers", "0"], "layers: hidden-state indices start at 1"),
    (["--layers", "2", "2"], "layers: one or more distinct hidden-state indices"),
    (["--variant", "aligner", "--links", "lexicon", "--target_lang", "ko"], "links: no FreeDict lexicon for en-ko"),
    (["--target_lang", "en"], "target_lang: en is the source language"),
    (["--target_lang", "xx"], "target_lang: no Bible translation for \\['xx'\\]"),
])
def test_bad_configs_fail_before_work(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(wca.WCAConfig, None, args)


def test_aligner_with_a_lexicon_language_is_accepted():
    cfg = load_config(wca.WCAConfig, None, ["--variant", "aligner", "--links", "lexicon", "--target_lang", "de", "fr"])
    assert cfg.target_lang == ["de", "fr"]


@pytest.mark.parametrize("fields", [{"trainable_layers": 4}, {"layers": [2, 3, 4]}])
def test_more_layers_than_the_encoder_fail_at_build(tmp_path, tiny, fields):
    cfg = _cfg(tmp_path, tiny, "deep", **fields)
    with pytest.raises(ConfigError, match="trainable_layers, layers: the encoder has 3 layers"):
        wca.train(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints").exists() or not list((Path(cfg.output_dir) / "checkpoints")
                                                                          .iterdir())
