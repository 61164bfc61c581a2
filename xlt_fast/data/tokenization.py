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
    boolean word mask ``[B, W]``. Differentiable."""
    if mode not in ("first", "last", "mean"):
        raise ValueError(f"unknown mode {mode!r}; expected 'first', 'last' or 'mean'")
    batch, _, size = hidden.shape
    width = max((len(s) for s in spans), default=0)
    out = hidden.new_zeros(batch, width, size)
    mask = torch.zeros(batch, width, dtype=torch.bool, device=hidden.device)
    for b, sent in enumerate(spans):
        if not sent:
            continue
        starts = torch.tensor([s for s, _ in sent], device=hidden.device)
        ends = torch.tensor([e for _, e in sent], device=hidden.device)
        if mode == "first":
            vecs = hidden[b, starts]
        elif mode == "last":
            vecs = hidden[b, ends - 1]
        else:  # mean over each span through a [W, T] averaging matrix
            pos = torch.arange(hidden.shape[1], device=hidden.device)
            member = ((pos >= starts[:, None]) & (pos < ends[:, None])).to(hidden.dtype)
            vecs = (member / member.sum(1, keepdim=True)) @ hidden[b]
        out[b, :len(sent)] = vecs
        mask[b, :len(sent)] = True
    return out, mask
