"""WCA: Wasserstein cross-lingual alignment of subword tokens, trained jointly with an English task
(Wang and Henao; seed 001). Spec: ``shared/specs/wca_wordot.md`` part A.

One phase, ``train``. Every step draws a labelled English batch and a batch of parallel sentence
pairs (English x^s, target x^t: Bible verses, or a ``bitext`` file) and takes one AdamW step on
Eq. 7 (the text's L^ce(X^l, X^l) read as L^ce(X^l, Y^l), A6.7)::

    L = L_ce(x^l, y^l) + beta L_w(x^s, x^t),    beta = 1e-2 (Sec. 4.1)

* ``L_ce``, Eq. 2: token cross entropy on the first subword of each word (``task="ner"``, A1.3),
  or, for the genre stand-in of E-A1, sequence cross entropy on the mean-pooled last layer;
* ``L_w``, Eq. 3, on the alignment layers B (default the last four, hidden states 9-12; A6.4):
  ``mean_pairs sum_ij T_ij sum_b (1 - cos(e^{s,b}_i, e^{t,b}_j))`` over the real subword tokens
  (special tokens and padding masked, A6.5), both sides carrying gradients, ``T`` a constant
  recomputed from the current embeddings at every step (A1.12, A6.2):
  - ``wca_hard`` (default): per-layer Sinkhorn plans with uniform marginals (Eq. 5; eps 0.05, at
    most 100 iterations, tolerance 1e-3: A6.1), averaged (Eq. 4), each target token's mass
    ``1 / n_t`` on its argmax source token (Eq. 6);
  - ``wca_soft``: the averaged plan itself (Eqs. 4-5);
  - ``nearest_token``: Eq. 8, the source token of least layer-mean cost, no marginals;
  - ``aligner``: Eq. 9, fixed word links (``eflomal`` forward and reverse intersected, or one-to-one
    lexicon links), a word the mean of its subwords;
  - ``task_only``: no alignment (the [9] row of Table 1).

The couplings and the loss are :mod:`xlt_fast.nn.token_alignment`: the four layers' costs in one
batched GEMM on unit rows, their plans in one :func:`xlt_fast.sinkhorn` call (``4 x batch``
problems).

CPU form: the embeddings and the layers below the top ``trainable_layers`` are frozen; their outputs
are encoded once into the feature cache, and so are the alignment layers that lie below the
trainable ones (constants then). This is exact for what it trains. The paper fine-tunes all of
mBERT (``trainable_layers`` = every layer; the embeddings stay frozen, the spec's CPU concession
E-A1, so embedding dropout is not applied). Several target languages: one parallel stream each,
the steps take them in turn (the paper trains one language per run). With ``torchrun`` every process
couples its share of the pairs (the couplings are per pair, so this is the same objective).

Evaluation on held-out chapters: the task (genre macro-F1 and accuracy, or entity F1 by conlleval's
reading, equal to seqeval's default) in English and every target language, and ``L_w`` of the hard
coupling on held-out verse pairs.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from xlt_fast import metrics
from xlt_fast.data import (GENRES, load_conll_ner, load_genre_task, load_wikiann, read_bitext, read_conll,
                           subsample_with_priors)
from xlt_fast.data.core import TokenDataset
from xlt_fast.data.tokenization import IGNORE_INDEX
from xlt_fast.data.words import lexicon_links, moses_words
from xlt_fast.models.tokens import EncoderTop, TokenSentences, word_points
from xlt_fast.nn import token_alignment as ta
from xlt_fast.trainers.parallel import (bitext_problems, cached_eflomal, eval_mode, lexicon, link_problems, num_layers,
                                        shared_ids, token_states, verse_texts)
from xlt_fast.training import Context, Dist, Phase, State, TrainerConfig, arg, default_cache, derive_seed, warmup_linear
from xlt_fast.training.config import ConfigError

Variant = Literal["task_only", "nearest_token", "aligner", "wca_soft", "wca_hard"]
COUPLING = {"nearest_token": "nearest", "wca_soft": "soft", "wca_hard": "hard"}
HUB_NER = ("wikiann", "conll")


@dataclasses.dataclass
class WCAConfig(TrainerConfig):
    variant: Variant = arg("wca_hard", "task_only | nearest_token (Eq. 8) | aligner (Eq. 9) | wca_soft (Eqs. 3-5) | "
                           "wca_hard (Eqs. 3-6)")
    source_lang: str = arg("en", "the labelled language (English), the source side of every pair")
    target_lang: list[str] = arg(["de"], "languages paired with source_lang (Bible verses), evaluated zero-shot")
    # the task
    task: Literal["genre", "ner"] = arg("genre", "genre: the Bible genre task (E-A1's stand-in); ner: token "
                                        "classification from CoNLL files or the hub (ner_train, ner_test)")
    ner_train: str = arg("", "task=ner: a CoNLL file of source_lang, or 'wikiann' / 'conll' (WikiANN, CoNLL-2003 "
                         "through `datasets`)")
    ner_test: str = arg("", "task=ner: CoNLL test files, a path with {lang} (source_lang's is evaluated too if it "
                        "exists), or 'wikiann' / 'conll'")
    tag_scheme: Literal["IOB1", "IOB2", "BIOES"] = arg("IOB2", "tag scheme of the CoNLL files (read as IOB2)")
    # data (spec A5: Bible chapters split into labelled, parallel, test)
    n_task: int = arg(6000, "labelled English examples (genre: train_b verses; ner: the first n sentences)", ge=16)
    n_pairs: int = arg(6000, "parallel verse pairs per target language (train_a; 0: all)", ge=0)
    bitext: str = arg("", "a TSV bitext (target_lang<TAB>source_lang per line, e.g. the target NER sentences and "
                      "their translations, as the paper) instead of the Bible pairs; one target_lang")
    n_eval: int = arg(2000, "held-out verses per language (test)", ge=10)
    n_align_eval: int = arg(500, "of them, the pairs whose held-out L_w is reported", ge=1)
    data_seed: int = arg(0, "seed of the data subsamples", ge=0)
    # model
    trainable_layers: int = arg(12, "top encoder layers trained (the rest and the embeddings frozen, cached)", ge=1)
    max_length: int = arg(128, "max tokens per sentence (A5: 128)", ge=8)
    layers: list[int] = arg([9, 10, 11, 12], "alignment layers B, hidden-state indices (Sec. 4.1: the last four)")
    dropout: float = arg(0.1, "dropout in the trained layers (mBERT's and e5's: 0.1); 0: deterministic steps", ge=0,
                         lt=1)
    # training (Sec. 4.1)
    epochs: float = arg(3.0, "passes over the labelled set ([paper]: 3); the parallel set cycles", gt=0)
    batch_size: int = arg(32, "labelled sentences per step ([paper]: 32)", ge=1)
    pair_batch_size: int = arg(32, "sentence pairs per step (A6.6: 32)", ge=1)
    lr: float = arg(5e-5, "AdamW lr of the encoder layers ([paper]: 5e-5)", gt=0)
    head_lr: float = arg(5e-5, "AdamW lr of the new linear head", gt=0)
    weight_decay: float = arg(0.01, "AdamW weight decay (torch's default)", ge=0)
    warmup_ratio: float = arg(0.0, "linear warm-up fraction, then linear decay; 0: constant lr (not stated)", ge=0,
                              le=1)
    beta: float = arg(1e-2, "weight of L_w in Eq. 7 ([paper]: 1e-2)", ge=0)
    # the coupling
    eps: float = arg(0.05, "Sinkhorn temperature on the cosine cost (A6.1: 0.05)", gt=0)
    n_iters: int = arg(100, "Sinkhorn iterations at most (A6.1: 100)", ge=1)
    tol: float = arg(1e-3, "early exit once the L1 marginal violation is below tol (A6.1: 1e-3)", gt=0)
    relative_eps: bool = arg(False, "eps relative to each problem's cost range (the coupling probe's fix)")
    links: Literal["eflomal", "lexicon"] = arg("eflomal", "aligner: eflomal links on the parallel data, or the "
                                               "lexicon's one-to-one links")
    ot_backend: Literal["auto", "reference", "cpu", "triton"] = arg("auto", "backend of the Sinkhorn plans")

    def check(self) -> list[str]:
        problems = super().check()
        try:
            from xlt_fast.data import languages

            langs = languages()
            bad = [lang for lang in [self.source_lang, *self.target_lang] if lang not in langs]
            if bad:
                problems.append(f"target_lang: no Bible translation for {bad}; available: {langs}")
        except (ImportError, FileNotFoundError) as exc:
            problems.append(f"target_lang: the Bible corpus is missing ({exc})")
        if not self.target_lang:
            problems.append("target_lang: at least one language to align")
        problems += bitext_problems(self.bitext, self.target_lang)
        if self.source_lang in self.target_lang:
            problems.append(f"target_lang: {self.source_lang} is the source language")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            problems.append(f"layers: one or more distinct hidden-state indices, got {self.layers}")
        elif min(self.layers) < 1:
            problems.append(f"layers: hidden-state indices start at 1 (the first transformer layer), got {self.layers}")
        if self.task == "ner":
            if not self.ner_train or not self.ner_test:
                problems.append("ner_train, ner_test: task=ner needs both (CoNLL files or 'wikiann' / 'conll')")
            if self.ner_train and self.ner_train not in HUB_NER and not Path(self.ner_train).is_file():
                problems.append(f"ner_train: no such file {self.ner_train!r}")
            if self.ner_test and self.ner_test not in HUB_NER:
                if "{lang}" not in self.ner_test:
                    problems.append(f"ner_test: {self.ner_test!r} needs {{lang}} (one file per language)")
                else:
                    missing = [lang for lang in self.target_lang if not Path(self.ner_test.format(lang=lang)).is_file()]
                    if missing:
                        problems.append(f"ner_test: no file for {missing} ({self.ner_test!r})")
        elif self.ner_train or self.ner_test:
            problems.append("ner_train, ner_test: given, but task is not ner")
        if self.variant == "aligner":
            problems += link_problems(self.links, self.source_lang, self.target_lang)
        return problems


# ------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Stack:
    """Sentences as the input states of the trainable layers, with the cached states of the
    alignment layers below them (``fixed``: layer -> states; constants during training)."""

    input: TokenSentences
    fixed: dict[int, TokenSentences]

    def __len__(self) -> int:
        return len(self.input)


@dataclasses.dataclass
class PairSet:
    lang: str
    src: Stack
    tgt: Stack
    links: list[list[tuple[int, int]]] | None = None  # aligner: (source word, target word) per pair


@dataclasses.dataclass
class Data:
    task: TokenSentences                # labelled English sentences
    labels: Any                         # genre: (N,) tensor; ner: per sentence, a tag id per word
    tag_names: list[str]                # ner: the label set (IOB2); genre: the genres
    pairs: dict[str, PairSet]           # training pairs per target language
    evals: dict[str, tuple[TokenSentences, Any]]  # per language (source included): sentences, labels
    eval_pairs: dict[str, PairSet]      # held-out verse pairs per target language
    first_trained: int                  # hidden-state index of the first trained layer's output (L - k + 1)
    targets: list[torch.Tensor] | None = None  # ner: per sentence, each token's label (A1.3; -100 off first subwords)


def _layer_split(cfg: WCAConfig) -> tuple[int, list[int]]:
    """``(input layer L - k, the alignment layers at or below it: cached)``."""
    n = num_layers(cfg.encoder)
    base = n - cfg.trainable_layers
    return base, [layer for layer in cfg.layers if layer <= base]


def _stack(cfg: WCAConfig, ctx: Context, words: list[list[str]]) -> Stack:
    base, fixed = _layer_split(cfg)
    states = token_states(cfg, ctx, words, [base, *fixed])
    return Stack(states[base], {layer: states[layer] for layer in fixed})


def _sentences(cfg: WCAConfig, ctx: Context, words: list[list[str]]) -> TokenSentences:
    """The input states of the trainable layers (the task's sentences need no alignment layer)."""
    base, _ = _layer_split(cfg)
    return token_states(cfg, ctx, words, [base])[base]


def _ner_set(spec: str, lang: str, split: str, scheme: str) -> TokenDataset:
    """A NER set in IOB2: a CoNLL file (``spec`` may hold ``{lang}``), or WikiANN / CoNLL-2002/2003."""
    if spec == "wikiann":
        return load_wikiann(lang, split)
    if spec == "conll":
        return load_conll_ner(lang, split)
    return read_conll(spec.format(lang=lang), scheme=scheme, convert_to="IOB2")


def _tag_ids(data: TokenDataset, names: list[str]) -> list[list[int]]:
    """Tag ids per word; a tag outside the training label set is an error naming where it is."""
    index = {t: i for i, t in enumerate(names)}
    out = []
    for s, tags in enumerate(data.tags):
        for w, tag in enumerate(tags):
            if tag not in index:
                raise ValueError(f"{data.where(s, w)}: tag {tag!r} is not among the training tags {names} (its "
                                 "entity type never occurs in ner_train)")
        out.append([index[t] for t in tags])
    return out


def _ner_data(cfg: WCAConfig, ctx: Context):
    train = _ner_set(cfg.ner_train, cfg.source_lang, "train", cfg.tag_scheme)
    n = min(cfg.n_task, len(train))
    # the IOB2 tags of every entity type in the training set (B- and I-, whichever it shows), and
    # "O" as id 0: the tag of words that max_length cuts off
    types = sorted({t[2:] for tags in train.tags[:n] for t in tags if t != "O"})
    if not types:
        raise ValueError(f"ner_train: {cfg.ner_train} has no entity tag (only 'O'); nothing to learn")
    names = ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]
    task = _sentences(cfg, ctx, train.tokens[:n])
    labels = _tag_ids(TokenDataset(train.tokens[:n], train.tags[:n], train.path, (train.lines or [])[:n] or None),
                      names)
    evals = {}
    for lang in [cfg.source_lang, *cfg.target_lang]:
        if lang == cfg.source_lang and cfg.ner_test not in HUB_NER \
                and not Path(cfg.ner_test.format(lang=lang)).is_file():
            continue
        test = _ner_set(cfg.ner_test, lang, "test", cfg.tag_scheme)
        _tag_ids(test, names)  # unknown tags: an error naming the file and line
        evals[lang] = (_sentences(cfg, ctx, test.tokens), test.tags)
    return task, labels, names, evals


def _token_targets(sents: TokenSentences, labels: list[list[int]]) -> list[torch.Tensor]:
    """Per sentence ``(T,)``: each kept word's label on its first subword (A1.3), -100 elsewhere;
    built once, so a step only pads them."""
    out = []
    for states, spans, word_labels in zip(sents.states, sents.spans, labels):
        target = torch.full((states.shape[0],), IGNORE_INDEX, dtype=torch.long)
        target[[start for start, _ in spans]] = torch.tensor(word_labels[:len(spans)], dtype=torch.long)
        out.append(target)
    return out


def _genre_data(cfg: WCAConfig, ctx: Context, eval_ids: list[str], eval_pairs: dict[str, PairSet]):
    """The English genre task; its evaluation reads the held-out pairs' sentences (and genres)."""
    train = load_genre_task(cfg.source_lang, "train_b")
    train = subsample_with_priors(train, train.priors(), min(cfg.n_task, len(train)), cfg.data_seed)[0]
    task = _sentences(cfg, ctx, moses_words(train.texts, cfg.source_lang))
    test = load_genre_task(cfg.source_lang, "test")
    label_of = dict(zip(test.ids, test.labels))
    y = torch.tensor([label_of[v] for v in eval_ids], device=ctx.device)
    evals = {cfg.source_lang: (next(iter(eval_pairs.values())).src.input, y),
             **{lang: (ps.tgt.input, y) for lang, ps in eval_pairs.items()}}
    return task, torch.tensor(train.labels, device=ctx.device), list(GENRES), evals


def _links(cfg: WCAConfig, lang: str, tgt: list[list[str]], src: list[list[str]]) -> list[list[tuple[int, int]]]:
    """Eq. 9's fixed word links ``(source word, target word)`` of each training pair."""
    if cfg.links == "eflomal":
        found = cached_eflomal(tgt, src)
    else:
        lex = lexicon(cfg.source_lang, lang, "train")
        found = [lexicon_links(t, s, lex) for t, s in zip(tgt, src)]
    return [[(i, j) for j, i in pair] for pair in found]


def load_data(cfg: WCAConfig, ctx: Context) -> Data:
    with ctx.dist.main_first():
        ids = shared_ids(cfg.source_lang, cfg.target_lang, "train_a", cfg.n_pairs, cfg.data_seed)
        pairs, src = {}, None
        for lang in cfg.target_lang:
            if cfg.bitext:
                text = read_bitext(cfg.bitext)
                n = cfg.n_pairs or len(text)
                tgt_texts, src_texts = text.first[:n], text.second[:n]
            else:
                tgt_texts, src_texts = verse_texts(cfg.source_lang, lang, "train_a", ids)
            tgt_words, src_words = moses_words(tgt_texts, lang), moses_words(src_texts, cfg.source_lang)
            src = src or _stack(cfg, ctx, src_words)
            ps = PairSet(lang, src, _stack(cfg, ctx, tgt_words))
            if cfg.variant == "aligner":
                ps.links = _links(cfg, lang, tgt_words, src_words)
            pairs[lang] = ps
        eval_ids = shared_ids(cfg.source_lang, cfg.target_lang, "test", cfg.n_eval, cfg.data_seed + 1)
        eval_pairs, src = {}, None
        for lang in cfg.target_lang:
            tgt_texts, src_texts = verse_texts(cfg.source_lang, lang, "test", eval_ids)
            src = src or _stack(cfg, ctx, moses_words(src_texts, cfg.source_lang))
            eval_pairs[lang] = PairSet(lang, src, _stack(cfg, ctx, moses_words(tgt_texts, lang)))
        if cfg.task == "ner":
            task, labels, names, evals = _ner_data(cfg, ctx)
        else:
            task, labels, names, evals = _genre_data(cfg, ctx, eval_ids, eval_pairs)
    targets = _token_targets(task, labels) if cfg.task == "ner" else None
    return Data(task, labels, names, pairs, evals, eval_pairs, _layer_split(cfg)[0] + 1, targets)


def prepare(cfg: WCAConfig) -> None:
    """Encode (and link) everything a run of ``cfg`` reads, in this process, so that the workers of
    a grid only read the caches."""
    load_data(cfg, Context(cfg, Dist(cfg.device), Path(cfg.output_dir or ".")))


# ------------------------------------------------------------------------------------------ build

def steps(cfg: WCAConfig, data: Data) -> int:
    n = max(1, round(cfg.epochs * len(data.task) / cfg.batch_size))
    return min(n, cfg.max_steps) if cfg.max_steps else n


def build(cfg: WCAConfig, ctx: Context) -> State:
    n_layers = num_layers(cfg.encoder)
    if cfg.trainable_layers > n_layers or max(cfg.layers) > n_layers:
        raise ConfigError("WCAConfig", [f"trainable_layers, layers: the encoder has {n_layers} layers (got "
                                        f"trainable_layers={cfg.trainable_layers}, layers={cfg.layers})"])
    data = load_data(cfg, ctx)
    encoder = default_cache().encoder(cfg.encoder, ctx.device)
    top = EncoderTop(encoder.model, cfg.trainable_layers).to(ctx.device)
    for module in top.modules():
        if isinstance(module, nn.Dropout):
            module.p = cfg.dropout
    # seeded here: loading an encoder may draw random numbers (weights it lacks), the first time only
    torch.manual_seed(derive_seed(cfg.seed, "head"))
    head = nn.Linear(encoder.hidden_size, len(data.tag_names)).to(ctx.device)
    total = steps(cfg, data)
    opt = torch.optim.AdamW([{"params": top.parameters(), "lr": cfg.lr},
                             {"params": head.parameters(), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    sched = warmup_linear(opt, total, cfg.warmup_ratio) if cfg.warmup_ratio \
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    ctx.stream("task", len(data.task), cfg.batch_size)
    if cfg.variant != "task_only":
        for lang, ps in data.pairs.items():
            ctx.stream(f"pairs/{lang}", len(ps.src), cfg.pair_batch_size)
    return State(modules={"top": top, "head": head}, optimizers={"train": opt}, schedulers={"train": sched},
                 data=data, parallel={"top": ctx.wrap(top), "head": ctx.wrap(head)})


# ------------------------------------------------------------------------------------------ steps

def _joint(parts: Sequence[tuple[TokenSentences, Any]], device) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """One padded batch of several selections ``(sentences, idx)``: states, mask, spans and each
    part's rows (one forward for all of them, as DDP wants one per backward)."""
    words, states, spans, slices = [], [], [], []
    for sents, idx in parts:
        idx = [int(i) for i in idx]
        slices.append(slice(len(states), len(states) + len(idx)))
        words += [sents.words[i] for i in idx]
        states += [sents.states[i] for i in idx]
        spans += [sents.spans[i] for i in idx]
    x, mask, spans = TokenSentences(words, states, spans).batch(range(len(states)), device)
    return x, mask, spans, slices


def _fixed_states(stack: Stack, idx, layer: int, width: int, device) -> torch.Tensor:
    x, _, _ = stack.fixed[layer].batch(idx, device)
    return F.pad(x, (0, 0, 0, width - x.shape[1]))


def _layer_states(cfg: WCAConfig, first: int, outputs: list[torch.Tensor], stack: Stack, idx, rows: slice
                  ) -> list[torch.Tensor]:
    """The alignment layers' states ``(B, T, d)`` of a part: from the trained layers' outputs (the
    first of them is hidden state ``first``), or the cache for layers below them."""
    width = outputs[0].shape[1]
    return [outputs[layer - first][rows] if layer >= first else
            _fixed_states(stack, idx, layer, width, outputs[0].device) for layer in cfg.layers]


def _clouds(layer_states: list[torch.Tensor], spans: list, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, B, n, d)`` point clouds of every layer (subword tokens: ``"all"``; words: ``"mean"``) and
    the ``(B, n)`` mask: one gather for all layers."""
    L, B = len(layer_states), layer_states[0].shape[0]
    pts, mask = word_points(torch.cat(layer_states), list(spans) * L, mode)
    return pts.view(L, B, *pts.shape[1:]), mask[:B]


def alignment(cfg: WCAConfig, kind: str, src: tuple, tgt: tuple, links=None) -> torch.Tensor:
    """Eq. 3 for one batch of pairs; ``src`` / ``tgt`` = (layer states, spans)."""
    mode = "mean" if kind == "aligner" else "all"
    xs, xm = _clouds(*src, mode)
    ys, ym = _clouds(*tgt, mode)
    costs = ta.cosine_costs(xs, ys)
    if kind == "aligner":
        T = ta.link_coupling(links, xm, ym)
    else:
        T = ta.token_coupling(costs, xm, ym, kind, eps=cfg.eps, n_iters=cfg.n_iters, tol=cfg.tol,
                              relative_eps=cfg.relative_eps, backend=cfg.ot_backend)
    return ta.alignment_loss(T, costs)


def _task_loss(cfg: WCAConfig, data: Data, head: nn.Module, hidden, mask, idx) -> torch.Tensor:
    if cfg.task == "genre":
        return F.cross_entropy(head(_mean_pool(hidden, mask)), data.labels[idx])
    target = pad_sequence([data.targets[i] for i in idx.tolist()], batch_first=True, padding_value=IGNORE_INDEX)
    target = F.pad(target, (0, hidden.shape[1] - target.shape[1]), value=IGNORE_INDEX)  # the joint batch's width
    return F.cross_entropy(head(hidden).flatten(0, 1), target.to(hidden.device).flatten(),
                           ignore_index=IGNORE_INDEX)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def train_step(cfg: WCAConfig, state: State, ctx: Context) -> dict[str, float]:
    data = state.data
    idx = state.streams["task"].next()
    parts = [(data.task, idx)]
    if cfg.variant != "task_only":
        langs = list(data.pairs)
        ps = data.pairs[langs[state.phase_step % len(langs)]]
        pidx = state.streams[f"pairs/{ps.lang}"].next()
        parts += [(ps.src.input, pidx), (ps.tgt.input, pidx)]
    x, mask, spans, rows = _joint(parts, ctx.device)
    outputs = state.parallel["top"](x, mask, every_layer=True)
    task = _task_loss(cfg, data, state.parallel["head"], outputs[-1][rows[0]], mask[rows[0]], idx)
    if cfg.variant == "task_only":
        ctx.update(task, ["train"])
        return {"loss": task.item(), "task": task.item()}
    links = [ps.links[i] for i in pidx.tolist()] if ps.links is not None else None
    kind = "aligner" if cfg.variant == "aligner" else COUPLING[cfg.variant]
    first = data.first_trained
    align = alignment(cfg, kind, (_layer_states(cfg, first, outputs, ps.src, pidx, rows[1]), spans[rows[1]]),
                      (_layer_states(cfg, first, outputs, ps.tgt, pidx, rows[2]), spans[rows[2]]), links)
    loss = task + cfg.beta * align
    ctx.update(loss, ["train"])
    return dict(zip(("loss", "task", "align"), torch.stack([loss, task, align]).detach().tolist()))


def phases(cfg: WCAConfig, state: State) -> list[Phase]:
    return [Phase("train", steps(cfg, state.data), lambda s, c: train_step(cfg, s, c))]


# -------------------------------------------------------------------------------------- evaluate

def _ner_predict(state: State, ctx: Context, sents: TokenSentences) -> list[list[int]]:
    """A tag id per word of every sentence (its first subword's; words cut off by max_length get "O",
    id 0)."""
    top, head = state.modules["top"], state.modules["head"]
    order = sorted(range(len(sents)), key=lambda i: sents.states[i].shape[0])
    out: list = [None] * len(sents)
    with torch.no_grad(), eval_mode(top):
        for a in range(0, len(sents), 64):
            idx = order[a:a + 64]
            x, mask, spans = sents.batch(idx, ctx.device)
            best = head(top(x, mask)).argmax(-1).cpu()
            for b, i in enumerate(idx):
                kept = [int(best[b, start]) for start, _ in spans[b]]
                out[i] = kept + [0] * (len(sents.words[i]) - len(kept))
    return out


@torch.no_grad()
def held_out(cfg: WCAConfig, state: State, ctx: Context) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Per target language, ``L_w`` (Eq. 3) of the hard coupling on the first ``n_align_eval``
    held-out pairs under the eval model (no dropout); for the genre task also every held-out verse's
    predicted genre (English included). One forward per sentence: the English side once for all
    languages."""
    data, top, head = state.data, state.modules["top"], state.modules["head"]
    langs = list(data.eval_pairs)
    src = data.eval_pairs[langs[0]].src  # the same English verses for every language
    n_align = min(cfg.n_align_eval, len(src))
    n = len(src) if cfg.task == "genre" else n_align
    order = sorted(range(n), key=lambda i: src.input.states[i].shape[0])
    loss = dict.fromkeys(langs, 0.0)
    genres: dict[str, list[int]] = {lang: [0] * len(src) for lang in [cfg.source_lang, *langs]}

    def forward(stack: Stack, idx, lang: str, keep):
        x, mask, spans = stack.input.batch(idx, ctx.device)
        outputs = top(x, mask, every_layer=True)
        if cfg.task == "genre":
            for i, p in zip(idx.tolist(), head(_mean_pool(outputs[-1], mask)).argmax(1).tolist()):
                genres[lang][i] = p
        states = _layer_states(cfg, data.first_trained, outputs, stack, idx, slice(None))
        return [s[keep] for s in states], [spans[k] for k in keep.tolist()]

    with eval_mode(top):
        for a in range(0, len(order), 64):
            idx = torch.tensor(order[a:a + 64])
            keep = (idx < n_align).nonzero().flatten()
            english = forward(src, idx, cfg.source_lang, keep)
            for lang in langs:
                target = forward(data.eval_pairs[lang].tgt, idx, lang, keep)
                if len(keep):  # a mean over pairs: each batch weighted by its pairs
                    loss[lang] += float(alignment(cfg, "hard", english, target)) * len(keep)
    return {lang: v / n_align for lang, v in loss.items()}, genres


def evaluate(state: State, ctx: Context) -> dict[str, dict[str, Any]]:
    cfg, data = ctx.cfg, state.data
    align, genres = held_out(cfg, state, ctx)
    out: dict[str, dict[str, Any]] = {}
    for lang, (sents, gold) in data.evals.items():
        if cfg.task == "genre":
            y, pred = gold.cpu().numpy(), genres[lang]
            out[lang] = {"macro_f1": metrics.macro_f1(y, pred, labels=np.unique(y)),
                         "accuracy": metrics.accuracy(y, pred)}
        else:
            tags = [[data.tag_names[t] for t in sent] for sent in _ner_predict(state, ctx, sents)]
            out[lang] = {"entity_f1": metrics.entity_f1(gold, tags)}
    for lang, value in align.items():
        out.setdefault(lang, {})["align_hard"] = value
    return out


def summary(state: State, ctx: Context) -> dict[str, Any]:
    return {}


Config = WCAConfig


def train(cfg: WCAConfig, resume: bool = False, stop_after: int | None = None):
    """Train one WCA config in ``cfg.output_dir``; returns its :class:`xlt_fast.training.Result`."""
    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)
