"""A training step of each trainer through the library's ops against the same step written the
usual way, at the trainers' experiment shapes (ARCHITECTURE section 3, last row).

IWDA: one simultaneous step of ``xlt_fast.trainers.iwda`` (features g, classifier h, CDAN critic
with zero-centred gradient penalty, importance weights: forward, one backward, three fused AdamW
updates, projection) on frozen-feature batches of 32 + 32, d = 384, 8 classes. The usual way is the
same step with ``critic_backend="reference"``: the CDAN input ``p (x) z`` materialised and the
penalty's gradient by ``torch.autograd.grad(create_graph=True)`` and a double backward, as the IWDA
authors' code does. Rows: the quick experiment's critic width (384) and the paper's (2048). Every
implementation has its own copy of one state, restored before every call (each call is the same
step); the max error is that of the step's losses and gradients (of g, h and the critic) against
the same step in float64 (reference backend).

WordOT: one stage-1 step of ``xlt_fast.trainers.wordot`` (``_align_step``: for each of K = 3
language pairs, the trainable top layer run on a batch of 24 target and 24 source sentences, the
initial model's states of the source ones (computed once before, as the trainer does), last-subword
word vectors, the debiased Sinkhorn divergence
of the pooled word clouds (``scope="batch"``, the paper's) plus the English regulariser, one
backward, one Adam step), grad_accum 1. Synthetic and self-contained (no e5 weights, no corpus):
an e5-small-shaped BERT layer (hidden 384, 12 heads, intermediate 1536; random init, seed 0; its
output LayerNorm scaled by 0.36 so word vectors have e5-small's last-layer norms, ~7) over random
cached states of 72 sentences per language, T ~ U[20, 50] tokens, words of 1..3 subwords covering
every token but the first and last (specials); the states share a direction, a component per verse
(shared by its translations) and target tokens lie near a source token of their verse. The usual
way is the same step with ``ot_backend="geomloss"`` (GeomLoss ``SamplesLoss`` tensorized, the
baseline); ours ``ot_backend="cpu"``; the truth ``ot_backend="cpu"`` in float64 (the pure-PyTorch
reference materialises (N, M, d) differences: ~1 GB per pooled problem). Every call is the same
first step: parameters, Adam state and stream positions are restored (a few ms) and dropout seeded
before it. The max error is that of the step's loss, divergence and regulariser and of the top
layer's gradients. The full grid adds ``scope="pair"`` (one divergence per sentence pair).
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import torch

from xlt_fast.benchmarks.common import kernel_backends
from xlt_fast.benchmarks.harness import Case
from xlt_fast.data.core import ClassificationDataset
from xlt_fast.models.tokens import EncoderTop, TokenSentences, frozen_copy
from xlt_fast.trainers import iwda, wca, wordot
from xlt_fast.training import Context, Dist, State, replace

N_SOURCE, N_TARGET, D, K, BATCH = 2400, 1000, 384, 8, 32


def _data(dtype: torch.dtype) -> iwda.Data:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (N_SOURCE + N_TARGET,), generator=g)
    x = torch.randn(N_SOURCE + N_TARGET, D, generator=g, dtype=torch.float64).to(dtype) + labels[:, None] * 0.05

    def domain(name, rows):
        ds = ClassificationDataset(["-"] * len(rows), labels[rows].tolist(), [str(c) for c in range(K)])
        return iwda.Domain(name, ds, x[rows], labels[rows])
    source, target = domain("source", torch.arange(N_SOURCE)), domain("target", torch.arange(N_SOURCE, N_SOURCE + N_TARGET))
    prior = source.dataset.priors()
    return iwda.Data(source, target, {}, prior, prior)


def iwda_step(critic_hidden: int, backend: str, dtype: torch.dtype = torch.float32):
    """A zero-argument IWDA step from its own copy of one state (restored at every call); returns
    the step's losses and the gradients of g, h and the critic."""
    cfg = replace(iwda.IWDAConfig(), variant="iwda", batch_size=BATCH, critic_hidden=critic_hidden, lambda_da=0.5,
                  critic_scale="one", critic_backend=backend, output_dir=tempfile.mkdtemp(), progress=False)
    ctx = Context(cfg, Dist("cpu"), Path(cfg.output_dir))
    torch.manual_seed(0)
    state = iwda.build_state(cfg, ctx, _data(torch.float64))
    state.streams.update(ctx.streams)
    for module in state.modules.values():
        if module is not state.modules["iw"]:
            module.to(dtype)
    state.data = _data(dtype)
    ctx.state = state
    steps = iwda._steps(cfg, cfg.epochs, N_SOURCE // BATCH)
    state.phase_step = steps // 2  # past the ramps: full alignment strength and estimated weights

    restore = _restorer(state)

    def run():
        restore()
        values = iwda._alignment_step(cfg, steps, state, ctx, ("model", "critic"))
        grads = [p.grad.clone() for name in ("model", "critic") for p in state.modules[name].parameters()]
        return (torch.tensor([values["loss"], values["w1"], values["gp"], values["iw_loss"]], dtype=torch.float64),
                *grads)
    return run


WO_LANGS, WO_BATCH, WO_D = ("de", "fr", "es"), 24, 384
WO_SENTENCES = 3 * WO_BATCH  # per language: three batches per epoch of the stream


def _wordot_sentences(g: torch.Generator) -> tuple[dict[str, TokenSentences], TokenSentences]:
    """Random cached token states (layer L - 1 outputs: LayerNorm-scaled, norm ~sqrt(d)) of the target
    sentences of every language and of the shared source sentences, verse i parallel in all of them."""
    def unit(*shape):  # random directions of norm ~1
        return torch.randn(*shape, WO_D, generator=g, dtype=torch.float64) / WO_D ** 0.5

    def sentence(common, verse, tokens):
        T = int(torch.randint(20, 51, (1,), generator=g))
        spans, pos = [], 1
        while pos < T - 1:  # words of 1..3 subwords over every token but the specials
            n = 1 + int(torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), 1, generator=g))
            spans.append((pos, min(pos + n, T - 1)))
            pos = spans[-1][1]
        own = unit(T)
        tok = own if tokens is None else 0.8 * tokens[torch.randint(0, tokens.shape[0], (T,), generator=g)] + 0.6 * own
        states = WO_D ** 0.5 * (0.8 * common + 0.3 * verse + 0.5 * tok)
        return [f"w{j}" for j in range(len(spans))], states.float(), spans, tok

    common, verses = unit(), unit(WO_SENTENCES)
    src_rows = [sentence(common, verses[i], None) for i in range(WO_SENTENCES)]
    src = TokenSentences([r[0] for r in src_rows], [r[1] for r in src_rows], [r[2] for r in src_rows])
    tgt = {}
    for lang in WO_LANGS:
        shifted = common + 0.15 * unit()  # the language's own offset
        rows = [sentence(shifted, verses[i], src_rows[i][3]) for i in range(WO_SENTENCES)]
        tgt[lang] = TokenSentences([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return tgt, src


def _e5_layer() -> torch.nn.Module:
    """A one-layer BERT of e5-small's width (random init, seed 0); only its layer is used."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=WO_D, num_attention_heads=12, intermediate_size=1536,
                                 num_hidden_layers=1, vocab_size=8, max_position_embeddings=64))
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.mul_(0.36)  # e5-small's last-layer norms (~7)
    return model


def _restorer(state: State):
    """A function that puts the state back where it is now (the engine's checkpoint payload:
    modules, optimizers, schedulers, generators; and the streams' positions) and seeds dropout:
    every timed call is the same first step, so a check against the reference never depends on
    how often either ran before."""
    saved = copy.deepcopy(state.payload(with_optimizers=True))
    positions = {name: stream.position for name, stream in state.streams.items()}

    def restore() -> None:
        state.load_payload(saved, with_optimizers=True)
        for name, stream in state.streams.items():
            stream.position = positions[name]
        torch.manual_seed(1)  # the same dropout masks in every implementation's step
    return restore


def wordot_step(backend: str, dtype: torch.dtype = torch.float32, scope: str = "batch"):
    """A zero-argument WordOT stage-1 step from one fixed initial state (restored at every call);
    returns the step's loss, divergence and regulariser and the top layer's gradients."""
    cfg = dataclasses.replace(  # no validate(): its check() looks for the Bible corpus, unused here
        wordot.WordOTConfig(), target_lang=list(WO_LANGS), batch_size=WO_BATCH, grad_accum=1, scope=scope,
        ot_backend=backend, trainable_layers=1, output_dir=tempfile.mkdtemp(), progress=False)
    ctx = Context(cfg, Dist("cpu"), Path(cfg.output_dir))
    as_dtype = lambda ts: TokenSentences(ts.words, [t.to(dtype) for t in ts.states], ts.spans)  # noqa: E731
    tgt, src = _wordot_sentences(torch.Generator().manual_seed(3))
    tgt, src = {lang: as_dtype(ts) for lang, ts in tgt.items()}, as_dtype(src)
    top = EncoderTop(_e5_layer(), cfg.trainable_layers).to(dtype)
    c0 = wordot.initial_states(frozen_copy(top), src, "cpu")  # Eq. 2's c_0, once per sentence (as build does)
    optimizer = torch.optim.Adam(top.parameters(), lr=cfg.lr)
    for lang in WO_LANGS:
        ctx.stream(f"align/{lang}", WO_SENTENCES, cfg.batch_size)
    data = wordot.Data(align={lang: wordot.PairSet(lang, tgt[lang], src, src_initial=c0) for lang in WO_LANGS}, evals={},
                       eval_labels=torch.zeros(0, dtype=torch.long), task=src,
                       task_labels=torch.zeros(WO_SENTENCES, dtype=torch.long), lexicons={})
    state = State(modules={"top": top}, optimizers={"align": optimizer}, data=data,
                  parallel={"top": ctx.wrap(top)}, phase="align")
    state.streams.update(ctx.streams)
    ctx.state = state
    params = list(top.parameters())
    restore = _restorer(state)

    def run():
        restore()
        values = wordot._align_step(cfg, state, ctx)
        return (*(torch.tensor(values[k], dtype=torch.float64) for k in ("loss", "divergence", "reg")),
                *(p.grad.clone() for p in params))
    return run


WCA_BATCH, WCA_LAYERS = 32, (9, 10, 11, 12)


def wca_step(variant: str, backend: str = "cpu", dtype: torch.dtype = torch.float32):
    """A zero-argument WCA step (``wca.train_step``: 32 labelled sentences and 32 sentence pairs
    through the trainable top layer in one forward, genre cross entropy on the mean-pooled states,
    Eq. 3 on layers 9-12 (9-11 cached, 12 trained), one backward, one AdamW step) from one fixed
    initial state, restored at every call; returns the loss, its two terms and the top layer's
    gradients."""
    cfg = dataclasses.replace(  # no validate(): its check() looks for the Bible corpus, unused here
        wca.WCAConfig(), variant=variant, target_lang=["de"], batch_size=WCA_BATCH, pair_batch_size=WCA_BATCH,
        trainable_layers=1, layers=list(WCA_LAYERS), ot_backend=backend, output_dir=tempfile.mkdtemp(), progress=False)
    ctx = Context(cfg, Dist("cpu"), Path(cfg.output_dir))
    g = torch.Generator().manual_seed(3)
    tgt, src = _wordot_sentences(g)
    as_dtype = lambda ts: TokenSentences(ts.words, [t.to(dtype) for t in ts.states], ts.spans)  # noqa: E731

    def stack(ts):  # the cached layers 9-11: the input states moved a little per layer
        fixed = {layer: TokenSentences(ts.words, [t + 0.3 * torch.randn(t.shape, generator=g) for t in ts.states],
                                       ts.spans) for layer in WCA_LAYERS[:-1]}
        return wca.Stack(as_dtype(ts), {layer: as_dtype(f) for layer, f in fixed.items()})
    labels = torch.randint(0, 8, (WO_SENTENCES,), generator=g)
    data = wca.Data(task=as_dtype(src), labels=labels, tag_names=[str(c) for c in range(8)],
                    pairs={"de": wca.PairSet("de", stack(src), stack(tgt["de"]))}, evals={}, eval_pairs={},
                    first_trained=WCA_LAYERS[-1])
    top = EncoderTop(_e5_layer(), cfg.trainable_layers).to(dtype)
    torch.manual_seed(0)
    head = torch.nn.Linear(WO_D, 8).to(dtype)
    optimizer = torch.optim.AdamW([{"params": top.parameters(), "lr": cfg.lr},
                                   {"params": head.parameters(), "lr": cfg.head_lr}])
    ctx.stream("task", WO_SENTENCES, cfg.batch_size)
    ctx.stream("pairs/de", WO_SENTENCES, cfg.pair_batch_size)
    state = State(modules={"top": top, "head": head}, optimizers={"train": optimizer}, data=data,
                  parallel={"top": ctx.wrap(top), "head": ctx.wrap(head)}, phase="train")
    state.streams.update(ctx.streams)
    ctx.state = state
    params = list(top.parameters()) + list(head.parameters())
    restore = _restorer(state)

    def run():
        restore()
        values = wca.train_step(cfg, state, ctx)
        return (*(torch.tensor(values.get(k, 0.0), dtype=torch.float64) for k in ("loss", "task", "align")),
                *(p.grad.clone() for p in params))
    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []  # the trainers' experiments run their frozen-feature grids on the CPU
    out = []
    for hidden in (384, 2048):
        impls = {"reference": iwda_step(hidden, "reference", torch.float64),
                 "eager double backward": iwda_step(hidden, "reference")}
        for name in kernel_backends(device, "cpu"):
            impls[f"xlt_fast {name}"] = iwda_step(hidden, name)
        out.append(Case("iwda step", f"B=32+32,d=384x{K},H={hidden}", "step", impls,
                        baseline="eager double backward"))
    try:
        import geomloss  # noqa: F401
    except ImportError:  # pragma: no cover - optional peer
        geomloss = None
    for scope in ("batch",) if quick else ("batch", "pair"):
        impls = {"reference": wordot_step("cpu", torch.float64, scope)}
        if geomloss is not None:
            impls["geomloss tensorized"] = wordot_step("geomloss", scope=scope)
        for name in kernel_backends(device, "cpu"):
            impls[f"xlt_fast {name}"] = wordot_step(name, scope=scope)
        out.append(Case("wordot step", f"{scope} B={WO_BATCH}x{len(WO_LANGS)},T<=50,d={WO_D}", "step", impls,
                        baseline="geomloss tensorized" if geomloss is not None else "reference"))
    # the alignment's cost: the same step without it is the baseline (its ratio < 1 is the overhead)
    impls = {"reference": wca_step("wca_hard", "reference", torch.float64), "task only": wca_step("task_only")}
    for name in kernel_backends(device, "cpu"):
        impls[f"xlt_fast {name}"] = wca_step("wca_hard", name)
    out.append(Case("wca step", f"B={WCA_BATCH}+{WCA_BATCH} pairs,T<=50,d={WO_D},4 layers", "step", impls,
                    baseline="task only"))
    return out
