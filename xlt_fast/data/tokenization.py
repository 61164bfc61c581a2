"""Subword tokenisation of pre-split words: label alignment and word-to-subword maps.

Needs a fast (Rust) Hugging Face tokenizer, whose ``word_ids`` give the word of every subword.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100  # the ignore_index of torch.nn.CrossEntropyLoss


def _encode(tokenizer: Any, words: Sequence[Sequence[str]], max_length: int):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("word alignment needs a fast tokenizer (PreTrainedTokenizerFast)")
    return tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True,
                     max_length=max_length, padding=True, return_tensors="pt")


def tokenize_and_align_labels(tokenizer: Any, words: Sequence[Sequence[str]],
                              labels: Sequence[Sequence[int]], max_length: int = 128
                              ) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``: each word's label on its
    first subword, :data:`IGNORE_INDEX` on its other subwords, special tokens and padding.
    Words cut off by ``max_length`` lose their labels."""
    if len(words) != len(labels) or any(len(w) != len(y) for w, y in zip(words, labels)):
        raise ValueError("need one label per word in every sentence")
    enc = _encode(tokenizer, words, max_length)
    aligned = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    for b in range(len(words)):
        previous = None
        for t, word in enumerate(enc.word_ids(b)):
            if word is not None and word != previous:
                aligned[b, t] = labels[b][word]
            previous = word
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": aligned}


def word_subword_spans(encoding: Any, num_sentences: int) -> list[list[tuple[int, int]]]:
    """For each sentence, the ``[start, end)`` subword positions of each (kept) word."""
    spans = []
    for b in range(num_sentences):
        sent: dict[int, list[int]] = {}
        for t, word in enumerate(encoding.word_ids(b)):
            if word is not None:
                sent.setdefault(word, [t, t + 1])[1] = t + 1
        spans.append([tuple(sent[w]) for w in sorted(sent)])
    return spans


def tokenize_words(tokenizer: Any, words: Sequence[Sequence[str]], max_length: int = 128
                   ) -> tuple[dict[str, torch.Tensor], list[list[tuple[int, int]]]]:
    """Model inputs of pre-split sentences and their word-to-subword spans."""
    enc = _encode(tokenizer, words, max_length)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return inputs, word_subword_spans(enc, len(words))


def pool_subwords(hidden: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]],
                  mode: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """Word vectors from subword states ``[B, T, H]``: the ``first``, ``last`` or ``mean``
    subword of each span. Returns ``[B, W, H]`` (zero-padded to the longest sentence) and a
    boolean word mask ``[B, W]``. Differentiable; one gather (and for ``mean`` one scatter-add)
    for the whole batch, so the backward is one scatter rather than one copy per sentence."""
    if mode not in ("first", "last", "mean"):
        raise ValueError(f"unknown mode {mode!r}; expected 'first', 'last' or 'mean'")
    batch, length, size = hidden.shape
    width = max((len(s) for s in spans), default=0)
    slots = [b * width + w for b, sent in enumerate(spans) for w in range(len(sent))]
    flat = hidden.reshape(batch * length, size)
    device = hidden.device
    if mode == "mean":
        tokens = [b * length + t for b, sent in enumerate(spans) for s, e in sent for t in range(s, e)]
        owner = [k for k, (s, e) in enumerate(se for sent in spans for se in sent) for _ in range(s, e)]
        counts = torch.tensor([e - s for sent in spans for s, e in sent], device=device, dtype=hidden.dtype)
        sums = hidden.new_zeros(len(slots), size).index_add(
            0, torch.tensor(owner, device=device, dtype=torch.long),
            flat.index_select(0, torch.tensor(tokens, device=device, dtype=torch.long)))
        vecs = sums / counts.unsqueeze(1)
    else:
        pick = [b * length + (s if mode == "first" else e - 1) for b, sent in enumerate(spans) for s, e in sent]
        vecs = flat.index_select(0, torch.tensor(pick, device=device, dtype=torch.long))
    where = torch.tensor(slots, device=device, dtype=torch.long)
    out = hidden.new_zeros(batch * width, size).index_copy(0, where, vecs).view(batch, width, size)
    mask = torch.zeros(batch * width, dtype=torch.bool, device=device).index_fill_(0, where, True)
    return out, mask.view(batch, width)
