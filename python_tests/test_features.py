"""The frozen-feature cache: encodes each text once, returns exactly what a fresh encoding gives,
rebuilds partial or corrupt parts, and never serves a stale row (other model, layer, pooling, prefix)."""
import pytest
import torch

from tiny_encoder import make_tiny_encoder
from xlt_fast.models import load_encoder, pool
from xlt_fast.training import FeatureCache, model_fingerprint

TEXTS = [f"verse {i} of the book of {w}" for i, w in enumerate(["kings", "psalms", "acts", "job", "ruth"] * 8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny"), TEXTS))


def _direct(model_dir, texts, layer, pooling="mean", prefix=""):
    enc = load_encoder(model_dir, progress=False)
    with torch.no_grad():
        states, mask = enc.hidden_states([prefix + t for t in texts])
    return pool(states[layer], mask, pooling)


def test_cache_encodes_once_and_matches_direct_encoding(tmp_path, tiny):
    cache = FeatureCache(tmp_path)
    got = cache.get(TEXTS, encoder=tiny, layers=(1, 2), progress=False)
    assert cache.encoded == len(set(TEXTS)) and cache.loaded == 0
    for layer in (1, 2):
        torch.testing.assert_close(got[layer], _direct(tiny, TEXTS, layer), rtol=1e-5, atol=1e-6)
    again = FeatureCache(tmp_path)  # a new process reading the same cache
    second = again.get(TEXTS[::-1], encoder=tiny, layers=(2,), progress=False)
    assert again.encoded == 0 and again.loaded == len(set(TEXTS))
    assert torch.equal(second[2], got[2].flip(0))
    extra = TEXTS[:5] + ["a new verse"]
    third = again.get(extra, encoder=tiny, layers=(2,), progress=False)
    assert again.encoded == 1  # only the text no request had
    torch.testing.assert_close(third[2], _direct(tiny, extra, 2), rtol=1e-5, atol=1e-6)


def test_key_covers_model_layer_pooling_and_prefix(tmp_path, tiny):
    cache = FeatureCache(tmp_path)
    base = cache.get(TEXTS[:6], encoder=tiny, layers=(2,), progress=False)[2]
    for kw in ({"layers": (1,)}, {"pooling": "cls"}, {"prefix": "query: "}):
        before = cache.encoded
        out = cache.get(TEXTS[:6], encoder=tiny, **{"layers": (2,), **kw}, progress=False)
        assert cache.encoded == before + 6, kw
        assert not torch.equal(next(iter(out.values())), base)
    other = make_tiny_encoder(tmp_path / "other", TEXTS, seed=1)  # same files, other weights
    assert model_fingerprint(str(other)) != model_fingerprint(tiny)
    before = cache.encoded
    cache.get(TEXTS[:6], encoder=str(other), layers=(2,), progress=False)
    assert cache.encoded == before + 6


@pytest.mark.parametrize("damage", ["truncate", "no_manifest", "flip_byte"])
def test_partial_or_corrupt_part_is_rebuilt(tmp_path, tiny, damage):
    cache = FeatureCache(tmp_path)
    good = cache.get(TEXTS, encoder=tiny, layers=(2,), progress=False)[2]
    [part] = list(tmp_path.rglob("part-*.pt"))
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[:100])
    elif damage == "no_manifest":
        part.with_suffix(".json").unlink()
    else:
        blob = bytearray(part.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        part.write_bytes(bytes(blob))
    fresh = FeatureCache(tmp_path)
    rebuilt = fresh.get(TEXTS, encoder=tiny, layers=(2,), progress=False)[2]
    assert fresh.encoded == len(set(TEXTS))  # nothing was read from the damaged part
    torch.testing.assert_close(rebuilt, good, rtol=1e-5, atol=1e-6)
    assert len(list(tmp_path.rglob("part-*.json"))) == 1


def test_bad_layer_names_the_range(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"layers \[3\] outside 0..2"):
        FeatureCache(tmp_path).get(TEXTS[:2], encoder=tiny, layers=(3,), progress=False)


def test_only_parts_holding_wanted_texts_are_read(tmp_path, tiny):
    """A manifest lists its part's keys: a request reads the parts that hold one of its texts and
    no other; a part written before the list existed is read, and its manifest gains the list."""
    import json

    first, second = TEXTS[:10], TEXTS[10:20]
    writer = FeatureCache(tmp_path)
    writer.get(first, encoder=tiny, layers=(1,), progress=False)
    writer.get(second, encoder=tiny, layers=(1,), progress=False)
    key_dir = next(d for d in tmp_path.iterdir() if d.is_dir())
    manifests = sorted(key_dir.glob("part-*.json"))
    assert len(manifests) == 2 and all(len(json.loads(m.read_text())["keys"]) == 10 for m in manifests)
    reader = FeatureCache(tmp_path)
    got = reader.get(second, encoder=tiny, layers=(1,), progress=False)
    assert reader.encoded == 0 and len(reader._parts[key_dir]) == 1
    torch.testing.assert_close(got[1], _direct(tiny, second, 1), rtol=1e-5, atol=1e-6)
    for m in manifests:  # as an older version wrote them
        meta = json.loads(m.read_text())
        del meta["keys"]
        m.write_text(json.dumps(meta))
    legacy = FeatureCache(tmp_path)
    legacy.get(second, encoder=tiny, layers=(1,), progress=False)
    assert legacy.encoded == 0 and len(legacy._parts[key_dir]) == 2
    assert all(len(json.loads(m.read_text())["keys"]) == 10 for m in manifests)
