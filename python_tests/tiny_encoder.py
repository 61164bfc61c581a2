"""A tiny random BERT with a word-level tokenizer, saved as a local Hugging Face model directory:
the stand-in for a real encoder in tests of the encoder code paths (it encodes thousands of texts
per second)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_encoder(path: Path, texts: list[str], seed: int = 0, layers: int = 2, hidden: int = 32,
                      pooler: bool = False) -> Path:
    """Save a ``BertModel`` (``layers`` x ``hidden``, with a pooler if asked) and a
    ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts`` (others map to [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=130),
                      add_pooling_layer=pooler)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def bible_texts(langs, splits=("train_a", "test"), n: int = 400, source: str = "en") -> list[str]:
    """The Moses words (space-joined) of the first ``n`` verse pairs of each language with ``source``
    in each split, both sides: a tiny encoder's vocabulary for tests on Bible verses."""
    from xlt_fast.data.bible import load_parallel
    from xlt_fast.data.words import moses_words

    texts = []
    for lang in langs:
        for split in splits:
            pairs = load_parallel(lang, source, split)
            texts += [" ".join(w) for w in moses_words(pairs.first[:n], lang) + moses_words(pairs.second[:n], source)]
    return texts
