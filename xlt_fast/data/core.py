"""In-memory datasets shared by the loaders: classification, sentence pairs, token tagging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class ClassificationDataset:
    """Texts with integer labels; ``label_names[label]`` is the class name."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.texts))]
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"id": self.ids[i], "text": self.texts[i], "label": self.labels[i]}

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        """Number of examples per class, ``[num_classes]``."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_classes)

    def priors(self) -> np.ndarray:
        """Class frequencies (sum to 1)."""
        counts = self.class_counts()
        return counts / max(counts.sum(), 1)

    def subset(self, indices: Sequence[int]) -> "ClassificationDataset":
        return ClassificationDataset([self.texts[i] for i in indices],
                                     [self.labels[i] for i in indices], list(self.label_names),
                                     [self.ids[i] for i in indices])


@dataclass
class PairDataset:
    """Sentence pairs (translations, NLI premise/hypothesis) with optional integer labels."""

    first: list[str]
    second: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.first) != len(self.second):
            raise ValueError(f"{len(self.first)} first sentences but {len(self.second)} second")
        if self.labels is not None and len(self.labels) != len(self.first):
            raise ValueError(f"{len(self.first)} pairs but {len(self.labels)} labels")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.first))]

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int) -> dict:
        item = {"id": self.ids[i], "first": self.first[i], "second": self.second[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


@dataclass
class TokenDataset:
    """Pre-tokenised sentences with one string tag per word (e.g. NER in IOB2)."""

    tokens: list[list[str]]
    tags: list[list[str]]
    path: str = ""                   # the file read, if any (for errors)
    lines: list[int] | None = None   # its line of each sentence's first token (1-based)

    def __post_init__(self) -> None:
        for i, (words, tags) in enumerate(zip(self.tokens, self.tags, strict=True)):
            if len(words) != len(tags):
                raise ValueError(f"sentence {i}: {len(words)} tokens but {len(tags)} tags")
        if self.lines is not None and len(self.lines) != len(self.tokens):
            raise ValueError(f"{len(self.lines)} line numbers for {len(self.tokens)} sentences")

    def where(self, sentence: int, word: int = 0) -> str:
        """``"file, line N"`` of a word read from a file (one word per line), else ``"sentence S, word W"``."""
        if self.lines is None:
            return f"sentence {sentence}, word {word}"
        return f"{self.path}, line {self.lines[sentence] + word}"

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[i], "tags": self.tags[i]}

    def tag_names(self) -> list[str]:
        """Sorted set of tags (``"O"`` first when present): an id for every tag."""
        names = sorted({t for sent in self.tags for t in sent})
        return (["O"] + [t for t in names if t != "O"]) if "O" in names else names
