"""Sequence classification on a Hugging Face encoder: encoder + pooling + linear head, with the
embeddings and the lower layers frozen (``trainable_layers``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from xlt_fast.models.encoder import Encoder, pool


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (the ``nn.ModuleList`` with one entry per layer)."""
    n = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def freeze_lower_layers(model: nn.Module, trainable_layers: int, also: tuple[nn.Module, ...] = ()) -> None:
    """Train only the top ``trainable_layers`` transformer layers and the modules ``also`` (e.g. the
    pooler, when it is used); the embeddings, every lower layer and every unused module (a pooler
    nobody reads would leave DistributedDataParallel with parameters that get no gradient) get
    ``requires_grad = False``."""
    layers = transformer_layers(model)
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers must be in 0..{len(layers)}, got {trainable_layers}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(layers)[len(layers) - trainable_layers:] + list(also):
        for p in module.parameters():
            p.requires_grad_(True)


class EncoderClassifier(nn.Module):
    """``z = pool(encoder(prefix + text))``: the mean over real tokens (``"mean"``, how e5 models are
    trained), the first token (``"cls"``) or the encoder's own pooler output (``"pooler"``, tanh of a
    dense layer on [CLS]: what the IWDA authors' code uses for mBERT, spec A.1); then
    ``logits = W drop(z) + b``. ``forward(batch) -> (z, logits)`` with ``batch`` from :meth:`collate`.
    The encoder starts in training mode (dropout on), as a freshly built module does."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean", trainable_layers: int = 12,
                 dropout: float = 0.1, prefix: str = "", max_length: int = 128) -> None:
        super().__init__()
        self.encoder = encoder.model
        self.tokenizer = encoder.tokenizer
        self.pooling, self.prefix, self.max_length = pooling, prefix, max_length
        pooler = getattr(self.encoder, "pooler", None)
        if pooling == "pooler" and pooler is None:
            raise ValueError(f"pooling='pooler': encoder {encoder.name!r} has no pooler (use 'mean' or 'cls')")
        freeze_lower_layers(self.encoder, trainable_layers, (pooler,) if pooling == "pooler" else ())
        self.dropout = nn.Dropout(dropout)
        self.h = nn.Linear(encoder.hidden_size, num_classes)
        self.feature_size = encoder.hidden_size
        self.train()  # load_encoder returns the model in eval mode

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.pooling == "pooler":
            z = out.pooler_output
        else:
            z = pool(out.last_hidden_state, batch["attention_mask"], self.pooling)
        return z, self.h(self.dropout(z))

    def collate(self, parts: Sequence[tuple[Sequence[str], Tensor]]) -> dict[str, Tensor]:
        """Token batch of texts ``idx`` of each text list, concatenated, on the model's device."""
        texts = [self.prefix + t[i] for t, idx in parts for i in idx.tolist()]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = self.h.weight.device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
