"""The Bible genre task as the IWDA and CoNLST trainers share it (spec ``shared/specs/iwda_conlst.md``
C.1): the config fields of its data, model and zero-shot stage, the data (labelled source verses,
an unlabelled target pool, dev and test sets), the classifier, and the zero-shot stage itself
(cross-entropy on the source), which both methods start from.

Data: the source is the labelled source-language verses of ``source_split`` (default the train
half A); the target pool, the unlabelled target-language verses of ``target_split`` (half B, so no
source verse has its translation in the pool) drawn with the target priors; the target dev and test
sets are drawn from the dev and test splits with the same priors. ``mode="frozen"`` trains g (a
residual MLP) and h on cached encoder features; ``mode="finetune"`` fine-tunes the encoder's top
``trainable_layers`` (g = encoder + pooling). Dev sets are for choices, test sets for reporting only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xlt_fast.data import GENRES, load_genre_task, resolve_priors, subsample_with_priors
from xlt_fast.data.core import ClassificationDataset
from xlt_fast.models import EncoderClassifier, load_encoder
from xlt_fast.nn import FeatureClassifier
from xlt_fast.training import Context, State, TrainerConfig, arg, default_cache
from xlt_fast.training.checkpoint import latest
from xlt_fast.training.config import ConfigError


@dataclasses.dataclass
class GenreConfig(TrainerConfig):
    """Data, model and zero-shot fields of the genre task (defaults: IWDA's, [paper] = seed 000)."""

    target_lang: str = arg("ko", "target language (Bible corpus code)")
    # data (spec C.1)
    target_priors: list[str] = arg(["source"], "target class priors: source | peaked:<class>:<t> | "
                                   "dirichlet:<alpha>:<seed> | 8 numbers (xlt_fast.data.priors)")
    n_target: int = arg(2000, "size of the unlabelled target pool, drawn with the target priors", ge=8)
    n_test: int = arg(600, "size of the target test set (target priors); reporting only", ge=8)
    n_dev: int = arg(600, "size of the target dev set (target priors); for choices", ge=8)
    n_source: int = arg(0, "source examples drawn (natural prior) from source_split; 0 = all", ge=0)
    n_source_eval: int = arg(1000, "source dev examples for monitoring and the feature shift (Eq. 1)", ge=8)
    source_split: Literal["train_a", "train_b"] = arg("train_a", "half of the train chapters for the labelled source")
    target_split: Literal["train_a", "train_b"] = arg("train_b", "the other half, for the unlabelled target pool "
                                                      "(no translation of a source verse in the pool; spec C.1)")
    data_seed: int = arg(0, "seed of the source subsamples (separate from seed, so seeds share data)", ge=0)
    target_seed: int = arg(0, "seed of the target pool, dev and test subsamples", ge=0)
    # model
    mode: Literal["frozen", "finetune"] = arg("frozen", "frozen: MLP g on cached encoder features; "
                                              "finetune: fine-tune the encoder's top layers")
    feature_layer: int = arg(12, "frozen mode: encoder layer of the cached features (0 = embeddings)", ge=0)
    pooling: Literal["mean", "cls", "pooler"] = arg(
        "mean", "sentence pooling: mean (e5), cls (first token) or pooler (finetune: the encoder's tanh pooler, "
        "what the authors' code uses for mBERT)")
    prefix: str = arg("query: ", "text prefix (e5 expects 'query: ')")
    max_length: int = arg(128, "max tokens per text", ge=8)
    hidden: int = arg(384, "frozen mode: width of g's hidden layer (spec C.1)", ge=1)
    dropout: float = arg(0.1, "dropout in g (frozen) or before h (finetune): the view noise of CoNLST", ge=0, lt=1)
    trainable_layers: int = arg(12, "finetune mode: top encoder layers trained (embeddings always frozen)", ge=0)
    # optimisation shared by the phases ([paper] C.2: AdamW, weight decay 0.01, warm-up 10% + linear)
    batch_size: int = arg(8, "examples per domain per step ([paper] C.2: 8 + 8)", ge=1)
    weight_decay: float = arg(0.01, "AdamW weight decay of g, h and the critic ([paper] C.2)", ge=0)
    warmup_ratio: float = arg(0.1, "linear warm-up fraction of each phase's lr ([paper] C.2)", ge=0, le=1)
    # zero-shot stage
    zs_epochs: float = arg(4.0, "zero-shot epochs over the source ([paper] Sec. 4: 4)", gt=0)
    zs_lr: float = arg(1e-3, "zero-shot lr (frozen features; [paper] C.2: 1e-5 for full fine-tuning)", gt=0)
    init_from: str = arg("", "run directory of a finished zero_shot run with the same zero-shot settings: "
                         "start from its model and skip the zero-shot stage (zero_shot: only evaluate it)")

    def check(self) -> list[str]:
        problems = super().check()
        try:
            from xlt_fast.data import languages

            langs = languages()
            for name in ("source_lang", "target_lang"):
                if getattr(self, name) not in langs:
                    problems.append(f"{name}: no Bible translation for {getattr(self, name)!r}; available: {langs}")
        except (ImportError, FileNotFoundError) as exc:
            problems.append(f"source_lang/target_lang: the Bible corpus is missing ({exc})")
        try:
            resolve_priors(self.target_priors, np.full(len(GENRES), 1 / len(GENRES)), GENRES)
        except ValueError as exc:
            problems.append(f"target_priors: {exc}")
        if self.source_split == self.target_split:
            problems.append("target_split: must differ from source_split (disjoint halves, spec C.1)")
        for name in ("n_target", "n_source"):
            if 0 < getattr(self, name) < self.batch_size:
                problems.append(f"{name}: must be >= batch_size ({self.batch_size}), got {getattr(self, name)}")
        if self.pooling == "pooler" and self.mode == "frozen":
            problems.append("pooling: 'pooler' needs mode='finetune' (the cached features are mean or cls pooled)")
        return problems


# ------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Domain:
    """Model inputs (feature rows or texts) of a dataset, its labels (on the device) and prior."""

    name: str
    dataset: ClassificationDataset
    inputs: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.dataset)


@dataclasses.dataclass
class Data:
    source: Domain
    target: Domain          # the unlabelled pool: its labels are used for reporting only
    evals: dict[str, Domain]
    source_prior: np.ndarray
    target_prior: np.ndarray


def _subsample(cfg: GenreConfig, dataset: ClassificationDataset, priors: np.ndarray, n: int, seed: int,
               field: str) -> ClassificationDataset:
    try:
        return subsample_with_priors(dataset, priors, n, seed)[0]
    except ValueError as exc:
        raise ConfigError(type(cfg).__name__, [f"{field}: {exc}"]) from None


def datasets(cfg: GenreConfig) -> dict[str, ClassificationDataset]:
    """The source, target pool and evaluation sets of the config (spec C.1)."""
    source = load_genre_task(cfg.source_lang, cfg.source_split)
    if cfg.n_source:
        source = _subsample(cfg, source, source.priors(), cfg.n_source, cfg.data_seed, "n_source")
    prior = resolve_priors(cfg.target_priors, source.priors(), GENRES)
    tgt = cfg.target_lang
    source_dev = load_genre_task(cfg.source_lang, "dev")
    return {"source": source,
            "target": _subsample(cfg, load_genre_task(tgt, cfg.target_split), prior, cfg.n_target,
                                 cfg.target_seed + 1, "n_target/target_priors"),
            "source_dev": _subsample(cfg, source_dev, source_dev.priors(), min(cfg.n_source_eval, len(source_dev)),
                                     cfg.data_seed + 4, "n_source_eval"),
            "target_dev": _subsample(cfg, load_genre_task(tgt, "dev"), prior, cfg.n_dev, cfg.target_seed + 3,
                                     "n_dev/target_priors"),
            "target_test": _subsample(cfg, load_genre_task(tgt, "test"), prior, cfg.n_test, cfg.target_seed + 2,
                                      "n_test/target_priors")}


def features(cfg: GenreConfig, ctx: Context, texts: list[str]) -> torch.Tensor:
    """Cached encoder features of ``texts`` at ``cfg.feature_layer`` on the run's device (rank 0 encodes first)."""
    with ctx.dist.main_first():
        return default_cache().get(texts, encoder=cfg.encoder, layers=(cfg.feature_layer,), pooling=cfg.pooling,
                                   prefix=cfg.prefix, max_length=cfg.max_length, device=ctx.device,
                                   progress=cfg.progress and ctx.dist.is_main)[cfg.feature_layer].to(ctx.device)


def load_data(cfg: GenreConfig, ctx: Context) -> Data:
    sets = datasets(cfg)
    if cfg.mode == "frozen":
        feats = features(cfg, ctx, [t for ds in sets.values() for t in ds.texts])
        rows = np.cumsum([0] + [len(ds) for ds in sets.values()])
        inputs = {name: feats[a:b] for name, a, b in zip(sets, rows[:-1], rows[1:])}
    else:
        inputs = {name: ds.texts for name, ds in sets.items()}
    domains = {name: Domain(name, ds, inputs[name], torch.tensor(ds.labels, device=ctx.device))
               for name, ds in sets.items()}
    return Data(domains["source"], domains["target"],
                {k: domains[k] for k in ("source_dev", "target_dev", "target_test")},
                sets["source"].priors(), resolve_priors(cfg.target_priors, sets["source"].priors(), GENRES))


# ------------------------------------------------------------------------------------------ model

ZS_FIELDS = ("source_lang", "seed", "encoder", "device", "max_steps", "n_source", "source_split", "data_seed", "mode",
             "feature_layer", "pooling", "prefix", "max_length", "hidden", "dropout", "trainable_layers",
             "batch_size", "weight_decay", "warmup_ratio", "zs_epochs", "zs_lr")
MODEL_FIELDS = ("encoder", "mode", "feature_layer", "pooling", "prefix", "max_length", "hidden", "trainable_layers")
GENRE_TRAINERS = ("IWDAConfig", "CoNLSTConfig")


def classifier(cfg: GenreConfig, ctx: Context, data: Data, any_run: bool = False) -> nn.Module:
    """g and h: a residual MLP on frozen features, or the encoder's top layers (``mode``); loaded from
    ``init_from`` when given (:func:`init_from`)."""
    k = len(GENRES)
    if cfg.mode == "frozen":
        model = FeatureClassifier(data.source.inputs.shape[1], k, cfg.hidden, cfg.dropout)
    else:
        model = EncoderClassifier(load_encoder(cfg.encoder, device=ctx.device, progress=False), k, cfg.pooling,
                                  cfg.trainable_layers, cfg.dropout, cfg.prefix, cfg.max_length)
    model = model.to(ctx.device)
    if cfg.init_from:
        init_from(cfg, model, any_run)
    return model


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on the trainable parameters of ``module``, weight decay on all but biases and LayerNorm
    weights (as the IWDA authors' code), with the fused kernel (3-4x faster than the default on CPU)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    plain = [p for n, p in named if "bias" in n or "LayerNorm.weight" in n]
    decayed = [p for n, p in named if not ("bias" in n or "LayerNorm.weight" in n)]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def steps(cfg: GenreConfig, epochs: float, batches_per_epoch: int) -> int:
    """``ceil(epochs * batches_per_epoch)`` (at least 1), capped by ``max_steps``."""
    n = max(1, math.ceil(epochs * batches_per_epoch))
    return min(n, cfg.max_steps) if cfg.max_steps else n


def init_from(cfg: GenreConfig, model: nn.Module, any_run: bool = False) -> None:
    """Load the model of the finished run ``cfg.init_from``. Strict (default): a zero_shot run of the
    same trainer with the same :data:`ZS_FIELDS`, so that continuing from it equals one run of all
    phases. ``any_run``: any finished genre-task run (IWDA or CoNLST, any variant) whose model has
    the same :data:`MODEL_FIELDS` (a post-training step on top of another method's model)."""
    run = Path(cfg.init_from)
    name = type(cfg).__name__
    saved = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else None
    found = latest(run / "checkpoints")
    if saved is None or found is None or not (run / "results.json").is_file():
        raise ConfigError(name, [f"init_from: {run} is not a finished run with a checkpoint (keep_checkpoints >= 1)"])
    fields = saved["config"]
    differ = [f for f in (MODEL_FIELDS if any_run else ZS_FIELDS) if fields.get(f) != getattr(cfg, f)]
    if any_run:
        wrong = saved.get("trainer") not in GENRE_TRAINERS
    else:
        wrong = saved.get("trainer") != name or fields.get("variant") != "zero_shot"
    if wrong or differ:
        what = f"a run of {', '.join(GENRE_TRAINERS)}" if any_run else f"a {name} zero_shot run"
        raise ConfigError(name, [f"init_from: {run} is not {what} with this model's settings "
                                 f"(trainer {saved.get('trainer')!r}, variant {fields.get('variant')!r}; "
                                 f"differing fields: {differ})"])
    payload = torch.load(found / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(payload["modules"]["model"])


# ------------------------------------------------------------------------------------ zero-shot

def forward(state: State, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, logits)`` of the rows ``parts = [(inputs, indices), ...]`` through the wrapped model."""
    model = state.modules["model"]
    return state.parallel["model"](model.collate(parts))


def zs_step(state: State, ctx: Context) -> dict[str, float]:
    """Cross-entropy on a source batch (stream ``zs/source``, optimizer ``zs``)."""
    src = state.data.source
    idx = state.streams["zs/source"].next()
    _, logits = forward(state, [(src.inputs, idx)])
    loss = F.cross_entropy(logits, src.labels[idx])
    ctx.update(loss, ["zs"])
    return {"loss": loss.item()}


@torch.no_grad()
def predict(state: State, ctx: Context, domain: Domain, train_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, logits)`` of every example of ``domain``, sharded across processes; eval mode (no
    dropout) unless ``train_mode`` (one dropout view: the weak view of self-training)."""
    model = state.modules["model"]
    was = model.training
    model.train(train_mode)
    out = ctx.predict(lambda idx: torch.cat(model(model.collate([(domain.inputs, idx)])), dim=1), len(domain))
    model.train(was)
    d = model.feature_size
    return out[:, :d], out[:, d:]
