"""Token-level encoder machinery for the alignment trainers (WordOT, WCA): sentences as cached
token states of the frozen lower layers, the trainable top layers run on them, word vectors by
subword pooling, and padded ``(B, n, d)`` point clouds with masks (the form the Sinkhorn ops take).

Fine-tuning the top ``k`` layers from cached layer-``L - k`` states is exact: the lower layers
and the embeddings are frozen, so their outputs never change during training.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from xlt_fast.data.tokenization import pool_subwords, word_subword_spans
from xlt_fast.models.classifier import transformer_layers

WordMode = Literal["first", "last", "mean", "all"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients: shares no parameter, buffer or state with ``module``."""
    frozen = copy.deepcopy(module).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def word_spans(tokenizer, sentences: Sequence[Sequence[str]], max_length: int) -> list[list[tuple[int, int]]]:
    """For each pre-split sentence, the ``[start, end)`` token positions of each word that survives
    truncation to ``max_length`` (special tokens belong to no word)."""
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    return word_subword_spans(enc, len(sentences))


@dataclass
class TokenSentences:
    """Sentences as token states ``states[i] (T_i, d)`` (of the frozen lower layers), with each
    word's token span; :meth:`batch` pads a selection into ``(B, T, d)`` and a mask."""

    words: list[list[str]]
    states: list[Tensor]
    spans: list[list[tuple[int, int]]]

    def __post_init__(self) -> None:
        for i, (s, sp) in enumerate(zip(self.states, self.spans)):
            if sp and sp[-1][1] > s.shape[0]:
                raise ValueError(f"sentence {i}: its words need {sp[-1][1]} tokens but {s.shape[0]} states are cached")

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, list]:
        """``(states (B, T, d), attention mask (B, T), spans)`` of sentences ``idx``, zero-padded, in
        the states' dtype."""
        idx = [int(i) for i in idx]
        rows = [self.states[i] for i in idx]
        out = pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([r.shape[0] for r in rows])
        mask = (torch.arange(out.shape[1]) < lengths[:, None]).long()
        return out.to(device), mask.to(device), [self.spans[i] for i in idx]


class EncoderTop(nn.Module):
    """A copy of the top ``k`` transformer layers of a Hugging Face encoder, run on the states of
    layer ``L - k``: ``forward(states (B, T, d), mask (B, T)) -> last-layer states (B, T, d)``. The
    layers are copied (training this module never changes the encoder); the encoder is kept for its
    attention-mask convention only. In training mode, as a fresh module is."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        layers = transformer_layers(model)
        if not 1 <= k <= len(layers):
            raise ValueError(f"trainable_layers must be in 1..{len(layers)}, got {k}")
        self.layers = copy.deepcopy(nn.ModuleList(list(layers)[len(layers) - k:])).train()
        for p in self.layers.parameters():
            p.requires_grad_(True)
        self._model = [model]  # a list: not a submodule (its parameters are not this module's)

    def forward(self, states: Tensor, mask: Tensor, *, every_layer: bool = False) -> Tensor | list[Tensor]:
        """The last layer's states, or (``every_layer``) the output of each of the k layers."""
        model = self._model[0]
        attn = model._create_attention_masks(attention_mask=mask, encoder_attention_mask=None, embedding_output=states,
                                             encoder_hidden_states=None, cache=None)[0]
        outputs = []
        for layer in self.layers:
            out = layer(states, attention_mask=attn)
            states = out[0] if isinstance(out, tuple) else out
            outputs.append(states)
        return outputs if every_layer else states


def word_points(hidden: Tensor, spans: Sequence[Sequence[tuple[int, int]]], mode: WordMode = "last"
                ) -> tuple[Tensor, Tensor]:
    """Point clouds ``(B, n, d)`` and masks ``(B, n)`` from token states ``(B, T, d)``: one point per
    word (its ``first``, ``last`` or ``mean`` subword), or every subword of a word (``"all"``, the
    SubOT variant); special tokens never appear."""
    if mode != "all":
        return pool_subwords(hidden, spans, mode)
    tokens = [[t for start, end in sent for t in range(start, end)] for sent in spans]
    return pool_subwords(hidden, [[(t, t + 1) for t in sent] for sent in tokens], "first")


def pooled(points: Tensor, mask: Tensor) -> Tensor:
    """All real points of a batch of clouds as one cloud ``(N, d)`` (one OT per batch)."""
    return points[mask]
