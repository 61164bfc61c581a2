"""IWDA: class-importance-weighted domain alignment for zero-shot cross-lingual transfer
(Xian, Ji, Zhao, ICLR 2022; seed 000). Spec: ``shared/specs/iwda_conlst.md`` part A.

Phases (each variant runs a subset):

* ``zs`` (A.2 step 0): fine-tune g, h on labelled source data with cross-entropy.
* ``iwda`` (A.2 steps 1-2): on entry, the QP estimate of the class weights from the zero-shot
  model's hard predictions, ``w^(0) = (1 - rho) w' + rho 1`` (App. C.1). Then each step, on a source
  batch and a target batch:
  ``L_cls = CE(h(g(x_s)), y_s)`` (not weighted, Eq. 4);
  ``Delta = (1/n) sum_i w~[y_i] f(g(x_i) (x) p_i) - (1/m) sum_j f(g(x'_j) (x) p'_j)`` (App. C.1, the
  per-sample weighting of the authors' code; ``critic_normalize="sum_w"`` divides by ``sum w`` over
  the global batch instead) and the zero-centred penalty ``GP = mean ||grad f(u~)||^2`` on the
  segment between paired CDAN inputs, both from
  :func:`xlt_fast.critic_gp` (closed-form penalty gradients: no double backward), with CDAN inputs
  ``g(x) (x) softmax(h(g(x)))`` (softmax detached) never materialised;
  the critic ascends ``s Delta - mu GP`` (``s = lambda_da``, the paper's formula; ``critic_scale="one"``:
  ``s = 1``, the later code); g, h descend ``L_cls + lambda_t Delta`` through gradient reversal, with
  ``lambda_t = lambda_da min(1, t / (0.1 T))``; ``w~ = a_t w + (1 - a_t)`` with the same ramp
  (code only); ``w = w^(0) + delta`` descends ``|C w - t|^2`` (Eq. 4 right) on EMA statistics with
  decoupled weight decay ``lambda_iw`` on delta (the xi regulariser, App. C.1) and a linearly
  decaying lr (Sec. 3, fix 2), projected back to ``{w >= 0, p_S^T w = 1}`` after every step (fix 1).
  Updates are simultaneous (one backward, A.2 step 2i); ``n_critic > 1`` alternates that many
  critic steps with one feature step (App. A.2, Table 5). ``lambda_da = 0`` trains no critic (none
  could change the model): the stage is then a source-only continuation, the control that
  separates alignment from the stage's extra epochs of source training.
* ``st`` (A.4; Dong & de Melo 2019): self-training from the current model: each of
  ``st_iterations`` rounds adds the most confident ``st_fraction`` of the target pool (class-balanced
  by predicted label, labels fixed once chosen), and every step trains on a source batch plus a
  batch of the pseudo-labelled set (source CE kept). The round count is our choice (spec D.13).

Variants: ``zero_shot`` = [zs]; ``iwda`` (estimated w), ``iwda_oracle`` (w = p_T / p_S from the true
target priors) and ``unweighted`` (w = 1: plain CDAN-W1 alignment) = [zs, iwda];
``self_training`` = [zs, st]; ``iwda_self_training`` = [zs, iwda, st]. ``init_from`` starts from the
model of a finished ``zero_shot`` run with the same zero-shot settings and skips [zs]: every phase
draws its own data streams and reseeds its randomness on entry, so the result equals one run of
all phases.

Data, model and the zero-shot stage: :mod:`xlt_fast.trainers.genre` (spec C.1), shared with CoNLST.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xlt_fast import metrics
from xlt_fast.data import GENRES
from xlt_fast.nn import ImportanceWeights, WassersteinCritic, grad_reverse, solve_weights_qp
from xlt_fast.nn.importance import confusion_counts, prediction_counts
from xlt_fast.trainers import genre
from xlt_fast.trainers.genre import Data, GenreConfig
from xlt_fast.training import Context, Phase, State, arg, generator, warmup_linear

Variant = Literal["zero_shot", "iwda", "iwda_oracle", "unweighted", "self_training", "iwda_self_training"]
ALIGNED = ("iwda", "iwda_oracle", "unweighted", "iwda_self_training")
MIN_SHIFT = 0.05  # below this TV the correction % (a ratio to the shift) is not reported
ESTIMATED = ("iwda", "iwda_self_training")


@dataclasses.dataclass
class IWDAConfig(GenreConfig):
    variant: Variant = arg("iwda", "zero_shot | iwda | iwda_oracle | unweighted | self_training | iwda_self_training")
    # IWDA stage
    epochs: float = arg(4.0, "IWDA epochs over the source ([paper] C.2: 4 source epochs)", gt=0)
    lr: float = arg(1e-3, "model lr in the IWDA stage (frozen features; [paper] C.2: 1e-5 fine-tuning)", gt=0)
    critic_hidden: int = arg(2048, "critic hidden width ([paper] C.1: 2048)", ge=1)
    critic_lr: float = arg(5e-4, "critic lr ([paper] C.2)", gt=0)
    lambda_da: float = arg(5e-3, "alignment strength lambda ([paper] C.2: 5e-3)", ge=0)
    lambda_gp: float = arg(10.0, "gradient-penalty weight mu ([paper] C.2: 10)", ge=0)
    da_warmup_ratio: float = arg(0.1, "ramp of lambda_t over this fraction of the stage ([paper] C.2)", ge=0, le=1)
    critic_scale: Literal["lambda_da", "one"] = arg(
        "lambda_da", "critic ascends s*Delta - mu*GP with s = lambda_da (paper formula) or 1 (later code)")
    critic_normalize: Literal["n", "sum_w"] = arg(
        "n", "weighted source term divided by n (authors' code, spec D.1) or by sum(w)")
    critic_backend: Literal["auto", "reference", "cpu", "cuda"] = arg(
        "auto", "critic_gp backend: auto = the fused kernels (closed-form penalty gradients); reference = "
        "materialised CDAN input + autograd double backward, the usual implementation")
    cdan: bool = arg(True, "condition the critic on softmax outputs (CDAN, [paper] C.1)")
    n_critic: int = arg(1, "1: simultaneous updates; k > 1: k critic steps per feature step (App. A.2); epochs "
                        "count feature steps, so the source is read (k + 1) * epochs times", ge=1)
    lr_iw: float = arg(5e-4, "lr of the weights, linearly decayed ([paper] C.2, Sec. 3)", gt=0)
    lambda_iw: float = arg(2.0, "weight decay of w - w0, the xi regulariser ([paper] C.2: 2; A.2: 1)", ge=0)
    lambda_iw_init: float = arg(0.25, "rho in w0 = (1 - rho) w_qp + rho ([paper] C.2)", ge=0, le=1)
    iw_warmup_ratio: float = arg(0.1, "ramp from uniform to estimated weights in the critic ([code])", ge=0, le=1)
    iw_ema_rate: float = arg(5e-3, "EMA rate of the confusion statistics ([code] lr_confusion_mtx)", gt=0, le=1)
    iw_projection: Literal["clamp", "euclidean"] = arg(
        "clamp", "clamp: max(w,0)/p_S.w (authors' code); euclidean: nearest feasible point (spec D.4)")
    iw_init_data: Literal["train", "dev"] = arg(
        "train", "source data of the QP confusion matrix: the training source ([code]) or source dev (BBSE-style)")
    # self-training (Dong & de Melo 2019; spec D.13)
    st_epochs: float = arg(4.0, "self-training epochs over the source", gt=0)
    st_lr: float = arg(1e-3, "self-training lr (frozen features; [paper] C.2: 1e-5 fine-tuning)", gt=0)
    st_iterations: int = arg(10, "self-training rounds (each adds st_fraction of the pool)", ge=1)
    st_fraction: float = arg(0.02, "fraction of the pool added per round ([paper] C.2: 0.05% or 2%)", gt=0, le=1)


# ------------------------------------------------------------------------------------------ build

def phase_names(cfg: IWDAConfig) -> list[str]:
    """The phases of the variant; ``zero_shot`` with ``init_from`` has none (it evaluates the model)."""
    names = [] if cfg.init_from else ["zs"]
    if cfg.variant in ALIGNED:
        names.append("iwda")
    if cfg.variant in ("self_training", "iwda_self_training"):
        names.append("st")
    return names


def build(cfg: IWDAConfig, ctx: Context) -> State:
    return build_state(cfg, ctx, genre.load_data(cfg, ctx))


def build_state(cfg: IWDAConfig, ctx: Context, data: Data) -> State:
    """Models, optimizers, schedulers, streams and generators of ``cfg`` on ``data``."""
    k = len(GENRES)
    model = genre.classifier(cfg, ctx, data)
    modules: dict[str, nn.Module] = {"model": model}
    optimizers, schedulers = {}, {}
    bpe = len(data.source) // cfg.batch_size
    names = phase_names(cfg)
    if "zs" in names:
        ctx.stream("zs/source", len(data.source), cfg.batch_size)
        optimizers["zs"] = genre.adamw(model, cfg.zs_lr, cfg.weight_decay)
        schedulers["zs"] = warmup_linear(optimizers["zs"], genre.steps(cfg, cfg.zs_epochs, bpe), cfg.warmup_ratio)
    if "iwda" in names:
        steps = genre.steps(cfg, cfg.epochs, bpe)
        ctx.stream("iwda/source", len(data.source), cfg.batch_size)
        ctx.stream("iwda/target", len(data.target), cfg.batch_size)
        critic = WassersteinCritic(model.feature_size, cfg.critic_hidden, k if cfg.cdan else None).to(ctx.device)
        if cfg.variant == "iwda_oracle":
            init = torch.as_tensor(data.target_prior / data.source_prior)
        else:
            init = None
        iw = ImportanceWeights(torch.as_tensor(data.source_prior), init, cfg.iw_ema_rate,
                               trainable=cfg.variant in ESTIMATED).to(ctx.device)
        modules.update(critic=critic, iw=iw)
        optimizers["model"] = genre.adamw(model, cfg.lr, cfg.weight_decay)
        schedulers["model"] = warmup_linear(optimizers["model"], steps, cfg.warmup_ratio)
        optimizers["critic"] = genre.adamw(critic, cfg.critic_lr, cfg.weight_decay)
        if cfg.variant in ESTIMATED:
            optimizers["iw"] = torch.optim.AdamW([iw.delta], lr=cfg.lr_iw, weight_decay=cfg.lambda_iw, fused=True)
            schedulers["iw"] = warmup_linear(optimizers["iw"], steps, 0.0)
    if "st" in names:
        ctx.stream("st/source", len(data.source), cfg.batch_size)
        optimizers["st"] = genre.adamw(model, cfg.st_lr, cfg.weight_decay)
        schedulers["st"] = warmup_linear(optimizers["st"], genre.steps(cfg, cfg.st_epochs, bpe), cfg.warmup_ratio)
        modules["pseudo"] = PseudoLabels(len(data.target)).to(ctx.device)
    generators = {"critic": generator(cfg.seed, "critic"), "st": generator(cfg.seed, "st")}
    parallel = {"model": ctx.wrap(model)}
    if "critic" in modules:
        parallel["critic"] = ctx.wrap(CriticLoss(modules["critic"], cfg.critic_backend))
    return State(modules=modules, optimizers=optimizers, schedulers=schedulers, generators=generators,
                 data=data, parallel=parallel)


class CriticLoss(nn.Module):
    """``(Delta, GP) = critic_gp(...)`` as a module call, so that ``DistributedDataParallel`` sees a
    forward and all-reduces the critic's gradients. The source term is divided by the number of
    source rows (``normalize="n"``); a ``sum_w`` normalisation is applied to the weights beforehand
    over the global batch, so that one process and several agree."""

    def __init__(self, critic: WassersteinCritic, backend: str) -> None:
        super().__init__()
        self.critic, self.backend = critic, backend

    def forward(self, zs, zt, ps, pt, weight, alpha):
        # no finiteness pass over the inputs: a non-finite feature makes the step's classification
        # loss non-finite, which the engine's update check stops on
        return self.critic.critic_gp(zs, zt, ps, pt, weight, alpha=alpha, normalize="n", check_finite=False,
                                     backend=self.backend)


class PseudoLabels(nn.Module):
    """Self-training state: which pool examples are selected and their (fixed) pseudo-labels."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("selected", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("labels", torch.zeros(n, dtype=torch.long))


# ---------------------------------------------------------------------------------------- phases

def _iwda_enter(cfg: IWDAConfig, state: State, ctx: Context) -> dict[str, Any]:
    """IW initialisation (A.2 step 1): QP on the zero-shot model's hard confusion matrix."""
    iw: ImportanceWeights = state.modules["iw"]
    if cfg.variant not in ESTIMATED:
        return {"w": iw.weights.tolist()}
    src = state.data.evals["source_dev"] if cfg.iw_init_data == "dev" else state.data.source
    _, logits_s = genre.predict(state, ctx, src)
    _, logits_t = genre.predict(state, ctx, state.data.target)
    k = logits_s.shape[1]
    C0 = confusion_counts(logits_s.argmax(1), src.labels, k).cpu().numpy()
    t0 = prediction_counts(logits_t.argmax(1), k).cpu().numpy()
    # weights relative to the prior of the data the confusion matrix counts, then to the training source's
    src_prior = src.dataset.priors()
    w_qp = torch.as_tensor(solve_weights_qp(C0, t0, src_prior) * src_prior / state.data.source_prior)
    iw.reset((1 - cfg.lambda_iw_init) * w_qp + cfg.lambda_iw_init)
    return {"w_qp": w_qp.tolist(), "w0": iw.weights.tolist(), **_iw_quality(state)}


def _ramp(t: int, total: int, ratio: float) -> float:
    return 1.0 if ratio == 0 else min(1.0, t / (ratio * total))


def _iwda_step(cfg: IWDAConfig, steps: int, state: State, ctx: Context) -> dict[str, float]:
    """One step: simultaneous updates, or ``n_critic`` critic-only steps (each on fresh batches) then a
    feature step with the critic fixed (App. A.2)."""
    if cfg.lambda_da == 0:  # nothing reaches the features from a critic: train none (a source-only control)
        return _alignment_step(cfg, steps, state, ctx, ("model",))
    if cfg.n_critic == 1:
        return _alignment_step(cfg, steps, state, ctx, ("model", "critic"))
    critic = [_alignment_step(cfg, steps, state, ctx, ("critic",))["w1"] for _ in range(cfg.n_critic)]
    return _alignment_step(cfg, steps, state, ctx, ("model",)) | {"critic_steps_w1": sum(critic) / len(critic)}


def _alignment_step(cfg: IWDAConfig, steps: int, state: State, ctx: Context, update: tuple[str, ...]
                    ) -> dict[str, float]:
    """Losses on one source + one target batch and an update of the modules named in ``update``
    (the weights w follow the model)."""
    data, iw = state.data, state.modules["iw"]
    i_s, i_t = state.streams["iwda/source"].next(), state.streams["iwda/target"].next()
    parts = [(data.source.inputs, i_s), (data.target.inputs, i_t)]
    features = "model" in update
    if features:
        z, logits = genre.forward(state, parts)
    else:  # critic-only step: the features are constants (no DistributedDataParallel forward of the model)
        with torch.no_grad():
            model = state.modules["model"]
            z, logits = model(model.collate(parts))
    n = i_s.numel()
    y_s = data.source.labels[i_s]
    p = torch.softmax(logits.detach(), 1)
    t = state.phase_step
    estimating = features and "iw" in state.optimizers
    if estimating:  # EMA statistics from this step's hard predictions (A.2 step 2c), summed over processes
        pred, k = p.argmax(1), p.shape[1]
        counts = torch.cat([confusion_counts(pred[:n], y_s, k).flatten(), prediction_counts(pred[n:], k)])
        ctx.dist.all_reduce_sum(counts)
        iw.update_statistics(counts[: k * k].reshape(k, k), counts[k * k:])
    a_t = _ramp(t, steps, cfg.iw_warmup_ratio)
    weight = (a_t * iw.weights.detach() + (1 - a_t))[y_s].to(z.dtype)
    if cfg.critic_normalize == "sum_w":  # divide by sum(w) over the global batch (CriticLoss divides by n)
        weight = weight * (cfg.batch_size / ctx.dist.all_reduce_sum(weight.sum().reshape(1)))
    lam_t = cfg.lambda_da * _ramp(t, steps, cfg.da_warmup_ratio)
    s = cfg.lambda_da if cfg.critic_scale == "lambda_da" else 1.0
    loss, values = torch.zeros((), device=z.device), {}
    if cfg.lambda_da > 0:
        # the features receive lambda_t dDelta/dz through the reversal; the critic ascends s Delta - mu GP
        zc = grad_reverse(z, lam_t / s) if features and s > 0 else z.detach()
        alpha = ctx.share(torch.rand(cfg.batch_size, generator=state.generators["critic"])).to(z)
        ps, pt = (p[:n], p[n:]) if cfg.cdan else (None, None)
        w1, gp = state.parallel["critic"](zc[:n], zc[n:], ps, pt, weight, alpha)
        loss = -(s * w1 - cfg.lambda_gp * gp)
        values = {"w1": w1.item(), "gp": gp.item()}
    if features:
        loss_cls = F.cross_entropy(logits[:n], y_s)
        loss = loss + loss_cls
        values = {"loss": loss_cls.item(), **values, "lambda": lam_t}
    names = list(update)
    if estimating:
        loss_iw = iw.loss()
        loss = loss + loss_iw
        names.append("iw")
        values["iw_loss"] = loss_iw.item()
    ctx.update(loss, names, values)
    if estimating:
        iw.project_(cfg.iw_projection)
    return values


def _st_select(cfg: IWDAConfig, state: State, ctx: Context) -> int:
    """One self-training round: add the most confident unselected pool examples, class-balanced."""
    pseudo: PseudoLabels = state.modules["pseudo"]
    _, logits = genre.predict(state, ctx, state.data.target)
    conf, pred = torch.softmax(logits, 1).max(1)
    k = logits.shape[1]
    per_class = max(1, int(cfg.st_fraction * len(state.data.target) / k + 0.5))
    for c in range(k):
        candidates = ((pred == c) & ~pseudo.selected).nonzero().flatten()
        top = candidates[conf[candidates].argsort(descending=True)[:per_class]]
        pseudo.selected[top] = True
        pseudo.labels[top] = c
    return int(pseudo.selected.sum())


def _st_step(cfg: IWDAConfig, steps: int, state: State, ctx: Context) -> dict[str, float]:
    per_round = math.ceil(steps / cfg.st_iterations)
    if state.phase_step % per_round == 0:
        _st_select(cfg, state, ctx)
    data, pseudo = state.data, state.modules["pseudo"]
    chosen = pseudo.selected.nonzero().flatten()
    i_p = chosen[ctx.share(torch.randint(len(chosen), (cfg.batch_size,), generator=state.generators["st"]))
                 .to(chosen.device)]
    i_s = state.streams["st/source"].next()
    _, logits = genre.forward(state, [(data.source.inputs, i_s), (data.target.inputs, i_p)])
    n = i_s.numel()
    loss_src = F.cross_entropy(logits[:n], data.source.labels[i_s])
    loss_pseudo = F.cross_entropy(logits[n:], pseudo.labels[i_p])
    ctx.update(loss_src + loss_pseudo, ["st"])
    return {"loss": loss_src.item(), "pseudo_loss": loss_pseudo.item(), "selected": float(len(chosen))}


def phases(cfg: IWDAConfig, state: State) -> list[Phase]:
    bpe = len(state.data.source) // cfg.batch_size
    out = []
    for name in phase_names(cfg):
        if name == "zs":
            out.append(Phase("zs", genre.steps(cfg, cfg.zs_epochs, bpe), genre.zs_step))
        elif name == "iwda":
            steps = genre.steps(cfg, cfg.epochs, bpe)
            out.append(Phase("iwda", steps, lambda s, c, n=steps: _iwda_step(cfg, n, s, c),
                             enter=lambda s, c: _iwda_enter(cfg, s, c)))
        else:
            steps = genre.steps(cfg, cfg.st_epochs, bpe)
            out.append(Phase("st", steps, lambda s, c, n=steps: _st_step(cfg, n, s, c)))
    return out


# -------------------------------------------------------------------------------------- evaluate

def _iw_quality(state: State) -> dict[str, Any]:
    """The weights, the implied target prior and how well it matches the pool's true prior."""
    if "iw" not in state.modules or state.phase == "zs":  # the weights exist from the IWDA stage on
        return {}
    iw: ImportanceWeights = state.modules["iw"]
    est = iw.target_prior.cpu().numpy()
    true = state.data.target.dataset.priors()
    shift = metrics.total_variation(true, state.data.source_prior)
    pct = metrics.prior_correction(true, state.data.source_prior, est) if shift >= MIN_SHIFT else None
    return {"w": iw.weights.tolist(), "target_prior_est": est.tolist(), "tv_est": metrics.total_variation(true, est),
            "tv_shift": shift, "correction_pct": pct}


def evaluate(state: State, ctx: Context) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1 over the classes present, and for the target sets the conditional feature
    shift to the source dev set (seed 000 Eqs. 1-2; also relative to the mean L1 norm of the source
    class means, which a mere rescaling of the features does not change) and the TV prior shift."""
    out: dict[str, dict[str, Any]] = {}
    feats = {}
    for name, domain in state.data.evals.items():
        z, logits = genre.predict(state, ctx, domain)
        y = domain.labels.cpu()
        pred = logits.argmax(1).cpu()
        feats[name] = (z.cpu(), y)
        out[name] = {"accuracy": metrics.accuracy(y, pred),
                     "macro_f1": metrics.macro_f1(y, pred, labels=np.unique(y.numpy())),
                     "tv_shift": metrics.total_variation(domain.dataset.priors(), state.data.source_prior)}
    zs_, ys_ = feats["source_dev"]
    scale = float(np.mean([zs_[ys_ == c].mean(0).abs().sum() for c in ys_.unique()]))
    for name in ("target_dev", "target_test"):
        shift = metrics.conditional_feature_shift(zs_, ys_, *feats[name])
        out[name].update(feature_shift=shift, feature_shift_rel=shift / scale)
    quality = _iw_quality(state)
    if quality:
        out["iw"] = quality
    return out


def summary(state: State, ctx: Context) -> dict[str, Any]:
    return {"source_prior": state.data.source_prior.tolist(), "target_prior": state.data.target_prior.tolist(),
            "pool_prior": state.data.target.dataset.priors().tolist(), **_iw_quality(state)}


Config = IWDAConfig


def train(cfg: IWDAConfig, resume: bool = False, stop_after: int | None = None):
    """Train one IWDA config in ``cfg.output_dir``; returns its :class:`xlt_fast.training.Result`."""
    import sys

    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)
