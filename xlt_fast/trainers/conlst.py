"""CoNLST: contrastive negative learning on pseudo-labels, then self-training (Li et al.,
LREC-COLING 2024; seed 004). Spec: ``shared/specs/iwda_conlst.md`` parts B, C.3 and D.14-23.

Phases (each variant runs a subset; data, model and the zero-shot stage: :mod:`xlt_fast.trainers.genre`):

* ``zs`` (B.2 step 0): g, h fine-tuned on the labelled source with cross-entropy.
* ``conl`` (B.2 steps 1-2, stage 1). On entry the zero-shot model labels the target pool once (eval
  mode; static pseudo-labels, D.19): ``q_i``, ``y^_i = argmax q_i``, confidence ``max q_i``. Each
  step takes B anchors of the pool (every sample is an anchor, Sec. 3.2) and

  - complementary labels (Eq. 4): ``ybar_i = {c != y^_i}`` if ``max q_i >= gamma``, else ``{argmin q_i}``;
  - negatives (Eq. 5): K of the high-confidence samples (``max q_j >= gamma``) with ``y^_j in ybar_i``,
    uniformly without replacement from the pooled set (D.18); fewer than K: the rest are masked;
  - ``L_CL`` (Eq. 6 with exp and /tau restored, D.14) =
    ``mean_i -log( e^{s(h_i, h'_i)/tau} / (e^{s(h_i, h'_i)/tau} + sum_{j in N_i} e^{s(h_i, h'_j)/tau}) )``,
    ``h = normalize(theta_con(g(x)))`` under two dropout masks of g (anchors twice, negatives once),
    ``s = -||a - b||^2`` (Snell et al., D.15), by :func:`xlt_fast.negative_contrastive` with the
    negatives as indices into the encoded negatives (no (B, K, d) copy). An anchor without a
    negative (no high-confidence sample of a complementary class) contributes 0;
  - ``L_CLCS`` (Eq. 7 as D.16 reads it): NL (Eq. 1) on a source minibatch of B (D.17) with
    ``ybar ~ U(C \\ {y})`` by :func:`xlt_fast.negative_learning`: the only path to theta_cl;
  - ``L_CoNL = L_CL + lambda L_CLCS`` (Eq. 8), Adam over g, theta_con and theta_cl.
* ``nl`` (the "w/o contrastive learning" row, D.23): stage 1 replaced by vanilla NL on the target
  pool, ``NL(h(g(x_i)), ybar_i ~ U(C \\ {y^_i}))`` for every anchor, plus ``lambda L_CLCS``.
* ``st`` (B.2 step 3, stage 2): ``st_iterations`` iterations of ``st_epochs`` pool epochs. Each
  starts by labelling the pool with the weak view (one dropout forward, train mode) and FlexMatch
  class thresholds (D.20): ``sigma(c) = #{i: max q_i > tau, y^_i = c}``,
  ``beta(c) = sigma(c) / max(max_c sigma, N - sum_c sigma)`` (warm-up form),
  ``T(c) = beta(c) / (2 - beta(c)) * tau``; kept: ``max q_i >= T(y^_i)``. Each step draws B kept
  samples and gives each ONE strong view, uniformly among ``strong_views``: ``mask`` (a pre-encoded
  copy of the verse with ``mask_rate`` of its words replaced by the mask token) or ``mixup``
  (Eqs. 9-11: ``x~ = l x_i + (1 - l) x_j``, ``y~ = l y^_i + (1 - l) y^_j``, ``l ~ Beta(alpha, alpha)``,
  ``j`` another sample of the batch; the batch holds distinct kept samples when there are at least B),
  and minimises ``L_SSL = CE(y_s, p(x_s)) + lambda_u CE(y~, p(A(x_t)))``
  (Eqs. 12-14 with hard pseudo-labels; the indicator of Eq. 14 is the selection).

Variants: ``zero_shot`` = [zs]; ``conlst`` = [zs, conl, st]; ``conl_only`` = [zs, conl];
``nl_only`` = [zs, nl]; ``nl_ce_st`` = [zs, nl, st]; ``no_clcs`` = ``conlst`` with lambda = 0; ``no_mixup`` = ``conlst``
without the mixup view; ``self_training`` = [zs, st] (plain ST from zero-shot: the baseline the
"beats ST" claim needs). ``init_from`` starts from the model of any finished IWDA or CoNLST run with
the same model settings and skips [zs] (a post-training step on another model, as CoNLST-RS/-MT).

Frozen features only: the view noise is dropout in g (spec C.3); fine-tuning the encoder (the
paper's setting) is not built. One process (a step takes milliseconds on frozen features).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import xlt_fast
from xlt_fast import metrics
from xlt_fast.data import GENRES
from xlt_fast.trainers import genre
from xlt_fast.training import Context, Phase, State, arg, derive_seed, generator, warmup_linear

Variant = Literal["zero_shot", "conlst", "conl_only", "nl_only", "nl_ce_st", "no_clcs", "no_mixup", "self_training"]
STAGE1 = {"conlst": "conl", "conl_only": "conl", "no_clcs": "conl", "no_mixup": "conl", "nl_only": "nl",
          "nl_ce_st": "nl"}
SELF_TRAINED = ("conlst", "nl_ce_st", "no_clcs", "no_mixup", "self_training")
VIEWS = ("mask", "mixup")
BINS = ("high", "mid", "low")  # Table 4's confidence bins: > 0.9, 0.5-0.9, < 0.5


@dataclasses.dataclass
class CoNLSTConfig(genre.GenreConfig):
    variant: Variant = arg("conlst", "zero_shot | conlst | conl_only | nl_only | nl_ce_st | no_clcs | no_mixup | "
                           "self_training")
    batch_size: int = arg(64, "anchors per stage-1 step; source and target examples per step otherwise "
                          "(spec C.3: 64; the source batch of Eqs. 7 and 12 has the same size, D.17)", ge=2)
    # stage 1: CoNL (Sec. 3.2, 4.1)
    gamma: float = arg(0.9, "confidence threshold of Eqs. 4-5 (not stated; Table 4's bins suggest 0.9)", ge=0, le=1)
    negatives: int = arg(16, "K negatives per anchor (Eq. 5; not stated; spec C.3: 16)", ge=1)
    temperature: float = arg(0.1, "tau of Eq. 6 (not stated; spec C.3: 0.1 or 0.5)", gt=0)
    similarity: Literal["sqeuclidean", "euclidean"] = arg(
        "sqeuclidean", "s in Eq. 6: minus the squared (Snell et al.) or plain Euclidean distance (D.15)")
    normalize: bool = arg(True, "L2-normalise theta_con's outputs before Eq. 6 (our addition, D.15)")
    contrastive_dim: int = arg(384, "output width of the contrastive head theta_con (spec C.3: Linear(384, 384))", ge=1)
    lambda_clcs: float = arg(1e-3, "lambda of Eq. 8 ([paper] Sec. 4.1: 0.001); no_clcs: 0", ge=0)
    conl_epochs: float = arg(1.0, "stage-1 epochs over the target pool ([paper] Sec. 4.1: 1)", gt=0)
    conl_lr: float = arg(2e-4, "stage-1 Adam lr ([paper]: 2e-6 mBERT fine-tuning; frozen features scaled "
                         "like zs_lr, x100)", gt=0)
    # stage 2: self-training (Sec. 3.3)
    st_iterations: int = arg(5, "self-training iterations T, each relabelling the pool (not stated; spec C.3: 5)",
                             ge=1)
    st_epochs: float = arg(1.0, "pool epochs per iteration (not stated; spec C.3: 1)", gt=0)
    st_lr: float = arg(5e-4, "stage-2 AdamW lr, warm-up + linear decay over the stage (not stated)", gt=0)
    flex_tau: float = arg(0.95, "FlexMatch threshold tau ([ext] FlexMatch default; not stated)", gt=0, le=1)
    flex_warmup: bool = arg(True, "FlexMatch's threshold warm-up (the unused count in beta's denominator)")
    lambda_u: float = arg(1.0, "weight of the unlabelled loss (Eq. 12; [paper]: 1)", ge=0)
    strong_views: list[str] = arg(["mask", "mixup"], "strong views, one per kept sample, drawn uniformly: mask "
                                  "(pre-encoded masked copies) | mixup (Eqs. 9-11); no_mixup drops mixup")
    mixup_alpha: float = arg(4.0, "Beta(alpha, alpha) of the mixup weight ([paper] Eq. 11: 4)", gt=0)
    mask_rate: float = arg(0.15, "fraction of a verse's words replaced by the mask token (not stated; spec C.3: 15%)",
                           gt=0, lt=1)
    mask_copies: int = arg(2, "masked copies pre-encoded per pool verse (spec C.3: 2)", ge=1)
    mask_token: str = arg("<mask>", "the encoder's mask token (XLM-R / e5: <mask>)")

    def check(self) -> list[str]:
        problems = super().check()
        if self.mode != "frozen":
            problems.append("mode: the CoNLST trainer runs on frozen features (the view noise is dropout in g); "
                            "encoder fine-tuning is not built")
        bad = [v for v in self.strong_views if v not in VIEWS]
        if bad or not self.strong_views or len(set(self.strong_views)) < len(self.strong_views):
            problems.append(f"strong_views: one or more distinct views of {list(VIEWS)}, got {self.strong_views}")
        elif self.variant == "no_mixup" and not views(self):
            problems.append("strong_views: no_mixup removes mixup, so it needs another view (mask)")
        if self.n_target and self.n_target < 2 * self.batch_size:
            problems.append(f"n_target: the pool must hold at least two batches (2 x {self.batch_size})")
        return problems


def views(cfg: CoNLSTConfig) -> list[str]:
    """The strong views of the variant (``no_mixup`` drops mixup)."""
    return [v for v in cfg.strong_views if not (cfg.variant == "no_mixup" and v == "mixup")]


def lambda_clcs(cfg: CoNLSTConfig) -> float:
    return 0.0 if cfg.variant == "no_clcs" else cfg.lambda_clcs


def phase_names(cfg: CoNLSTConfig) -> list[str]:
    names = [] if cfg.init_from else ["zs"]
    if cfg.variant in STAGE1:
        names.append(STAGE1[cfg.variant])
    if cfg.variant in SELF_TRAINED:
        names.append("st")
    return names


# ------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data(genre.Data):
    masked: torch.Tensor | None = None  # (mask_copies, pool size, d) features of the masked pool verses


def mask_words(text: str, rate: float, token: str, seed: int) -> str:
    """``text`` with a ``rate`` fraction of its whitespace words (at least one) replaced by ``token``."""
    words = text.split()
    if not words:
        return text
    rng = np.random.default_rng(seed)
    hit = rng.random(len(words)) < rate
    if not hit.any():
        hit[rng.integers(len(words))] = True
    return " ".join(token if h else w for w, h in zip(words, hit))


def masked_texts(cfg: CoNLSTConfig, dataset) -> list[str]:
    """``mask_copies`` masked copies of every pool verse (copy-major), each a function of
    ``(data_seed, copy, verse id)`` only, so every run sees (and the cache holds) the same ones."""
    return [mask_words(t, cfg.mask_rate, cfg.mask_token,
                       derive_seed(cfg.data_seed, "mask", c, zlib.crc32(str(i).encode())))
            for c in range(cfg.mask_copies) for t, i in zip(dataset.texts, dataset.ids)]


def load_data(cfg: CoNLSTConfig, ctx: Context) -> Data:
    base = genre.load_data(cfg, ctx)
    masked = None
    if cfg.variant in SELF_TRAINED and "mask" in views(cfg):
        pool = base.target
        masked = genre.features(cfg, ctx, masked_texts(cfg, pool.dataset)).reshape(
            cfg.mask_copies, len(pool), -1)
    return Data(**{f.name: getattr(base, f.name) for f in dataclasses.fields(genre.Data)}, masked=masked)


# ------------------------------------------------------------------------------------------ build

class PseudoLabels(nn.Module):
    """The pool's pseudo-labels (argmax), least likely classes (argmin), confidences (max q) and
    the self-training selection, as buffers (saved in checkpoints)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("label", torch.zeros(n, dtype=torch.long))
        self.register_buffer("least", torch.zeros(n, dtype=torch.long))
        self.register_buffer("confidence", torch.zeros(n))
        self.register_buffer("selected", torch.zeros(n, dtype=torch.bool))

    @torch.no_grad()
    def set(self, logits: torch.Tensor) -> None:
        q = torch.softmax(logits, 1)
        conf, label = q.max(1)
        self.label.copy_(label)
        self.least.copy_(q.argmin(1))
        self.confidence.copy_(conf)


def build(cfg: CoNLSTConfig, ctx: Context) -> State:
    if ctx.dist.world_size > 1:
        raise RuntimeError("the CoNLST trainer runs in one process (a step takes milliseconds on frozen features); "
                           "run it without torchrun")
    data = load_data(cfg, ctx)
    return build_state(cfg, ctx, data)


def build_state(cfg: CoNLSTConfig, ctx: Context, data: Data) -> State:
    model = genre.classifier(cfg, ctx, data, any_run=True)
    head = nn.Linear(model.feature_size, cfg.contrastive_dim).to(ctx.device)  # theta_con
    modules: dict[str, nn.Module] = {"model": model, "labels": PseudoLabels(len(data.target)).to(ctx.device)}
    optimizers, schedulers = {}, {}
    names = phase_names(cfg)
    bpe_source = len(data.source) // cfg.batch_size
    bpe_pool = len(data.target) // cfg.batch_size
    if "zs" in names:
        ctx.stream("zs/source", len(data.source), cfg.batch_size)
        optimizers["zs"] = genre.adamw(model, cfg.zs_lr, cfg.weight_decay)
        schedulers["zs"] = warmup_linear(optimizers["zs"], genre.steps(cfg, cfg.zs_epochs, bpe_source),
                                         cfg.warmup_ratio)
    stage1 = STAGE1.get(cfg.variant)
    if stage1 in names:
        ctx.stream(f"{stage1}/target", len(data.target), cfg.batch_size)
        ctx.stream(f"{stage1}/source", len(data.source), cfg.batch_size)
        params = list(model.parameters())
        if stage1 == "conl":
            modules["con"] = head
            params += list(head.parameters())
        optimizers[stage1] = torch.optim.Adam([p for p in params if p.requires_grad], lr=cfg.conl_lr, fused=True)
    if "st" in names:
        ctx.stream("st/source", len(data.source), cfg.batch_size)
        optimizers["st"] = genre.adamw(model, cfg.st_lr, cfg.weight_decay)
        total = cfg.st_iterations * st_iteration_steps(cfg, bpe_pool)
        schedulers["st"] = warmup_linear(optimizers["st"], total, cfg.warmup_ratio)
    generators = {"conl": generator(cfg.seed, "conl"), "st": generator(cfg.seed, "st")}
    parallel = {"model": ctx.wrap(model)}
    if "con" in modules:
        parallel["con"] = ctx.wrap(head)
    return State(modules=modules, optimizers=optimizers, schedulers=schedulers, generators=generators, data=data,
                 parallel=parallel)


def st_iteration_steps(cfg: CoNLSTConfig, batches_per_epoch: int) -> int:
    return genre.steps(cfg, cfg.st_epochs, batches_per_epoch)


# ---------------------------------------------------------------------------------------- stage 1

def confidence_bins(conf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Table 4 / Fig. 3: per confidence bin the number of pseudo-labels, their accuracy (None when
    the bin is empty) and the bin's share of all wrong ones; the overall accuracy."""
    correct = pred == y
    wrong = max(1, int((~correct).sum()))
    out: dict[str, Any] = {"accuracy": float(correct.float().mean())}
    masks = {"high": conf > 0.9, "mid": (conf >= 0.5) & (conf <= 0.9), "low": conf < 0.5}
    for name in BINS:
        sel = masks[name]
        n = int(sel.sum())
        out[f"n_{name}"] = n
        out[f"acc_{name}"] = float(correct[sel].float().mean()) if n else None
        out[f"noise_share_{name}"] = int((sel & ~correct).sum()) / wrong
    return out


def _label_pool(state: State, ctx: Context) -> dict[str, Any]:
    """Pseudo-label the pool with the current model (eval mode, B.2 step 1) and report their quality."""
    labels: PseudoLabels = state.modules["labels"]
    _, logits = genre.predict(state, ctx, state.data.target)
    labels.set(logits)
    high = int((labels.confidence >= ctx.cfg.gamma).sum())
    bins = confidence_bins(labels.confidence, labels.label, state.data.target.labels)
    return {"high_confidence": high, **{f"pool_{k}": v for k, v in bins.items()}}


def complementary(labels: PseudoLabels, idx: torch.Tensor, gamma: float, k: int) -> torch.Tensor:
    """Eq. 4 as a (B, C) membership: every class but the pseudo-label for confident anchors, the
    least likely class for the others."""
    conf = labels.confidence[idx] >= gamma
    out = torch.zeros(idx.numel(), k, dtype=torch.bool, device=idx.device)
    out[conf] = True
    out[conf, labels.label[idx][conf]] = False
    out[~conf, labels.least[idx][~conf]] = True
    return out


def sample_negatives(allowed: torch.Tensor, candidates: torch.Tensor, candidate_labels: torch.Tensor, k: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: for each row of ``allowed (B, C)``, ``k`` of the ``candidates`` (pool indices, labels
    ``candidate_labels``) whose label it allows, uniformly without replacement (random keys, top k);
    ``(indices (B, k), mask (B, k))``, the mask False where fewer than k exist."""
    B = allowed.shape[0]
    if candidates.numel() == 0:
        zeros = torch.zeros(B, k, dtype=torch.long, device=allowed.device)
        return zeros, zeros.bool()
    ok = allowed[:, candidate_labels]
    keys = torch.rand(ok.shape, generator=gen).to(ok.device).masked_fill_(~ok, -1.0)
    top, pos = keys.topk(min(k, candidates.numel()), dim=1)
    idx, mask = candidates[pos], top >= 0
    if idx.shape[1] < k:  # fewer candidates than k in the whole pool: pad with masked entries
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(B, pad)], 1)
        mask = torch.cat([mask, mask.new_zeros(B, pad)], 1)
    return idx, mask


def random_complementary(y: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """One label drawn uniformly from ``{0..k-1} \\ {y_i}`` per row (Eq. 1's ybar)."""
    r = torch.randint(k - 1, y.shape, generator=gen).to(y.device)
    return r + (r >= y).long()


def _clcs(cfg: CoNLSTConfig, state: State, logits_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (D.16): NL on the source batch with a random complementary label of the true one."""
    ybar = random_complementary(y_s, logits_s.shape[1], state.generators["conl"])
    return xlt_fast.negative_learning(logits_s, ybar, check_finite=False)


def _conl_step(cfg: CoNLSTConfig, state: State, ctx: Context) -> dict[str, float]:
    data, labels = state.data, state.modules["labels"]
    i_t, i_s = state.streams["conl/target"].next(), state.streams["conl/source"].next()
    gen = state.generators["conl"]
    high = (labels.confidence >= cfg.gamma).nonzero().flatten()
    allowed = complementary(labels, i_t, cfg.gamma, len(GENRES))
    neg, mask = sample_negatives(allowed, high, labels.label[high], cfg.negatives, gen)
    unique, local = torch.unique(neg[mask], return_inverse=True)
    index = torch.zeros_like(neg)
    index[mask] = local
    lam = lambda_clcs(cfg)
    parts = [(data.target.inputs, i_t), (data.target.inputs, i_t), (data.target.inputs, unique)]
    if lam > 0:
        parts.append((data.source.inputs, i_s))
    z, logits = genre.forward(state, parts)  # one dropout mask per row: z and z' of Eq. 6
    B, U = i_t.numel(), unique.numel()
    h = state.parallel["con"](z[:2 * B + U])
    if cfg.normalize:
        h = F.normalize(h, dim=1)
    anchor, positive = h[:B], h[B:2 * B]
    pool = h[2 * B:] if U else None  # no negative in the batch: every anchor's loss is 0
    loss_cl = xlt_fast.negative_contrastive(anchor, positive, index, cfg.temperature, cfg.similarity, pool=pool,
                                            negative_mask=mask, check_finite=False)
    values = {"cl": loss_cl.item(), "negatives": float(mask.sum(1).float().mean()),
              "no_negative": float((~mask.any(1)).float().mean())}
    loss = loss_cl
    if lam > 0:
        loss_clcs = _clcs(cfg, state, logits[2 * B + U:], data.source.labels[i_s])
        loss = loss + lam * loss_clcs
        values["clcs"] = loss_clcs.item()
    ctx.update(loss, ["conl"], values)
    return {"loss": values["cl"] + lam * values.get("clcs", 0.0), **values}


def _nl_step(cfg: CoNLSTConfig, state: State, ctx: Context) -> dict[str, float]:
    """D.23: vanilla NL on the pool with ybar ~ U(C \\ {pseudo-label}), plus lambda L_CLCS."""
    data, labels = state.data, state.modules["labels"]
    i_t, i_s = state.streams["nl/target"].next(), state.streams["nl/source"].next()
    lam = lambda_clcs(cfg)
    parts = [(data.target.inputs, i_t)] + ([(data.source.inputs, i_s)] if lam > 0 else [])
    _, logits = genre.forward(state, parts)
    B = i_t.numel()
    ybar = random_complementary(labels.label[i_t], logits.shape[1], state.generators["conl"])
    loss_nl = xlt_fast.negative_learning(logits[:B], ybar, check_finite=False)
    values = {"nl": loss_nl.item()}
    loss = loss_nl
    if lam > 0:
        loss_clcs = _clcs(cfg, state, logits[B:], data.source.labels[i_s])
        loss = loss + lam * loss_clcs
        values["clcs"] = loss_clcs.item()
    ctx.update(loss, ["nl"], values)
    return {"loss": values["nl"] + lam * values.get("clcs", 0.0), **values}


# ---------------------------------------------------------------------------------------- stage 2

def flexmatch_thresholds(conf: torch.Tensor, pred: torch.Tensor, k: int, tau: float, warmup: bool = True
                         ) -> torch.Tensor:
    """FlexMatch class thresholds (Zhang et al. 2021): ``T(c) = M(beta(c)) tau``, ``M(x) = x / (2 - x)``,
    ``beta(c) = sigma(c) / max(max_c sigma, N - sum sigma)`` (warm-up) or ``sigma(c) / max_c sigma``,
    ``sigma(c)`` the samples predicted c with confidence above tau. A class nobody predicts
    confidently gets threshold 0 (FlexMatch's behaviour; its few samples are all kept)."""
    sigma = torch.bincount(pred[conf > tau], minlength=k).to(conf.dtype)
    denom = sigma.max()
    if warmup:
        denom = torch.maximum(denom, conf.new_tensor(conf.numel()) - sigma.sum())
    beta = sigma / denom.clamp_min(1)
    return beta / (2 - beta) * tau


def _st_select(cfg: CoNLSTConfig, state: State, ctx: Context) -> dict[str, float]:
    """Relabel the pool with the weak (dropout) view and keep the samples above their class threshold."""
    labels: PseudoLabels = state.modules["labels"]
    _, logits = genre.predict(state, ctx, state.data.target, train_mode=True)
    labels.set(logits)
    thresholds = flexmatch_thresholds(labels.confidence, labels.label, logits.shape[1], cfg.flex_tau, cfg.flex_warmup)
    labels.selected.copy_(labels.confidence >= thresholds[labels.label])
    kept = labels.selected
    y = state.data.target.labels
    return {"kept": float(kept.float().mean()),
            "kept_accuracy": float((labels.label[kept] == y[kept]).float().mean()) if kept.any() else math.nan}


def strong_view(cfg: CoNLSTConfig, state: State, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and soft targets of one strong view per kept sample ``idx`` (each view drawn uniformly
    from :func:`views`): a masked copy, or mixup with another sample of the batch (Eqs. 9-11)."""
    data, labels, gen = state.data, state.modules["labels"], state.generators["st"]
    x = data.target.inputs[idx]
    y = F.one_hot(labels.label[idx], len(GENRES)).to(x.dtype)
    names = views(cfg)
    kind = torch.randint(len(names), (idx.numel(),), generator=gen).to(idx.device)
    out_x, out_y = x.clone(), y.clone()
    if "mask" in names:
        rows = kind == names.index("mask")
        copy = torch.randint(cfg.mask_copies, (idx.numel(),), generator=gen).to(idx.device)
        out_x[rows] = data.masked[copy[rows], idx[rows]]
    if "mixup" in names:
        rows = kind == names.index("mixup")
        order = torch.randperm(idx.numel(), generator=gen).to(idx.device)
        partner = torch.empty_like(order)
        partner[order] = order.roll(1)  # a cyclic derangement: no row is mixed with itself
        # Beta(alpha, alpha) from the global RNG (saved in checkpoints, reseeded per phase)
        lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample((idx.numel(), 1)).to(x)
        out_x[rows] = (lam * x + (1 - lam) * x[partner])[rows]
        out_y[rows] = (lam * y + (1 - lam) * y[partner])[rows]
    return out_x, out_y


def _st_step(cfg: CoNLSTConfig, per_iteration: int, state: State, ctx: Context) -> dict[str, float]:
    values = {}
    if state.phase_step % per_iteration == 0:
        values = _st_select(cfg, state, ctx)
    data, labels = state.data, state.modules["labels"]
    i_s = state.streams["st/source"].next()
    kept = labels.selected.nonzero().flatten()
    model = state.modules["model"]
    if kept.numel() == 0:  # nothing above its threshold: a source-only step
        _, logits = genre.forward(state, [(data.source.inputs, i_s)])
        loss_src = F.cross_entropy(logits, data.source.labels[i_s])
        ctx.update(loss_src, ["st"])
        return {"loss": loss_src.item(), "unlabelled": 0.0, **values}
    gen = state.generators["st"]
    if kept.numel() >= cfg.batch_size:  # distinct samples, so mixup never pairs a sample with a copy of itself
        pick = torch.randperm(kept.numel(), generator=gen)[:cfg.batch_size]
    else:
        pick = torch.randint(kept.numel(), (cfg.batch_size,), generator=gen)
    i_u = kept[pick.to(kept.device)]
    x_u, y_u = strong_view(cfg, state, i_u)
    _, logits = state.parallel["model"](torch.cat([model.collate([(data.source.inputs, i_s)]), x_u]))
    n = i_s.numel()
    loss_src = F.cross_entropy(logits[:n], data.source.labels[i_s])
    loss_u = -(y_u * F.log_softmax(logits[n:], 1)).sum(1).mean()
    ctx.update(loss_src + cfg.lambda_u * loss_u, ["st"])
    return {"loss": loss_src.item(), "unlabelled": loss_u.item(), **values}


def phases(cfg: CoNLSTConfig, state: State) -> list[Phase]:
    bpe_source = len(state.data.source) // cfg.batch_size
    bpe_pool = len(state.data.target) // cfg.batch_size
    out = []
    for name in phase_names(cfg):
        if name == "zs":
            out.append(Phase("zs", genre.steps(cfg, cfg.zs_epochs, bpe_source), genre.zs_step))
        elif name in ("conl", "nl"):
            step = _conl_step if name == "conl" else _nl_step
            out.append(Phase(name, genre.steps(cfg, cfg.conl_epochs, bpe_pool), lambda s, c, f=step: f(cfg, s, c),
                             enter=_label_pool))
        else:
            per = st_iteration_steps(cfg, bpe_pool)
            out.append(Phase("st", cfg.st_iterations * per, lambda s, c, n=per: _st_step(cfg, n, s, c)))
    return out


# -------------------------------------------------------------------------------------- evaluate

def evaluate(state: State, ctx: Context) -> dict[str, dict[str, Any]]:
    """Accuracy and macro-F1 (over the classes present) on the source dev, target dev and test sets;
    ``pool``: the quality of the current model's pseudo-labels on the target pool by confidence bin
    (eval mode; its labels are read for this report only)."""
    out: dict[str, dict[str, Any]] = {}
    for name, domain in state.data.evals.items():
        _, logits = genre.predict(state, ctx, domain)
        y, pred = domain.labels.cpu(), logits.argmax(1).cpu()
        out[name] = {"accuracy": metrics.accuracy(y, pred), "macro_f1": metrics.macro_f1(y, pred, labels=np.unique(y))}
    _, logits = genre.predict(state, ctx, state.data.target)
    conf, pred = torch.softmax(logits, 1).max(1)
    out["pool"] = {**confidence_bins(conf, pred, state.data.target.labels),
                   "high_confidence": int((conf >= ctx.cfg.gamma).sum())}
    return out


def summary(state: State, ctx: Context) -> dict[str, Any]:
    return {"pool_size": len(state.data.target), "source_size": len(state.data.source),
            "pool_prior": state.data.target.dataset.priors().tolist()}


Config = CoNLSTConfig


def train(cfg: CoNLSTConfig, resume: bool = False, stop_after: int | None = None):
    """Train one CoNLST config in ``cfg.output_dir``; returns its :class:`xlt_fast.training.Result`."""
    import sys

    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)
