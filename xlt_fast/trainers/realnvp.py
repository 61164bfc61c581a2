"""Real-NVP and GAN-Real-NVP alignment of contextual embeddings (Zhao & Eger; seed 002), with the
bootstrapping of Algorithm 1 and the baselines the paper compares. Spec: ``shared/specs/realnvp.md``.

The language ``target_lang`` (X, e.g. de) is mapped into the space of ``source_lang`` (Y, English,
left unchanged: spec 6.1); ``data="bible"`` takes layer-``layer`` token embeddings of Bible verses
(words = mean of their subwords) with word pairs from lexicon-anchored links (``links``) as the
lexicon P, ``data="simulation"`` the synthetic CBLI of Sec. 4.3 (:mod:`xlt_fast.data.cbli_simulation`).

Variants (a step is one batch of ``batch_size``):

* ``original``: no map. Closed forms (no training): ``rotation`` (orthogonal Procrustes on the
  pairs), ``gbdd`` (x - b, b = mean(x_i - y_i)), ``normalization`` (each language z-scored).
* ``real_nvp`` (Eqs. 1-2): two flows sharing Z; each step on aligned pairs ``(x_i, y_i)``:
  ``L = (|f_XY(x) - y|^2 + |f_YX(y) - x|^2) / 2 + lambda_mle (NLL_X + NLL_Y) / 2`` (the "dual form"
  read as the symmetric average, spec 6.2; the likelihood is maximised, spec 6.3), RMSprop 1e-4.
* ``fcnn``: least squares through 3 tanh layers of 1024 (Adam 1e-4; ``fcnn_linear_output``).
* ``gan_real_nvp`` (Eq. 3): independent batches of X and Y (the pairing removed); ``n_critic``
  critic steps then one flow step. Critics ``h_Y, h_X`` (:class:`xlt_fast.nn.WassersteinCritic`)
  ascend ``[mean h_Y(y) - mean h_Y(f_XY(x))] + [mean h_X(x) - mean h_X(f_YX(y))]`` minus
  ``lambda_gp`` times the zero-centred penalties of :func:`xlt_fast.critic_gp` (``lipschitz="gp"``),
  or are clipped to ``[-clip, clip]`` (``"clip"``, the cited WGAN's mechanism); the flows descend
  ``-mean h_Y(f_XY(x)) - mean h_X(f_YX(y)) + lambda_mle NLL``. RMSprop 1e-6 (A.1).
* ``muse``: the adversarial orthogonal map of Lample et al. (2018): ``dis_steps`` discriminator
  steps (BCE, label smoothing 0.1), one map step fooling it, then ``W <- (1 + b) W - b W W^T W``;
  SGD 0.1 (A.1), batch 32.

Model selection (Sec. 4.2): ``checks`` times per stage (default once per epoch) the criterion is
computed and the best model kept: ``semantic`` (mean cosine of the ``criterion_pairs`` most
confident mutual-CSLS pairs between the mapped train pools, :func:`xlt_fast.metrics.semantic_criterion`),
``structural`` (singular-value gap of those pairs), ``cbli`` (P@1 on the dev pairs: validation
data, shown inappropriate by the paper) or ``none`` (the last model). Every check also records
the tasks, so a run holds the per-epoch trajectory of Fig. 4 / Table 2 (``summary()["checks"]``).

Bootstrapping (Algorithm 1, for ``muse`` and ``gan_real_nvp``): ``rounds`` rounds after the base
stage; each warm-starts from the selected model, induces pairs P by mutual CSLS between the mapped
source pool and the target pool and trains the base objective (the EMD term) plus
``constraint_weight`` times Eq. 5 (``refine="cross_correlation"``) or Eq. 4 (``"graph_structure"``)
on batches of induced pairs, with selection again; ``"procrustes"``: each round solves orthogonal
Procrustes on the induced pairs, and that linear map replaces f (spec 6.12). The flows start at the
identity (``identity_init``, Algorithm 1 step 3).

One process: a step takes milliseconds (two 384-d flows), so ``torchrun`` is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlt_fast import metrics
from xlt_fast.data import GENRES
from xlt_fast.data.bible import genre_of_book
from xlt_fast.data.cbli_simulation import simulate
from xlt_fast.data.tokenization import pool_subwords
from xlt_fast.data.words import lexicon_links, moses_words, normalise
from xlt_fast.nn import (FCNN, Discriminator, FlowPair, LinearMap, Standardize, WassersteinCritic,
                         cross_correlation_loss, graph_structure_loss, matching_loss, procrustes)
from xlt_fast.trainers.parallel import (cached_eflomal, lexicon, link_problems, shared_ids, token_states,
                                        verse_texts)
from xlt_fast.training import Context, Phase, State, TrainerConfig, arg, generator
from xlt_fast.training.config import ConfigError

Variant = Literal["original", "rotation", "gbdd", "normalization", "fcnn", "real_nvp", "muse", "gan_real_nvp"]
CLOSED_FORM = ("original", "rotation", "gbdd", "normalization")
SUPERVISED = ("rotation", "gbdd", "fcnn", "real_nvp")
BOOTSTRAPPED = ("muse", "gan_real_nvp")
DEFAULT_LR = {"real_nvp": 1e-4, "gan_real_nvp": 1e-6, "fcnn": 1e-4, "muse": 0.1}  # seed 002, A.1


@dataclasses.dataclass
class RealNVPConfig(TrainerConfig):
    variant: Variant = arg("real_nvp", "original | rotation | gbdd | normalization | fcnn | real_nvp | muse | "
                           "gan_real_nvp")
    source_lang: str = arg("en", "Y: the language whose space is kept (English in seed 002)")
    target_lang: str = arg("de", "X: the language mapped into source_lang's space (a Bible corpus code)")
    data: Literal["bible", "simulation"] = arg("bible", "bible: token embeddings of Bible verses; simulation: the "
                                               "synthetic CBLI of Sec. 4.3")
    # simulation (spec 3)
    sim_k: int = arg(100, "simulation: occurrences per word and split (k)", ge=1)
    sim_t: int = arg(5, "simulation: degree of isomorphism t (1 = a rotation; t rigid groups otherwise)", ge=1)
    sim_eps: list[float] = arg([0.0, 2.5, 5.0], "simulation: train/test distances eps of the test sets", ge=0)
    sim_words: int = arg(20, "simulation: words per language (20 in the paper)", ge=2)
    # Bible data (spec 5.2)
    layer: int = arg(8, "encoder layer of the token embeddings ([paper] A.1: 8)", ge=0)
    max_length: int = arg(128, "max tokens per verse", ge=8)
    n_train: int = arg(5000, "train-split verse pairs (word pairs, pools)", ge=10)
    n_dev: int = arg(500, "dev-split verse pairs (the cbli criterion's validation pairs)", ge=10)
    n_test: int = arg(1000, "test-split verse pairs (every task)", ge=10)
    links: Literal["lexicon", "eflomal"] = arg("lexicon", "train word pairs: FreeDict-anchored one-to-one links, or "
                                               "eflomal intersected links (a FastAlign analogue)")
    pool: int = arg(20000, "tokens per language in the criterion pools (train split)", ge=20)
    n_cbli: int = arg(10000, "test word pairs of CBLI-Bible ([paper] 10k)", ge=10)
    data_seed: int = arg(0, "seed of the verse and pool draws (simulation: the words and their map)", ge=0)
    # maps
    n_couplings: int = arg(8, "couplings per flow (not stated; spec 2: 8, 4 in 2-D)", ge=1)
    hidden: int = arg(512, "conditioner width ([paper] A.1: two FCNN of 512)", ge=1)
    scale: Literal["exp", "tanh", "atan"] = arg("tanh", "coupling log-scale map (tanh: soft-clamped)")
    clamp: float = arg(2.0, "scale clamp of tanh/atan", gt=0)
    fcnn_width: int = arg(1024, "FCNN width ([paper] A.1: 1024)", ge=1)
    fcnn_linear_output: bool = arg(True, "FCNN without the last tanh (spec 6.18: targets lie outside (-1, 1))")
    # optimisation (A.1)
    epochs: float = arg(20.0, "epochs of the base stage ([paper] Fig. 4: 20)", gt=0)
    batch_size: int = arg(32, "batch ([paper] A.1: 32)", ge=2)
    lr: float = arg(0.0, "learning rate; 0 = the paper's: real_nvp 1e-4, gan_real_nvp 1e-6 (RMSprop), fcnn 1e-4 "
                    "(Adam), muse 0.1 (SGD)", ge=0)
    lambda_mle: float = arg(1e-4, "weight of the NLL terms ([paper] A.1: 1e-4)", ge=0)
    critic_hidden: int = arg(512, "GAN critic width (not stated)", ge=1)
    lipschitz: Literal["gp", "clip"] = arg("gp", "critic constraint: zero-centred gradient penalty or weight "
                                           "clipping (WGAN)")
    lambda_gp: float = arg(10.0, "gradient-penalty weight", ge=0)
    clip: float = arg(0.01, "weight-clipping bound (WGAN: 0.01)", gt=0)
    n_critic: int = arg(5, "critic (discriminator) steps per map step (WGAN, MUSE: 5)", ge=1)
    critic_lr: float = arg(0.0, "critic lr; 0 = lr", ge=0)
    muse_beta: float = arg(1e-3, "MUSE orthogonalisation beta", ge=0)
    muse_smoothing: float = arg(0.1, "MUSE discriminator label smoothing", ge=0, lt=0.5)
    muse_dis_hidden: int = arg(2048, "MUSE discriminator width", ge=1)
    # model selection (Sec. 4.2)
    criterion: Literal["semantic", "structural", "cbli", "none"] = arg(
        "semantic", "checkpoint selection: semantic (the paper's), structural, cbli (dev pairs) or none (last)")
    checks: int = arg(0, "criterion evaluations per stage, evenly spaced; 0 = one per epoch", ge=0)
    criterion_pairs: int = arg(30000, "most confident mutual-CSLS pairs the criteria average over ([paper] 30k)", ge=2)
    csls_k: int = arg(10, "CSLS neighbourhood (Lample et al. 2018: 10)", ge=1)
    # bootstrapping (Algorithm 1)
    refine: Literal["none", "cross_correlation", "graph_structure", "procrustes"] = arg(
        "none", "bootstrapping constraint (muse, gan_real_nvp): Eq. 5, Eq. 4 or Procrustes")
    rounds: int = arg(3, "bootstrapping rounds ([paper] Alg. 1: 10 simulation, 3 real data)", ge=1)
    round_epochs: float = arg(0.0, "epochs per round; 0 = epochs", ge=0)
    constraint_weight: float = arg(1.0, "weight of the Eq. 4/5 constraint (not stated)", ge=0)
    cc_literal: bool = arg(False, "Eq. 5 as printed (no square root in the denominator; spec 6.8)")

    def check(self) -> list[str]:
        problems = super().check()
        if self.refine != "none" and self.variant not in BOOTSTRAPPED:
            problems.append(f"refine: bootstrapping refines {' or '.join(BOOTSTRAPPED)}, not {self.variant!r}")
        if self.data == "simulation":
            if self.criterion == "cbli":
                problems.append("criterion: 'cbli' needs data='bible' (the simulation selects on train)")
            if not self.sim_eps:
                problems.append("sim_eps: at least one test distance")
        else:
            from xlt_fast.data import languages

            langs = languages()
            for name in ("source_lang", "target_lang"):
                if getattr(self, name) not in langs:
                    problems.append(f"{name}: no Bible translation for {getattr(self, name)!r}; available: {langs}")
            if self.source_lang == self.target_lang:
                problems.append("target_lang: must differ from source_lang")
            problems += link_problems(self.links, self.source_lang, [self.target_lang])
        return problems


# ------------------------------------------------------------------------------------------- data

Tasks = Callable[["Mapper"], dict[str, float]]


@dataclasses.dataclass
class AlignData:
    """Paired train rows (``x[i]`` translates to ``y[i]``; unsupervised methods draw them
    independently), the criterion pools, the similarity and the tasks (a function of the map)."""

    x: Tensor
    y: Tensor
    x_pool: Tensor
    y_pool: Tensor
    similarity: str
    tasks: Tasks
    dev: tuple[Tensor, Tensor] | None = None   # validation pairs (the cbli criterion)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _p_at_1(query: Tensor, keys: Tensor, similarity: str, method: str = "cosine", csls_k: int = 10) -> float:
    """P@1 of retrieving row i of ``keys`` for row i of ``query``."""
    top = metrics.retrieval_topk(query, keys, 1, method, csls_k, similarity=similarity, dtype=torch.float32)[1][:, 0]
    return float((top == torch.arange(len(query))).double().mean())


def _simulation(cfg: RealNVPConfig) -> AlignData:
    sim = simulate(cfg.sim_k, cfg.sim_t, cfg.sim_eps, cfg.sim_words, cfg.data_seed)

    @torch.no_grad()
    def tasks(mapper: Mapper) -> dict[str, float]:
        out = {}
        for eps, split in sim.tests.items():
            mx, y = mapper(split.x), mapper.target(split.y)
            top = metrics.retrieval_topk(mx, y, 1, similarity="euclidean", dtype=torch.float32)[1][:, 0]
            out[f"p1_eps{eps:g}"] = float((top == torch.arange(len(y))).double().mean())
            out[f"word_p1_eps{eps:g}"] = float((split.word[top] == split.word).double().mean())
        return out

    tr = sim.train
    return AlignData(tr.x, tr.y, tr.x, tr.y, "euclidean", tasks, (sim.validation.x, sim.validation.y),
                     {"train_pairs": len(tr.x)})


@dataclasses.dataclass
class Verses:
    """Verse pairs of one split: words, word vectors ``(n_words, d)`` per verse, links, genres."""

    x_words: list[list[str]]
    y_words: list[list[str]]
    x_vecs: list[Tensor]
    y_vecs: list[Tensor]
    links: list[list[tuple[int, int]]]   # (x word, y word)
    genre: Tensor

    def pairs(self, cap: int = 0, seed: int = 0) -> tuple[Tensor, Tensor, list[str], list[str]]:
        """The linked words' vectors and normalised strings (at most ``cap``, drawn with ``seed``)."""
        where = [(v, i, j) for v, links in enumerate(self.links) for i, j in links]
        if cap and len(where) > cap:
            keep = np.sort(np.random.default_rng([seed, len(where)]).permutation(len(where))[:cap])
            where = [where[k] for k in keep]
        if not where:
            raise ValueError("no word pairs: the lexicon links none of these verses' words")
        x = torch.stack([self.x_vecs[v][i] for v, i, _ in where])
        y = torch.stack([self.y_vecs[v][j] for v, _, j in where])
        return x, y, [normalise(self.x_words[v][i]) for v, i, _ in where], [normalise(self.y_words[v][j]) for v, _, j
                                                                            in where]


def _word_vectors(cfg: RealNVPConfig, ctx: Context, words: list[list[str]], batch: int = 256) -> list[Tensor]:
    """Each verse's word vectors: the mean of each word's subword states at ``cfg.layer``."""
    sents = token_states(cfg, ctx, words, (cfg.layer,))[cfg.layer]
    out = []
    for start in range(0, len(sents), batch):
        hidden, _, spans = sents.batch(range(start, min(start + batch, len(sents))))
        vecs, _ = pool_subwords(hidden, spans, "mean")
        for b, sp in enumerate(spans):
            i = start + b
            if not sp:
                raise ValueError(f"verse {i} ({' '.join(words[i])[:60]!r}) has no word within max_length tokens")
            if not torch.isfinite(vecs[b, :len(sp)]).all():
                raise FloatingPointError(f"verse {i}: the encoder gave non-finite layer-{cfg.layer} states")
            out.append(vecs[b, :len(sp)].clone())
    return out


def _verses(cfg: RealNVPConfig, ctx: Context, split: str, n: int, lexicon_split: str) -> Verses:
    en, lang = cfg.source_lang, cfg.target_lang
    ids = shared_ids(en, [lang], split, n, cfg.data_seed)
    x_texts, y_texts = verse_texts(en, lang, split, ids)
    xw, yw = moses_words(x_texts, lang), moses_words(y_texts, en)
    xv, yv = _word_vectors(cfg, ctx, xw), _word_vectors(cfg, ctx, yw)
    if cfg.links == "eflomal" and split == "train":
        found = cached_eflomal(xw, yw)
    else:
        lex = lexicon(en, lang, lexicon_split)
        found = [lexicon_links(a, b, lex) for a, b in zip(xw, yw)]
    links = [[(i, j) for i, j in pair if i < len(a) and j < len(b)] for pair, a, b in zip(found, xv, yv)]
    genre = torch.tensor([genre_of_book(int(v.split(".")[0])) for v in ids])
    return Verses(xw, yw, xv, yv, links, genre)


def _owners(sizes: list[int]) -> Tensor:
    """The segment of each row of segments of ``sizes`` rows laid end to end."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _segment_means(rows: Tensor, owner: Tensor, n: int) -> Tensor:
    """``(n, d)`` means of the rows of each segment (``owner[i]`` = the segment of row i)."""
    return rows.new_zeros(n, rows.shape[1]).index_add_(0, owner, rows) / torch.bincount(owner, minlength=n)[:, None]


def _bible(cfg: RealNVPConfig, ctx: Context) -> AlignData:
    train = _verses(cfg, ctx, "train", cfg.n_train, "train")
    dev = _verses(cfg, ctx, "dev", cfg.n_dev, "test")
    test = _verses(cfg, ctx, "test", cfg.n_test, "test")
    x, y, train_x_words, train_y_words = train.pairs()
    if len(x) < cfg.batch_size:
        raise ConfigError("RealNVPConfig", [f"n_train: {len(x)} word pairs from {cfg.n_train} verses, fewer than "
                                            f"batch_size ({cfg.batch_size})"])
    dev_x, dev_y, _, _ = dev.pairs(cfg.n_cbli, cfg.data_seed)
    cx, cy, cx_words, cy_words = test.pairs(cfg.n_cbli, cfg.data_seed)
    g = torch.Generator().manual_seed(cfg.data_seed)
    all_x, all_y = torch.cat(train.x_vecs), torch.cat(train.y_vecs)
    x_pool = all_x[torch.randperm(len(all_x), generator=g)[:cfg.pool]]
    y_pool = all_y[torch.randperm(len(all_y), generator=g)[:cfg.pool]]
    # lexicon retrieval: each test word's mean mapped vector against the English candidates' means
    lex = lexicon(cfg.source_lang, cfg.target_lang, "test")
    x_types, y_types = sorted(set(cx_words)), sorted(set(cy_words))
    x_index, y_index = {w: i for i, w in enumerate(x_types)}, {w: i for i, w in enumerate(y_types)}
    x_of, y_of = torch.tensor([x_index[w] for w in cx_words]), torch.tensor([y_index[w] for w in cy_words])
    gold = [{k for k, e in enumerate(y_types) if (f, e) in lex} for f in x_types]
    sent_x, sent_y = torch.cat(test.x_vecs), torch.cat(test.y_vecs)
    n_test = len(test.x_vecs)
    owner_x, owner_y = _owners([len(v) for v in test.x_vecs]), _owners([len(v) for v in test.y_vecs])
    # genre centroids: the mean pooled English train verse per genre; the target maps are affine
    # (identity, z-scoring), so mapping the centroids equals averaging mapped verses
    train_means = _segment_means(torch.cat(train.y_vecs), _owners([len(v) for v in train.y_vecs]), len(train.y_vecs))
    k = len(GENRES)
    known = torch.bincount(train.genre, minlength=k) > 0
    centroids = _segment_means(train_means, train.genre, k)[known]
    genre_ids = known.nonzero().flatten()

    @torch.no_grad()
    def tasks(mapper: Mapper) -> dict[str, float]:
        mx, ty = mapper(cx), mapper.target(cy)
        out = {"cbli_p1": _p_at_1(mx, ty, "cosine"),
               "cbli_csls_p1": _p_at_1(mx, ty, "cosine", "csls", min(cfg.csls_k, len(mx)))}
        top = metrics.retrieval_topk(_segment_means(mx, x_of, len(x_types)), _segment_means(ty, y_of, len(y_types)),
                                     1, dtype=torch.float32)[1][:, 0].tolist()
        scored = [t in g_ for t, g_ in zip(top, gold) if g_]
        out["lexicon_p1"] = float(np.mean(scored)) if scored else math.nan
        sx = _segment_means(mapper(sent_x), owner_x, n_test)
        sy = _segment_means(mapper.target(sent_y), owner_y, n_test)
        out["sentence_p1"] = 0.5 * (_p_at_1(sx, sy, "cosine") + _p_at_1(sy, sx, "cosine"))
        sims = F.normalize(sx, dim=1) @ F.normalize(mapper.target(centroids), dim=1).T
        pred = genre_ids[sims.argmax(1)]
        out["genre_accuracy"] = metrics.accuracy(test.genre, pred)
        out["genre_macro_f1"] = metrics.macro_f1(test.genre, pred, labels=np.unique(test.genre.numpy()))
        return out

    info = {"train_pairs": len(x), "dev_pairs": len(dev_x), "cbli_pairs": len(cx),
            "lexicon_words": sum(map(bool, gold)), "pool": [len(x_pool), len(y_pool)], "test_verses": len(test.x_vecs),
            "pair_types": len(set(zip(train_x_words, train_y_words)))}
    return AlignData(x, y, x_pool, y_pool, "cosine", tasks, (dev_x, dev_y), info)


# what the Bible data depends on; a process keeps its last data per key (an experiment's worker
# trains many methods on one language: they share one read of the cache and one word-pair pass)
_BIBLE_FIELDS = ("source_lang", "target_lang", "encoder", "layer", "max_length", "n_train", "n_dev", "n_test",
                 "links", "pool", "n_cbli", "data_seed", "csls_k", "batch_size", "device")
_BIBLE: dict[tuple, AlignData] = {}


def _bible_shared(cfg: RealNVPConfig, ctx: Context) -> AlignData:
    key = tuple(getattr(cfg, f) for f in _BIBLE_FIELDS)
    if key not in _BIBLE:
        _BIBLE.clear()
        _BIBLE[key] = _bible(cfg, ctx)
    return _BIBLE[key]


def load_data(cfg: RealNVPConfig, ctx: Context) -> AlignData:
    """The run's data (read-only: several runs of one process may share the Bible data)."""
    data = _simulation(cfg) if cfg.data == "simulation" else _bible_shared(cfg, ctx)
    for name in ("x", "y", "x_pool", "y_pool"):
        rows = getattr(data, name)
        if not torch.isfinite(rows).all():
            raise FloatingPointError(f"{name}: non-finite embeddings (rows "
                                     f"{(~torch.isfinite(rows).all(1)).nonzero().flatten()[:5].tolist()})")
    if cfg.variant in SUPERVISED and cfg.data == "bible" and data.info["pair_types"] < 2:
        raise ConfigError("RealNVPConfig", [f"links: the train pairs hold {data.info['pair_types']} word type "
                                            f"pair(s); a map learned from one word translation is meaningless"])
    return data


# ----------------------------------------------------------------------------------------- model

class Mapper(nn.Module):
    """The map of a run: ``core`` applied to X (None: the identity), an optional normalisation of
    each language, and the linear map that replaces ``core`` after a Procrustes round."""

    def __init__(self, core: nn.Module | None, dim: int, x_norm: nn.Module | None = None,
                 y_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.core, self.x_norm, self.y_norm = core, x_norm, y_norm
        self.linear = LinearMap(dim)
        self.linear.weight.requires_grad_(False)
        self.register_buffer("use_linear", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.x_norm is not None:
            x = self.x_norm(x)
        if bool(self.use_linear):
            return self.linear(x)
        return x if self.core is None else self.core(x)

    def target(self, y: Tensor) -> Tensor:
        return y if self.y_norm is None else self.y_norm(y)


class Selection(nn.Module):
    """Model selection state: the best map of the current stage (``best``), its score, and every
    check's criteria and tasks (``rows``), saved in checkpoints (``extra_state``)."""

    def __init__(self, mapper: Mapper) -> None:
        super().__init__()
        self.best = copy.deepcopy(mapper)
        for p in self.best.parameters():
            p.requires_grad_(False)
        self.rows: list[dict[str, Any]] = []
        self.score = -math.inf
        self.chosen = -1  # index into rows of the selected check of this stage (-1: none yet)

    def get_extra_state(self) -> dict[str, Any]:
        return {"rows": self.rows, "score": self.score, "chosen": self.chosen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rows, self.score, self.chosen = list(state["rows"]), float(state["score"]), int(state["chosen"])


class Induced(nn.Module):
    """The pairs induced by CSLS for a bootstrapping round (pool indices), saved in checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.src = self.tgt = torch.empty(0, dtype=torch.long)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"src": self.src, "tgt": self.tgt}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.src, self.tgt = state["src"], state["tgt"]


def _lr(cfg: RealNVPConfig) -> float:
    return cfg.lr or DEFAULT_LR.get(cfg.variant, 0.0)


def _closed_form(cfg: RealNVPConfig, data: AlignData, dim: int) -> Mapper:
    if cfg.variant == "normalization":
        return Mapper(None, dim, Standardize(data.x_pool), Standardize(data.y_pool))
    mapper = Mapper(None, dim)
    if cfg.variant == "rotation":
        mapper.linear.weight.data.copy_(procrustes(data.x, data.y))
        mapper.use_linear.fill_(True)
    elif cfg.variant == "gbdd":
        mapper.core = LinearMap(dim, bias=True)
        mapper.core.weight.requires_grad_(False)
        mapper.core.bias.data.copy_(-(data.x - data.y).mean(0))
    return mapper


def build(cfg: RealNVPConfig, ctx: Context) -> State:
    if ctx.dist.world_size > 1:
        raise RuntimeError("the Real-NVP trainer runs in one process (a step takes milliseconds); run it without "
                           "torchrun")
    data = load_data(cfg, ctx)
    dim = data.x.shape[1]
    modules: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    lr = _lr(cfg)
    if cfg.variant in CLOSED_FORM:
        mapper = _closed_form(cfg, data, dim)
    elif cfg.variant == "fcnn":
        mapper = Mapper(FCNN(dim, cfg.fcnn_width, cfg.fcnn_linear_output), dim)
        optimizers["map"] = torch.optim.Adam(mapper.core.parameters(), lr=lr)
    elif cfg.variant == "muse":
        mapper = Mapper(LinearMap(dim), dim)
        modules["disc"] = Discriminator(dim, cfg.muse_dis_hidden)
        optimizers["map"] = torch.optim.SGD(mapper.core.parameters(), lr=lr)
        optimizers["critic"] = torch.optim.SGD(modules["disc"].parameters(), lr=cfg.critic_lr or lr)
    else:
        mapper = Mapper(FlowPair(dim, cfg.n_couplings, cfg.hidden, cfg.scale, cfg.clamp, identity_init=True), dim)
        optimizers["map"] = torch.optim.RMSprop(mapper.core.parameters(), lr=lr)
        if cfg.variant == "gan_real_nvp":
            modules["critic_y"] = WassersteinCritic(dim, cfg.critic_hidden)
            modules["critic_x"] = WassersteinCritic(dim, cfg.critic_hidden)
            params = [*modules["critic_y"].parameters(), *modules["critic_x"].parameters()]
            optimizers["critic"] = torch.optim.RMSprop(params, lr=cfg.critic_lr or lr)
    mapper = mapper.to(ctx.device)
    modules = {"mapper": mapper, "selection": Selection(mapper), "induced": Induced(), **modules}
    if cfg.variant in SUPERVISED:
        ctx.stream("pairs", len(data.x), cfg.batch_size)
    else:
        ctx.stream("x", len(data.x), cfg.batch_size)
        ctx.stream("y", len(data.y), cfg.batch_size)
    generators = {"critic": generator(cfg.seed, "critic"), "induced": generator(cfg.seed, "induced")}
    return State(modules={k: m.to(ctx.device) for k, m in modules.items()}, optimizers=optimizers,
                 generators=generators, data=data)


# ---------------------------------------------------------------------------------------- steps

def _supervised_step(cfg: RealNVPConfig, state: State, ctx: Context) -> dict[str, float]:
    d, core = state.data, state.modules["mapper"].core
    i = state.streams["pairs"].next()
    x, y = d.x[i].to(ctx.device), d.y[i].to(ctx.device)
    if cfg.variant == "fcnn":
        loss = (core(x) - y).square().sum(1).mean()
        ctx.update(loss, ["map"], {"loss": loss.item()})
        return {"loss": loss.item()}
    out = core.both(x, y)
    match = matching_loss(out, x, y)
    loss = match + cfg.lambda_mle * out.nll
    values = {"loss": loss.item(), "match": match.item(), "nll": out.nll.item()}
    ctx.update(loss, ["map"], values)
    return values


def _unpaired(state: State, ctx: Context) -> tuple[Tensor, Tensor]:
    d = state.data
    return d.x[state.streams["x"].next()].to(ctx.device), d.y[state.streams["y"].next()].to(ctx.device)


def _constraint(cfg: RealNVPConfig, state: State, ctx: Context) -> Tensor | None:
    """Eq. 4 or Eq. 5 on a batch of the round's induced pairs (None outside a constrained round)."""
    induced: Induced = state.modules["induced"]
    if cfg.refine not in ("cross_correlation", "graph_structure") or not state.phase.startswith("round"):
        return None
    pick = torch.randint(len(induced.src), (cfg.batch_size,), generator=state.generators["induced"])
    d, core = state.data, state.modules["mapper"].core
    y_hat, y = core(d.x_pool[induced.src[pick]].to(ctx.device)), d.y_pool[induced.tgt[pick]].to(ctx.device)
    if cfg.refine == "cross_correlation":
        return cross_correlation_loss(y_hat, y, cfg.cc_literal)
    return graph_structure_loss(y_hat, y)


def _clip_(module: nn.Module, bound: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(-bound, bound)


def _gan_step(cfg: RealNVPConfig, state: State, ctx: Context) -> dict[str, float]:
    core = state.modules["mapper"].core
    h_y, h_x = state.modules["critic_y"], state.modules["critic_x"]
    gp_weight = cfg.lambda_gp if cfg.lipschitz == "gp" else 0.0
    w1 = 0.0
    # the flows are fixed during the critic steps: map all their batches in one pass
    batches = [_unpaired(state, ctx) for _ in range(cfg.n_critic)]
    with torch.no_grad():
        mapped = core.both(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    for c, (x, y) in enumerate(batches):
        rows = slice(c * len(x), (c + 1) * len(x))
        alpha = torch.rand(2, len(x), generator=state.generators["critic"]).to(x)
        # no finiteness pass: a non-finite mapped row makes loss_c non-finite, which ctx.update stops on
        est_y, gp_y = h_y.critic_gp(y, mapped.y_hat[rows], alpha=alpha[0], check_finite=False)
        est_x, gp_x = h_x.critic_gp(x, mapped.x_hat[rows], alpha=alpha[1], check_finite=False)
        estimate = est_y + est_x
        ctx.update(gp_weight * (gp_y + gp_x) - estimate, ["critic"])
        if cfg.lipschitz == "clip":
            _clip_(h_y, cfg.clip)
            _clip_(h_x, cfg.clip)
        w1 += estimate.item() / cfg.n_critic
    x, y = _unpaired(state, ctx)
    out = core.both(x, y)
    adv = -(h_y(out.y_hat).mean() + h_x(out.x_hat).mean())
    loss = adv + cfg.lambda_mle * out.nll
    values = {"w1": w1, "adv": adv.item(), "nll": out.nll.item()}
    extra = _constraint(cfg, state, ctx)
    if extra is not None:
        loss = loss + cfg.constraint_weight * extra
        values["constraint"] = extra.item()
    ctx.update(loss, ["map"], values)
    return values


def _muse_step(cfg: RealNVPConfig, state: State, ctx: Context) -> dict[str, float]:
    core, disc = state.modules["mapper"].core, state.modules["disc"]
    s = cfg.muse_smoothing

    def logits_labels(map_grad: bool) -> tuple[Tensor, Tensor]:
        x, y = _unpaired(state, ctx)
        with torch.set_grad_enabled(map_grad):
            mx = core(x)
        labels = torch.cat([torch.full((len(x),), 1 - s), torch.full((len(y),), s)]).to(x)
        return disc(torch.cat([mx, y])), labels

    dis = 0.0
    for _ in range(cfg.n_critic):  # the discriminator learns mapped X (label 1 - s) from Y (label s)
        logits, labels = logits_labels(False)
        loss_d = F.binary_cross_entropy_with_logits(logits, labels)
        ctx.update(loss_d, ["critic"])
        dis += loss_d.item() / cfg.n_critic
    logits, labels = logits_labels(True)  # the map learns to fool it (flipped labels)
    loss = F.binary_cross_entropy_with_logits(logits, 1 - labels)
    values = {"dis_loss": dis, "map_loss": loss.item()}
    extra = _constraint(cfg, state, ctx)
    if extra is not None:
        loss = loss + cfg.constraint_weight * extra
        values["constraint"] = extra.item()
    ctx.update(loss, ["map"], values)
    core.orthogonalize_(cfg.muse_beta)
    return values


# ------------------------------------------------------------------------------ model selection

@torch.no_grad()
def criteria(cfg: RealNVPConfig, mapper: Mapper, data: AlignData) -> dict[str, float]:
    """Semantic and structural criteria on the mapped train pools, and (Bible) P@1 on the dev pairs."""
    mx, ty = mapper(data.x_pool), mapper.target(data.y_pool)
    if not torch.isfinite(mx).all():
        raise FloatingPointError("the map sends some pool rows to NaN or inf; lower the learning rate")
    k = min(cfg.csls_k, len(mx), len(ty))
    semantic, (i, j) = metrics.semantic_criterion(mx, ty, cfg.criterion_pairs, k, data.similarity)
    out = {"semantic": semantic, "structural": metrics.structural_criterion(mx[i], ty[j]) if len(i) > 1 else math.nan,
           "induced_pairs": float(len(i))}
    if data.dev is not None:
        out["cbli_dev"] = _p_at_1(mapper(data.dev[0]), mapper.target(data.dev[1]), data.similarity)
    return out


def _score(cfg: RealNVPConfig, values: dict[str, float]) -> float:
    if cfg.criterion == "none":
        return math.inf  # the latest check wins
    value = {"semantic": values["semantic"], "structural": -values["structural"], "cbli": values.get("cbli_dev")}
    score = value[cfg.criterion]
    return -math.inf if score is None or math.isnan(score) else score


def _check(cfg: RealNVPConfig, state: State, ctx: Context, epoch: float) -> None:
    """Criteria and tasks of the current map; keep it if it is the stage's best so far."""
    mapper, sel = state.modules["mapper"], state.modules["selection"]
    values = {**criteria(cfg, mapper, state.data), **state.data.tasks(mapper)}  # no map has dropout
    sel.rows.append({"stage": state.phase, "step": state.phase_step + 1, "epoch": round(epoch, 4), **values})
    score = _score(cfg, values)
    if score >= sel.score or sel.chosen < 0:
        sel.score, sel.chosen = score, len(sel.rows) - 1
        sel.best.load_state_dict(mapper.state_dict())


def _with_checks(cfg: RealNVPConfig, steps: int, bpe: int, step: Callable) -> Callable:
    n = cfg.checks or max(1, round(steps / bpe))
    at = {max(1, round(steps * (c + 1) / n)) for c in range(n)}

    def run(state: State, ctx: Context) -> dict[str, float]:
        values = step(cfg, state, ctx)
        if state.phase_step + 1 in at:
            _check(cfg, state, ctx, (state.phase_step + 1) / bpe)
        return values
    return run


def _enter_round(cfg: RealNVPConfig, state: State, ctx: Context) -> dict[str, Any]:
    """Algorithm 1 steps 5-6: warm start from the selected map, induce P by mutual CSLS."""
    mapper, sel, induced = state.modules["mapper"], state.modules["selection"], state.modules["induced"]
    mapper.load_state_dict(sel.best.state_dict())
    sel.score, sel.chosen = -math.inf, -1
    d = state.data
    with torch.no_grad():
        mx, ty = mapper(d.x_pool), mapper.target(d.y_pool)
    src, tgt, _ = metrics.mutual_csls_pairs(mx, ty, cfg.criterion_pairs, min(cfg.csls_k, len(mx), len(ty)),
                                            d.similarity)
    if len(src) < 2:
        raise FloatingPointError(f"{state.phase}: CSLS induced {len(src)} pair(s); nothing to bootstrap on")
    induced.src, induced.tgt = src, tgt
    return {"induced_pairs": len(src)}


def _procrustes_step(cfg: RealNVPConfig, state: State, ctx: Context) -> dict[str, float]:
    """A +Procrustes round: the orthogonal map of the induced pairs replaces f (spec 6.12)."""
    mapper, induced, d = state.modules["mapper"], state.modules["induced"], state.data
    w = procrustes(d.x_pool[induced.src], d.y_pool[induced.tgt])
    mapper.linear.weight.data.copy_(w)
    mapper.use_linear.fill_(True)
    _check(cfg, state, ctx, 0.0)
    return {"pairs": float(len(induced.src))}


def phases(cfg: RealNVPConfig, state: State) -> list[Phase]:
    if cfg.variant in CLOSED_FORM:
        return []
    bpe = len(state.data.x) // cfg.batch_size
    step = {"fcnn": _supervised_step, "real_nvp": _supervised_step, "gan_real_nvp": _gan_step,
            "muse": _muse_step}[cfg.variant]
    def cap(n: int) -> int:
        return min(n, cfg.max_steps) if cfg.max_steps else n

    steps = cap(max(1, math.ceil(cfg.epochs * bpe)))
    out = [Phase("fit", steps, _with_checks(cfg, steps, bpe, step))]
    if cfg.refine != "none":
        r_steps = cap(max(1, math.ceil((cfg.round_epochs or cfg.epochs) * bpe)))
        enter = lambda s, c: _enter_round(cfg, s, c)  # noqa: E731
        for r in range(1, cfg.rounds + 1):
            if cfg.refine == "procrustes":
                out.append(Phase(f"procrustes{r}", 1, lambda s, c: _procrustes_step(cfg, s, c), enter))
            else:
                out.append(Phase(f"round{r}", r_steps, _with_checks(cfg, r_steps, bpe, step), enter))
    return out


# ------------------------------------------------------------------------------------- evaluate

def selected(state: State) -> Mapper:
    """The map a run returns: the selected one of the current stage (the map itself for closed forms)."""
    sel = state.modules["selection"]
    return sel.best if sel.chosen >= 0 else state.modules["mapper"]


def evaluate(state: State, ctx: Context) -> dict[str, dict[str, Any]]:
    """Tasks and criteria of the selected map (the engine calls this at the end of each stage)."""
    mapper = selected(state)
    return {"test": state.data.tasks(mapper), "criteria": criteria(ctx.cfg, mapper, state.data)}


def summary(state: State, ctx: Context) -> dict[str, Any]:
    sel = state.modules["selection"]
    chosen = sel.rows[sel.chosen] if sel.chosen >= 0 else None
    return {"data": state.data.info, "checks": sel.rows, "selected": chosen, "lr": _lr(ctx.cfg)}


Config = RealNVPConfig


def train(cfg: RealNVPConfig, resume: bool = False, stop_after: int | None = None):
    """Train one config in ``cfg.output_dir``; returns its :class:`xlt_fast.training.Result`."""
    import sys

    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)
