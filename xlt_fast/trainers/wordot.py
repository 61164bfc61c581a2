"""WordOT: optimal transport as the alignment objective for fine-tuning a multilingual encoder on
parallel sentences (Alqahtani et al., Findings of EMNLP 2021; seed 003). Spec:
``shared/specs/wca_wordot.md`` part B.

Stage 1 (phase ``align``), per step and per language pair k (English with language k), on a batch
of parallel sentences: word vectors of the last layer, each word its last subword (B1.3; SubOT:
every subword a point); ``l_k = S_eps(alpha_k, beta_k) + lambda reg_k`` (Eq. 2 with +S, B6.1):

* ``S_eps`` the debiased Sinkhorn divergence (Eq. 1) of :func:`xlt_fast.sinkhorn_divergence` with
  GeomLoss's defaults (cost |x - y|^2 / 2, blur 0.05 so eps = 0.0025, eps-scaling 0.5; B1.5)
  between uniform measures on the language-k words and on the English words, pooled over the batch
  (``scope="batch"``: one OT per language pair, B6.3) or per sentence pair and averaged
  (``scope="pair"``);
* ``reg_k = sum_j |c(j, t) - c_0(j, t)|^2`` over the English words j of the batch (Eq. 2; B6.4:
  ``reg_reduction="mean"`` averages), c_0 the initial model in eval mode: a constant, computed once
  per English sentence before training.

``L = sum_k l_k``: one backward over all pairs, ``grad_accum`` micro-batches per Adam step (B1.7).
Variants: ``wordot``; ``subot``; ``mix_languages`` (one OT between all languages' words and all
English words of the step, App. E); ``l2_cao`` (Cao et al. 2020: the mean of
|c(i, s) - c(j, t)|^2 over one-to-one word links, eflomal's on the training bitext or the lexicon's,
plus the same regulariser); ``base`` (no stage 1).

Stage 2 (phase ``task``): English genre classification (B5 iv) or XNLI (``task="xnli"``, premise and
hypothesis as one pair, the paper's), mean-pooled last layer + linear head, cross entropy; zero-shot
evaluation in every language.

CPU form: the lower layers and the embeddings are frozen, and their output for every sentence is
cached once (:meth:`xlt_fast.training.FeatureCache.tokens`); the top ``trainable_layers`` layers are
trained on those states. This is exact (nothing below them changes); the paper fine-tunes every
layer, a GPU-sized run sets ``trainable_layers`` to all of them (the embeddings stay frozen).
Evaluation on held-out chapters (B5): contextual word retrieval P@1 (cosine and CSLS) on lexicon-
linked words, OT-coupling link P@1 inside verse pairs, sentence retrieval P@1, genre macro-F1.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import xlt_fast
from xlt_fast import metrics
from xlt_fast.data import GENRES, load_genre_task, load_xnli, read_bitext, subsample_with_priors
from xlt_fast.data.formats import XNLI_LABELS
from xlt_fast.data.words import lexicon_links, moses_words, normalise
from xlt_fast.models.tokens import EncoderTop, TokenSentences, frozen_copy, pooled, word_points
from xlt_fast.trainers.parallel import (bitext_problems, cached_eflomal, eval_mode, has_lexicon, language_pairs, lexicon,
                                        link_problems, num_layers, shared_ids, token_states, verse_texts)
from xlt_fast.training import (Context, Dist, Phase, State, TrainerConfig, arg, default_cache, derive_seed,
                               warmup_linear)
from xlt_fast.training.checkpoint import latest
from xlt_fast.training.config import ConfigError

Variant = Literal["base", "l2_cao", "wordot", "subot", "mix_languages"]
# what must match between a stage-2 run and the stage-1 run it starts from (init_from); its seed is its own
ALIGN_FIELDS = ("source_lang", "target_lang", "encoder", "device", "max_steps", "bitext", "n_pairs",
                "data_seed", "trainable_layers", "max_length", "word", "epochs", "batch_size", "grad_accum", "lr",
                "warmup_ratio", "reg_lambda", "reg_reduction", "scope", "cost", "blur", "scaling", "links",
                "variant")


@dataclasses.dataclass
class WordOTConfig(TrainerConfig):
    variant: Variant = arg("wordot", "base | l2_cao | wordot | subot | mix_languages")
    source_lang: str = arg("en", "the language every pair shares (the paper's target) and of the English task")
    target_lang: list[str] = arg(["de", "fr", "es"], "languages aligned to source_lang, one OT per pair (B2)")
    eval_langs: list[str] = arg([], "more languages evaluated at the sentence level (retrieval, genre)")
    word_langs: list[str] = arg([], "languages evaluated at the word level (each needs a FreeDict lexicon with "
                                "source_lang); empty: every evaluated language that has one")
    # data (B5: Bible chapters; align on train half A, the English task on half B, evaluate on test)
    bitext: str = arg("", "a TSV bitext (a target_lang<TAB>source_lang sentence pair per line) instead of the "
                      "Bible pairs; one target_lang")
    n_pairs: int = arg(0, "parallel pairs per language for stage 1 (0: all of train half A)", ge=0)
    n_eval: int = arg(1000, "held-out verse pairs per language for evaluation (B5: 1,000)", ge=10)
    n_task: int = arg(2000, "English genre examples for stage 2", ge=16)
    data_seed: int = arg(0, "seed of the data subsamples", ge=0)
    # model
    trainable_layers: int = arg(1, "top encoder layers trained (the rest frozen, their states cached)", ge=1)
    max_length: int = arg(128, "max tokens per sentence", ge=8)
    word: Literal["last", "first", "mean"] = arg("last", "word vector: its last subword (B1.3, after Cao et al.)")
    # stage 1 ([paper] Sec. 5.2, spec B2)
    epochs: float = arg(1.0, "stage-1 epochs over the pairs ([paper]: one)", gt=0)
    batch_size: int = arg(24, "sentence pairs per language pair per micro-batch ([paper]: 24)", ge=1)
    grad_accum: int = arg(2, "micro-batches per Adam step ([paper]: 2)", ge=1)
    lr: float = arg(5e-5, "Adam lr ([paper]: 5e-5)", gt=0)
    warmup_ratio: float = arg(0.0, "linear warm-up fraction, then linear decay; 0: constant lr (B6.7)", ge=0, le=1)
    reg_lambda: float = arg(1.0, "weight of the English regulariser ([paper] Sec. 4.3: 1)", ge=0)
    reg_reduction: Literal["sum", "mean"] = arg("sum", "regulariser over words: sum (Eq. 2) or mean (B6.4)")
    scope: Literal["batch", "pair"] = arg("batch", "batch: one OT per language pair over the batch's words; pair: "
                                          "one OT per sentence pair (B6.3)")
    cost: Literal["half_sqeuclidean", "euclidean"] = arg(
        "half_sqeuclidean", "ground cost: |x - y|^2 / 2 (GeomLoss p = 2) or |x - y| (p = 1; B6.2)")
    blur: float = arg(0.05, "GeomLoss blur, eps = blur^p ([paper] fn. 8: 0.05)", gt=0)
    scaling: float = arg(0.5, "GeomLoss eps-scaling factor", gt=0, lt=1)
    links: Literal["eflomal", "lexicon"] = arg("eflomal", "l2_cao word links: eflomal on the bitext, or the lexicon")
    ot_backend: Literal["auto", "reference", "cpu", "triton", "geomloss"] = arg(
        "auto", "backend of the Sinkhorn ops, or geomloss: the same divergence by GeomLoss's SamplesLoss "
        "(a cross-check, and the speed baseline)")
    # stage 2 (B5 iv)
    task: Literal["genre", "xnli"] = arg("genre", "stage-2 task: the Bible genre task (offline) or XNLI through "
                                         "`datasets` (the paper's; the hub, or local files: xnli_files)")
    xnli_files: str = arg("", "local XNLI files instead of the hub: a path with {lang} and {split}, e.g. "
                          "xnli/{lang}.{split}.jsonl (premise, hypothesis, label)")
    task_steps: int = arg(1000, "English genre fine-tuning steps (0: no stage 2)", ge=0)
    task_batch_size: int = arg(16, "stage-2 batch (B5: 16)", ge=1)
    task_lr: float = arg(5e-5, "stage-2 lr of the encoder layers (B5: 5e-5)", gt=0)
    task_head_lr: float = arg(1e-3, "stage-2 lr of the new linear head", gt=0)
    init_from: str = arg("", "a finished run with the same stage-1 settings: start from its encoder, skip stage 1 "
                         "(seed is then the stage-2 seed)")

    def check(self) -> list[str]:
        problems = super().check()
        try:
            from xlt_fast.data import languages

            langs = languages()
            named = [("source_lang", [self.source_lang]), ("eval_langs", self.eval_langs)]
            if not self.bitext:
                named.append(("target_lang", self.target_lang))
            for name, values in named:
                bad = [lang for lang in values if lang not in langs]
                if bad:
                    problems.append(f"{name}: no Bible translation for {bad}; available: {langs}")
        except (ImportError, FileNotFoundError) as exc:
            problems.append(f"target_lang: the Bible corpus is missing ({exc})")
        if not self.target_lang:
            problems.append("target_lang: at least one language to align")
        elif not problems and not eval_languages(self):
            problems.append("eval_langs: at least one language of the Bible corpus is needed for the evaluation")
        problems += bitext_problems(self.bitext, self.target_lang)
        if self.variant == "mix_languages" and len(self.target_lang) < 2:
            problems.append("variant: mix_languages mixes two or more target languages in one OT")
        if self.variant == "l2_cao":
            problems += link_problems(self.links, self.source_lang, self.target_lang)
        missing = [lang for lang in self.word_langs if not has_lexicon(self.source_lang, lang)]
        if missing:
            problems.append(f"word_langs: word retrieval needs a FreeDict lexicon, and there is none for "
                            f"{language_pairs(self.source_lang, missing)}; evaluate them at the sentence level (eval_langs)")
        if not problems and self.word_langs:
            outside = [lang for lang in self.word_langs if lang not in eval_languages(self)]
            if outside:
                problems.append(f"word_langs: {outside} are not evaluated; add them to eval_langs")
        if self.xnli_files and not ("{lang}" in self.xnli_files and "{split}" in self.xnli_files):
            problems.append(f"xnli_files: {self.xnli_files!r} needs both {{lang}} and {{split}}")
        if self.xnli_files and self.task != "xnli":
            problems.append("xnli_files: given, but task is not xnli")
        if self.task == "xnli" and not self.task_steps:
            problems.append("task: xnli is a stage-2 task; set task_steps > 0")
        if self.init_from and self.variant == "base":
            problems.append("init_from: base has no stage 1 to start from")
        return problems


# ------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class PairSet:
    """Parallel sentences of one language with the source language (cached token states)."""

    lang: str
    tgt: TokenSentences
    src: TokenSentences
    links: list[list[tuple[int, int]]] | None = None   # (target word, source word) per pair (l2_cao)
    src_initial: TokenSentences | None = None  # c_0: the initial model's last-layer states of ``src``


@dataclasses.dataclass
class Data:
    align: dict[str, PairSet]            # stage-1 pairs per language
    evals: dict[str, PairSet]            # held-out pairs per language, the same verses in every language
    eval_labels: torch.Tensor            # genre of each held-out verse
    task: TokenSentences                 # English genre training sentences
    task_labels: torch.Tensor
    lexicons: dict[str, set]             # normalised (target word, source word) pairs
    xnli: dict[str, tuple[TokenSentences, torch.Tensor]] = dataclasses.field(default_factory=dict)  # test sets
    hits: tuple[int, dict] | None = None  # (step, per-word hits) of the last evaluation


def _sentences(cfg: WordOTConfig, ctx: Context, words: list[list[str]],
               second: list[list[str]] | None = None) -> TokenSentences:
    """Token states of the frozen layer below the trainable ones (cached), and word spans (none for
    sentence pairs, which stage 2 mean-pools)."""
    layer = num_layers(cfg.encoder) - cfg.trainable_layers
    return token_states(cfg, ctx, words, (layer,), second)[layer]


XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")


def xnli_languages(cfg: WordOTConfig) -> list[str]:
    """The languages of source_lang, target_lang and eval_langs that XNLI has."""
    return [lang for lang in dict.fromkeys([cfg.source_lang, *cfg.target_lang, *cfg.eval_langs]) if lang in XNLI_LANGS]


def _xnli(cfg: WordOTConfig, ctx: Context, lang: str, split: str, n: int) -> tuple[TokenSentences, torch.Tensor]:
    """``n`` XNLI examples of ``lang`` (drawn with data_seed; all if fewer) as premise-hypothesis pairs."""
    kwargs = ({"path": "json", "data_files": {split: cfg.xnli_files.format(lang=lang, split=split)}}
              if cfg.xnli_files else {})
    ds = load_xnli(lang, split, **kwargs)
    pick = sorted(np.random.default_rng([cfg.data_seed, len(ds.first)]).permutation(len(ds.first))[:n].tolist())
    premise = moses_words([ds.first[i] for i in pick], lang)
    hypothesis = moses_words([ds.second[i] for i in pick], lang)
    return (_sentences(cfg, ctx, premise, hypothesis),
            torch.tensor([ds.labels[i] for i in pick], device=ctx.device))


def load_data(cfg: WordOTConfig, ctx: Context) -> Data:
    langs = list(cfg.target_lang)
    with ctx.dist.main_first():
        align: dict[str, PairSet] = {}
        if cfg.bitext:
            pairs = read_bitext(cfg.bitext)
            n = cfg.n_pairs or len(pairs)
            align[langs[0]] = PairSet(langs[0], _sentences(cfg, ctx, moses_words(pairs.first[:n], langs[0])),
                                      _sentences(cfg, ctx, moses_words(pairs.second[:n], cfg.source_lang)))
        else:
            ids = shared_ids(cfg.source_lang, langs, "train_a", cfg.n_pairs, cfg.data_seed)
            src = None
            for lang in langs:
                tgt_texts, src_texts = verse_texts(cfg.source_lang, lang, "train_a", ids)
                src = src or _sentences(cfg, ctx, moses_words(src_texts, cfg.source_lang))
                align[lang] = PairSet(lang, _sentences(cfg, ctx, moses_words(tgt_texts, lang)), src)
        if cfg.variant == "l2_cao":
            for lang, ps in align.items():
                if cfg.links == "eflomal":
                    ps.links = cached_eflomal(ps.tgt.words, ps.src.words)
                else:
                    lex = lexicon(cfg.source_lang, lang, "train")
                    ps.links = [lexicon_links(t, s, lex) for t, s in zip(ps.tgt.words, ps.src.words)]
        eval_langs = eval_languages(cfg)
        eval_ids = shared_ids(cfg.source_lang, eval_langs, "test", cfg.n_eval, cfg.data_seed + 1)
        evals, src = {}, None
        for lang in eval_langs:
            tgt_texts, src_texts = verse_texts(cfg.source_lang, lang, "test", eval_ids)
            src = src or _sentences(cfg, ctx, moses_words(src_texts, cfg.source_lang))
            evals[lang] = PairSet(lang, _sentences(cfg, ctx, moses_words(tgt_texts, lang)), src)
        genre = load_genre_task(cfg.source_lang, "test")
        label_of = dict(zip(genre.ids, genre.labels))
        xnli = {}
        if cfg.task == "genre":
            task_set = load_genre_task(cfg.source_lang, "train_b")
            task_set = subsample_with_priors(task_set, task_set.priors(), min(cfg.n_task, len(task_set)),
                                             cfg.data_seed)[0]
            task = _sentences(cfg, ctx, moses_words(task_set.texts, cfg.source_lang))
            task_labels = torch.tensor(task_set.labels, device=ctx.device)
        else:  # XNLI: English train, zero-shot test in every XNLI language of the run
            task, task_labels = _xnli(cfg, ctx, cfg.source_lang, "train", cfg.n_task)
            xnli = {lang: _xnli(cfg, ctx, lang, "test", cfg.n_eval) for lang in xnli_languages(cfg)}
    lexicons = {lang: lexicon(cfg.source_lang, lang, "all") for lang in word_languages(cfg)}
    return Data(align, evals, torch.tensor([label_of[v] for v in eval_ids], device=ctx.device), task, task_labels,
                lexicons, xnli)


def word_languages(cfg: WordOTConfig) -> list[str]:
    """The languages evaluated at the word level: ``word_langs``, or those evaluated with a lexicon."""
    return list(cfg.word_langs) or [lang for lang in eval_languages(cfg) if has_lexicon(cfg.source_lang, lang)]


def prepare(cfg: WordOTConfig) -> None:
    """Encode (and link) everything a run of ``cfg`` reads, in this process, so that the workers of
    a grid only read the caches."""
    load_data(cfg, Context(cfg, Dist(cfg.device), Path(cfg.output_dir or ".")))


def eval_languages(cfg: WordOTConfig) -> list[str]:
    """The languages evaluated on held-out Bible verses: the aligned and the extra ones that the
    Bible corpus has (a bitext language it lacks is trained on but not evaluated)."""
    from xlt_fast.data import languages

    return [lang for lang in dict.fromkeys(list(cfg.target_lang) + list(cfg.eval_langs)) if lang in languages()]


# ------------------------------------------------------------------------------------------ build

def phase_names(cfg: WordOTConfig) -> list[str]:
    names = [] if cfg.variant == "base" or cfg.init_from else ["align"]
    return names + (["task"] if cfg.task_steps else [])


def _align_steps(cfg: WordOTConfig, data: Data) -> int:
    n = min(len(ps.tgt) for ps in data.align.values())
    steps = max(1, round(cfg.epochs * n / (cfg.batch_size * cfg.grad_accum)))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _task_steps(cfg: WordOTConfig) -> int:
    return min(cfg.task_steps, cfg.max_steps) if cfg.max_steps else cfg.task_steps


def _init_from(cfg: WordOTConfig, top: nn.Module) -> None:
    run = Path(cfg.init_from)
    saved = json.loads((run / "config.json").read_text())["config"] if (run / "config.json").is_file() else None
    found = latest(run / "checkpoints")
    if saved is None or found is None or not (run / "results.json").is_file():
        raise ConfigError("WordOTConfig", [f"init_from: {run} is not a finished run with a checkpoint"])
    differ = [f for f in ALIGN_FIELDS if saved.get(f) != getattr(cfg, f)]
    if differ:
        raise ConfigError("WordOTConfig", [f"init_from: {run} was trained with other stage-1 settings ({differ})"])
    top.load_state_dict(torch.load(found / "state.pt", map_location="cpu", weights_only=True)["modules"]["top"])


def build(cfg: WordOTConfig, ctx: Context) -> State:
    if ctx.dist.world_size > 1:
        # one pooled OT couples every sentence of a batch, and the regulariser is a sum over it:
        # splitting the batch over processes would change the objective, not just parallelise it
        raise ConfigError("WordOTConfig", [f"world_size: WordOT runs in one process (got {ctx.dist.world_size}); "
                                           "its pooled OT and summed regulariser do not split over processes"])
    data = load_data(cfg, ctx)
    encoder = default_cache().encoder(cfg.encoder, ctx.device)
    top = EncoderTop(encoder.model, cfg.trainable_layers).to(ctx.device)
    if cfg.init_from:
        _init_from(cfg, top)
    # seeded here: loading an encoder may draw random numbers (weights it lacks), the first time only
    torch.manual_seed(derive_seed(cfg.seed, "head"))
    head = nn.Linear(encoder.hidden_size, len(GENRES) if cfg.task == "genre" else len(XNLI_LABELS)).to(ctx.device)
    modules: dict[str, nn.Module] = {"top": top, "head": head}
    optimizers, schedulers = {}, {}
    names = phase_names(cfg)
    if "align" in names:
        steps = _align_steps(cfg, data)
        optimizers["align"] = torch.optim.Adam(top.parameters(), lr=cfg.lr)
        schedulers["align"] = warmup_linear(optimizers["align"], steps, cfg.warmup_ratio) if cfg.warmup_ratio \
            else torch.optim.lr_scheduler.LambdaLR(optimizers["align"], lambda t: 1.0)
        for lang, ps in data.align.items():
            ctx.stream(f"align/{lang}", len(ps.tgt), cfg.batch_size)
    if "task" in names:
        optimizers["task"] = torch.optim.AdamW([{"params": top.parameters(), "lr": cfg.task_lr},
                                                {"params": head.parameters(), "lr": cfg.task_head_lr}])
        ctx.stream("task", len(data.task), cfg.task_batch_size)
    if "align" in names:  # c_0 of Eq. 2 is a constant: computed once per source sentence
        frozen, done = frozen_copy(top), {}
        for ps in data.align.values():
            if id(ps.src) not in done:
                done[id(ps.src)] = initial_states(frozen, ps.src, ctx.device)
            ps.src_initial = done[id(ps.src)]
    return State(modules=modules, optimizers=optimizers, schedulers=schedulers, data=data,
                 parallel={"top": ctx.wrap(top)})


@torch.no_grad()
def initial_states(frozen: nn.Module, sents: TokenSentences, device, batch: int = 64) -> TokenSentences:
    """``sents`` run through the frozen initial top layers (eval mode: no dropout, so each
    sentence's c_0 is one fixed tensor), as :class:`TokenSentences` of last-layer states."""
    order = sorted(range(len(sents)), key=lambda i: sents.states[i].shape[0])  # batched by length
    states: list = [None] * len(sents)
    for a in range(0, len(sents), batch):
        idx = order[a:a + batch]
        x, mask, _ = sents.batch(idx, device)
        hidden = frozen(x, mask)
        for b, (i, n) in enumerate(zip(idx, mask.sum(1).tolist())):
            states[i] = hidden[b, :n].cpu().clone()
    return TokenSentences(sents.words, states, sents.spans)


# ---------------------------------------------------------------------------------------- stage 1

def _points(state: State, ctx: Context, sents: TokenSentences, idx, mode: str):
    """Word point clouds ``(B, n, d)`` and masks of sentences ``idx`` under the trained model."""
    x, mask, spans = sents.batch(idx, ctx.device)
    return word_points(state.parallel["top"](x, mask), spans, mode)


def _divergence(cfg: WordOTConfig, x, y, x_mask=None, y_mask=None) -> torch.Tensor:
    """``S_eps`` of Eq. 1 between uniform measures on the real rows: one cloud ``(N, d)`` each, or a
    batch ``(B, n, d)`` with masks (one divergence per problem, shape ``(B,)``)."""
    if cfg.ot_backend == "geomloss":
        import geomloss

        loss = geomloss.SamplesLoss("sinkhorn", p=1 if cfg.cost == "euclidean" else 2, blur=cfg.blur,
                                    scaling=cfg.scaling, debias=True, backend="tensorized")
        if x_mask is None:
            return loss(x, y)
        a, b = (m.to(x.dtype) / m.sum(1, keepdim=True) for m in (x_mask, y_mask))
        return loss(a, x, b, y)
    return xlt_fast.sinkhorn_divergence(x, y, x_mask=x_mask, y_mask=y_mask, cost=cfg.cost, blur=cfg.blur,
                                        scaling=cfg.scaling, backend=cfg.ot_backend, check_finite=False)


def _alignment_term(cfg: WordOTConfig, x, xm, y, ym) -> torch.Tensor:
    """``S_eps^k`` of one language pair: pooled over the batch (scope batch) or the mean over the
    sentence pairs (scope pair)."""
    if cfg.scope == "batch":
        return _divergence(cfg, pooled(x, xm), pooled(y, ym)).reshape(())
    return _divergence(cfg, x, y, xm, ym).mean()


def _reg(cfg: WordOTConfig, y, ym, y0) -> torch.Tensor:
    sq = (y - y0).square().sum(-1)[ym]  # |c(j, t) - c_0(j, t)|^2 per English word
    return sq.sum() if cfg.reg_reduction == "sum" else sq.mean()


def _l2_links(ps: PairSet, idx, x, xm, y, ym) -> torch.Tensor:
    """Mean squared distance of the linked word pairs of the batch (Cao et al.'s L2 objective)."""
    nx, ny = xm.sum(1).tolist(), ym.sum(1).tolist()  # words that survived truncation, per sentence
    found = [(b, a, c) for b, i in enumerate(idx.tolist()) for a, c in ps.links[i] if a < nx[b] and c < ny[b]]
    if not found:
        return x.sum() * 0
    rows, cols_x, cols_y = torch.tensor(found, device=x.device).unbind(1)
    return (x[rows, cols_x] - y[rows, cols_y]).square().sum(-1).mean()


def _align_step(cfg: WordOTConfig, state: State, ctx: Context) -> dict[str, float]:
    data = state.data
    mode = "all" if cfg.variant == "subot" else cfg.word
    logged = []  # (loss, alignment terms, regularisers) per micro-batch, read back once per step
    ctx.zero_grad(["align"])
    for _ in range(cfg.grad_accum):
        terms, regs, mixed = [], [], []
        for lang, ps in data.align.items():
            idx = state.streams[f"align/{lang}"].next()
            x, xm = _points(state, ctx, ps.tgt, idx, mode)
            y, ym = _points(state, ctx, ps.src, idx, mode)
            h0, _, spans0 = ps.src_initial.batch(idx, ctx.device)
            regs.append(_reg(cfg, y, ym, word_points(h0, spans0, mode)[0]))
            if cfg.variant == "l2_cao":
                terms.append(_l2_links(ps, idx, x, xm, y, ym))
            elif cfg.variant == "mix_languages":
                mixed.append((pooled(x, xm), pooled(y, ym)))
            else:
                terms.append(_alignment_term(cfg, x, xm, y, ym))
        if mixed:  # App. E: one OT between every language's words and all English words of the step
            terms.append(_divergence(cfg, torch.cat([m[0] for m in mixed]), torch.cat([m[1] for m in mixed])).reshape(()))
        term, reg = torch.stack(terms).sum(), torch.stack(regs).sum()
        loss = term + cfg.reg_lambda * reg
        ctx.backward(loss / cfg.grad_accum)
        logged.append(torch.stack([loss, term, reg]).detach())
    ctx.step(["align"])
    values = (torch.stack(logged).mean(0)).tolist()
    return dict(zip(("loss", "divergence", "reg"), values))


# ---------------------------------------------------------------------------------------- stage 2

def _sentence_vectors(state: State, ctx: Context, sents: TokenSentences, idx) -> torch.Tensor:
    """Mean-pooled last-layer states (all tokens, as e5 pools) of sentences ``idx``."""
    x, mask, _ = sents.batch(idx, ctx.device)
    hidden = state.parallel["top"](x, mask)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _task_step(cfg: WordOTConfig, state: State, ctx: Context) -> dict[str, float]:
    idx = state.streams["task"].next()
    logits = state.modules["head"](_sentence_vectors(state, ctx, state.data.task, idx))
    loss = F.cross_entropy(logits, state.data.task_labels[idx])
    ctx.update(loss, ["task"])
    return {"loss": loss.item()}


def phases(cfg: WordOTConfig, state: State) -> list[Phase]:
    out = []
    for name in phase_names(cfg):
        if name == "align":
            out.append(Phase("align", _align_steps(cfg, state.data), lambda s, c: _align_step(cfg, s, c)))
        else:
            out.append(Phase("task", _task_steps(cfg), lambda s, c: _task_step(cfg, s, c)))
    return out


# -------------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def _eval_points(state: State, ctx: Context, sents: TokenSentences, word: str, batch: int = 64):
    """Word clouds ``(N, n, d)``, masks and sentence vectors ``(N, d)`` of every sentence (eval mode;
    batched by length, so little is padding)."""
    order = sorted(range(len(sents)), key=lambda i: sents.states[i].shape[0])
    clouds, masks, sentences = [], [], []
    with eval_mode(state.modules["top"]) as top:
        for a in range(0, len(sents), batch):
            x, mask, spans = sents.batch(order[a:a + batch], ctx.device)
            hidden = top(x, mask)
            pts, pm = word_points(hidden, spans, word)
            clouds.append(pts)
            masks.append(pm)
            m = mask.unsqueeze(-1).to(hidden.dtype)
            sentences.append((hidden * m).sum(1) / m.sum(1))
    width = max(c.shape[1] for c in clouds)
    pad = lambda t, fill: F.pad(t, (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1]),  # noqa
                                value=fill)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # sorted position of each sentence
    return (torch.cat([pad(c, 0.0) for c in clouds])[back], torch.cat([pad(m, False) for m in masks])[back],
            torch.cat(sentences)[back])


def _word_metrics(cfg: WordOTConfig, ps: PairSet, lexicon: set, tgt, tm, src, sm) -> dict[str, Any]:
    """Word retrieval P@1 (cosine, CSLS k=10) over the lexicon-linked words of all held-out pairs
    (each linked target word retrieves among all linked source words), and the OT-coupling link P@1
    (share of linked target words whose argmax source word under the stage-1 plan is a lexicon
    translation). ``hits`` holds each linked word's verse and outcomes, for paired bootstraps."""
    verse, ti, si = [], [], []
    for v, (t_words, s_words) in enumerate(zip(ps.tgt.words, ps.src.words)):
        for a, c in lexicon_links(t_words, s_words, lexicon):
            if tm[v, a] and sm[v, c]:  # both words survived truncation
                verse.append(v)
                ti.append(a)
                si.append(c)
    if not verse:
        return {"linked_words": 0}
    v, a, c = (torch.tensor(z) for z in (verse, ti, si))
    q, k = tgt[v, a], src[v, c]
    target = torch.arange(len(verse))
    hits_cos = metrics.retrieval_scores(q, k, "cosine").argmax(1) == target
    hits_csls = metrics.retrieval_scores(q, k, "csls", csls_k=min(10, len(verse))).argmax(1) == target
    plan = xlt_fast.sinkhorn(tgt, src, x_mask=tm, y_mask=sm, cost=cfg.cost, blur=cfg.blur, scaling=cfg.scaling,
                             return_plan=True, check_finite=False).plan
    best = plan.argmax(2)[v, a].tolist()  # per linked target word, the source word with the most mass
    hits_ot = [(normalise(ps.tgt.words[vv][aa]), normalise(ps.src.words[vv][bb])) in lexicon
               for vv, aa, bb in zip(verse, ti, best)]
    return {"linked_words": len(verse), "word_p1_cosine": float(hits_cos.double().mean()),
            "word_p1_csls": float(hits_csls.double().mean()), "coupling_p1": float(np.mean(hits_ot)),
            "hits": {"verse": verse, "cosine": hits_cos.int().tolist(), "csls": hits_csls.int().tolist(),
                     "coupling": [int(h) for h in hits_ot]}}


def _evaluate(state: State, ctx: Context) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(metrics per language, hits per language)`` of the current model on the held-out pairs."""
    cfg, data = ctx.cfg, state.data
    out: dict[str, dict[str, Any]] = {}
    hits: dict[str, Any] = {}
    src, sm, src_sent = _eval_points(state, ctx, next(iter(data.evals.values())).src, cfg.word)
    genre = state.phase == "task"  # the head is trained in stage 2 only

    def genre_metrics(vectors):
        with torch.no_grad():
            pred = state.modules["head"](vectors).argmax(1).cpu()
        y = data.eval_labels.cpu()
        return {"genre_macro_f1": metrics.macro_f1(y, pred, labels=np.unique(y.numpy())),
                "genre_accuracy": metrics.accuracy(y, pred)}
    genre = genre and cfg.task == "genre"
    if genre:
        out[cfg.source_lang] = genre_metrics(src_sent)
    for lang, ps in data.evals.items():
        tgt, tm, tgt_sent = _eval_points(state, ctx, ps.tgt, cfg.word)
        row: dict[str, Any] = {"sentence_p1": metrics.retrieval_precision_at_k(tgt_sent, src_sent)}
        if lang in data.lexicons:
            words = _word_metrics(cfg, ps, data.lexicons[lang], tgt, tm, src, sm)
            hits[lang] = words.pop("hits", None)
            row.update(words)
        if genre:
            row.update(genre_metrics(tgt_sent))
        out[lang] = row
    if state.phase == "task":
        for lang, (sents, y) in data.xnli.items():
            with torch.no_grad(), eval_mode(state.modules["top"]):
                vectors = torch.cat([_sentence_vectors(state, ctx, sents, range(a, min(a + 64, len(sents))))
                                     for a in range(0, len(sents), 64)])
                pred = state.modules["head"](vectors).argmax(1).cpu()
            out.setdefault(lang, {}).update({"xnli_accuracy": metrics.accuracy(y.cpu(), pred),
                                             "xnli_macro_f1": metrics.macro_f1(y.cpu(), pred, labels=[0, 1, 2])})
    return out, hits


def evaluate(state: State, ctx: Context) -> dict[str, dict[str, Any]]:
    values, hits = _evaluate(state, ctx)
    state.data.hits = (state.step, hits)
    return values


def summary(state: State, ctx: Context) -> dict[str, Any]:
    """Per linked held-out word, its verse and whether each retrieval hit (paired bootstraps)."""
    if state.data.hits is None or state.data.hits[0] != state.step:
        evaluate(state, ctx)
    return {"hits": state.data.hits[1]}


Config = WordOTConfig


def train(cfg: WordOTConfig, resume: bool = False, stop_after: int | None = None):
    """Train one WordOT config in ``cfg.output_dir``; returns its :class:`xlt_fast.training.Result`."""
    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)
