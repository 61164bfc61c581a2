"""What the token-alignment trainers (WordOT, WCA) share: held-out-safe Bible verse pairs, their
words as cached token states, word links (eflomal, lexicon) and the FreeDict lexicons."""
from __future__ import annotations

import contextlib
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

import xlt_fast
from xlt_fast.data import load_lexicon
from xlt_fast.data.bible import load_parallel
from xlt_fast.data.lexicons import dictionary_files
from xlt_fast.data.words import eflomal_links, lexicon_set
from xlt_fast.models.e5_offline import cache_root
from xlt_fast.models.tokens import TokenSentences, word_spans
from xlt_fast.training import Context, default_cache
from xlt_fast.training import atomic


@lru_cache(maxsize=8)
def num_layers(name: str) -> int:
    """Transformer layers of a Hugging Face encoder (read from its config)."""
    from transformers import AutoConfig

    path = str(xlt_fast.models.e5_checkpoint(progress=False)) if name == xlt_fast.models.E5_NAME else name
    return int(AutoConfig.from_pretrained(path).num_hidden_layers)


def token_states(cfg, ctx: Context, words: list[list[str]], layers: Sequence[int],
                 second: list[list[str]] | None = None) -> dict[int, TokenSentences]:
    """``{layer: TokenSentences}`` of pre-split sentences (or sentence pairs, which get no word spans)
    under ``cfg.encoder`` at ``cfg.max_length``, from the feature cache."""
    cache = default_cache()
    states = cache.tokens(words, second=second, encoder=cfg.encoder, layers=tuple(layers), max_length=cfg.max_length,
                          device=ctx.device, progress=cfg.progress and ctx.dist.is_main)
    if second is not None:
        spans = [[] for _ in words]
    else:
        spans = word_spans(cache.encoder(cfg.encoder, ctx.device).tokenizer, words, cfg.max_length)
    return {layer: TokenSentences(words, states[layer], spans) for layer in layers}


@lru_cache(maxsize=64)
def _pairs(lang: str, source: str, split: str):
    """The verse pairs of a split, read once per process (read-only)."""
    return load_parallel(lang, source, split)


def shared_ids(source: str, langs: Sequence[str], split: str, n: int, seed: int) -> list[str]:
    """Verse ids with a translation in every language of ``langs`` (and ``source``), n of them drawn
    with ``seed`` (all if n = 0; nested: a smaller n keeps a prefix of the same draw): every language
    then pairs with the same source verses."""
    common = None
    for lang in langs:
        ids = set(_pairs(lang, source, split).ids)
        common = ids if common is None else common & ids
    ids = sorted(common)
    if n and n < len(ids):
        ids = sorted(np.random.default_rng([seed, len(ids)]).permutation(ids)[:n].tolist())
    return ids


def verse_texts(source: str, lang: str, split: str, ids: list[str]) -> tuple[list[str], list[str]]:
    """``(lang texts, source texts)`` of the verses ``ids``."""
    pairs = _pairs(lang, source, split)
    where = {v: i for i, v in enumerate(pairs.ids)}
    return [pairs.first[where[v]] for v in ids], [pairs.second[where[v]] for v in ids]


def cached_eflomal(tgt: list[list[str]], src: list[list[str]]) -> list[list[tuple[int, int]]]:
    """eflomal links ``(tgt word, src word)`` of a bitext, computed once per bitext content (eflomal
    seeds itself at random, so a rerun would otherwise train on other links)."""
    digest = hashlib.sha256(json.dumps([tgt, src]).encode()).hexdigest()[:24]
    path = cache_root() / "links" / f"eflomal-{digest}.json"
    if not path.is_file():
        atomic.write_json(path, eflomal_links(tgt, src))
    return [[tuple(link) for link in links] for links in json.loads(path.read_text())]


@lru_cache(maxsize=16)
def lexicon(source: str, lang: str, split: str) -> frozenset[tuple[str, str]]:
    """The FreeDict lexicon as normalised ``(lang word, source word)`` pairs (memoised)."""
    return frozenset(lexicon_set(load_lexicon(source, lang, split), reverse=True))


def language_pairs(source: str, langs: Sequence[str]) -> str:
    return ", ".join(f"{source}-{lang}" for lang in langs)


def has_lexicon(source: str, lang: str) -> bool:
    """Whether the FreeDict ``source``-``lang`` dictionary is installed."""
    try:
        dictionary_files(source, lang)
    except FileNotFoundError:
        return False
    return True


def bitext_problems(bitext: str, target_lang: Sequence[str]) -> list[str]:
    """Config problems of a ``bitext`` field (one language pair per file, the file present)."""
    problems = []
    if bitext and len(target_lang) != 1:
        problems.append("bitext: a bitext file holds one language pair; give exactly one target_lang")
    if bitext and not Path(bitext).is_file():
        problems.append(f"bitext: no such file {bitext!r}")
    return problems


def link_problems(links: str, source: str, target_lang: Sequence[str]) -> list[str]:
    """Config problems of word links by ``links`` (eflomal installed, or a lexicon for every pair)."""
    if links == "eflomal":
        try:
            import eflomal  # noqa: F401
        except ImportError:
            return ["links: eflomal is not installed (pip install eflomal==2.0.0); links=lexicon uses the FreeDict "
                    "lexicon instead"]
        return []
    missing = [lang for lang in target_lang if not has_lexicon(source, lang)]
    return [f"links: no FreeDict lexicon for {language_pairs(source, missing)}; use links=eflomal"] if missing else []


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode (no dropout) inside the block, its previous mode after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
