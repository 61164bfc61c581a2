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

Real-NVP: one alignment step of seed 002 (Zhao & Eger): two 8-coupling Real-NVP flows (d = 384,
conditioners Linear(192, 512) -> ReLU -> Linear(512, 512) -> ReLU -> Linear(512, 384), "half" masks
alternating) sharing Z, ``loss = matching + 1e-4 * NLL`` on 32 or 256 aligned pairs (y a random rotation
of x plus noise), one backward, one RMSprop step (lr 1e-4, torch's defaults otherwise). Ours is
``xlt_fast.nn.FlowPair(..., scale="exp", identity_init=False)`` (random conditioners, so every layer
gets a gradient) with ``FlowPair.both`` and ``matching_loss``; the peer is the same two flows in nflows
(``bench_coupling.nflows_peer``: same weights, its scale hook set to exp, the only scale map nflows
and ours share exactly), the same loss from ``Flow._transform`` forward and ``_transform.inverse`` and
nflows' StandardNormal log-density, and the same RMSprop step. Before the case is returned the peer's
loss terms and gradients are checked against ours (:func:`realnvp_agreement`: fp32 loss terms relative
1e-4, the fp32 gradient vector 1e-3 in norm, every fp64 loss term and gradient element 1e-10).
Each call restores the parameters (one copy, the same in both; the RMSprop state is left running:
it changes no returned value), so every call is the same step; ``python -m benchmarks.bench_trainers``
times the step alone, interleaved, with the restore outside the timed region (:func:`realnvp_timing`).
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import torch

from xlt_fast.benchmarks.common import cpu_busy_s, kernel_backends, quiet_reps
from xlt_fast.benchmarks.harness import Case
from xlt_fast.data.core import ClassificationDataset
from xlt_fast.models.tokens import EncoderTop, TokenSentences, frozen_copy
from xlt_fast.nn import FlowPair, matching_loss
from xlt_fast.nn.embedding_maps import FlowPass
from xlt_fast.trainers import genre, iwda, wca, wordot
from xlt_fast.training import Context, Dist, State, replace

N_SOURCE, N_TARGET, D, K, BATCH = 2400, 1000, 384, 8, 32


def _data(dtype: torch.dtype) -> genre.Data:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (N_SOURCE + N_TARGET,), generator=g)
    x = torch.randn(N_SOURCE + N_TARGET, D, generator=g, dtype=torch.float64).to(dtype) + labels[:, None] * 0.05

    def domain(name, rows):
        ds = ClassificationDataset(["-"] * len(rows), labels[rows].tolist(), [str(c) for c in range(K)])
        return genre.Domain(name, ds, x[rows], labels[rows])
    source, target = domain("source", torch.arange(N_SOURCE)), domain("target", torch.arange(N_SOURCE, N_SOURCE + N_TARGET))
    prior = source.dataset.priors()
    return genre.Data(source, target, {}, prior, prior)


def iwda_step(critic_hidden: int, backend: str, dtype: torch.dtype = torch.float32):
    """A zero-argument IWDA step from its own copy of one state (restored at every call); returns
    the step's losses and the gradients of g, h and the critic."""
    cfg = replace(iwda.IWDAConfig(), variant="iwda", batch_size=BATCH, critic_hidden=critic_hidden, lambda_da=0.5,
                  critic_scale="one", critic_backend=backend, output_dir=tempfile.mkdtemp(), progress=False)
    ctx = Context(cfg, Dist("cpu"), Path(cfg.output_dir))
    torch.manual_seed(0)
    state = iwda.build_state(cfg, ctx, _data(torch.float64))
    for module in state.modules.values():
        if module is not state.modules["iw"]:
            module.to(dtype)
    state.data = _data(dtype)
    ctx.attach(state)
    steps = genre.steps(cfg, cfg.epochs, N_SOURCE // BATCH)
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
    ctx.attach(state)
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
    ctx.attach(state)
    params = list(top.parameters()) + list(head.parameters())
    restore = _restorer(state)

    def run():
        restore()
        values = wca.train_step(cfg, state, ctx)
        return (*(torch.tensor(values.get(k, 0.0), dtype=torch.float64) for k in ("loss", "task", "align")),
                *(p.grad.clone() for p in params))
    return run


RN_D, RN_K, RN_H, RN_LR, RN_NLL = 384, 8, 512, 1e-4, 1e-4
RN_RTOL, RN_GRAD_RTOL, RN_FP64_RTOL = 1e-4, 1e-3, 1e-10  # peer vs ours: see realnvp_agreement


def _realnvp_pair() -> FlowPair:
    """The benchmark's flow pair (seed 0): exp scale map, random conditioners (no identity start)."""
    torch.manual_seed(0)
    return FlowPair(RN_D, n_couplings=RN_K, hidden=RN_H, scale="exp", identity_init=False)


def _realnvp_batch(B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` aligned pairs: x ~ N(0, I), y = x Q + 0.1 noise with Q a random rotation."""
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, RN_D, generator=g)
    q = torch.linalg.qr(torch.randn(RN_D, RN_D, generator=g, dtype=torch.float64))[0].float()
    return x, x @ q + 0.1 * torch.randn(B, RN_D, generator=g)


def _flow_step(params: list[torch.Tensor], loss_fn, grads_fn):
    """A zero-argument step (restore the parameters, zero the gradients, ``loss_fn()``'s first term
    backward, one RMSprop step); returns the loss terms and ``grads_fn()``. ``run.restore`` and
    ``run.step`` are its two halves, for timing the step alone (``run.loss_fn``, ``run.optimizer``:
    its parts, for profiling)."""
    optimizer = torch.optim.RMSprop(params, lr=RN_LR)
    saved = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)

    def step():
        optimizer.zero_grad(set_to_none=True)  # fresh .grad tensors: the returned ones stay valid
        values = loss_fn()
        values[0].backward()
        optimizer.step()
        return (*(v.detach() for v in values), *grads_fn())

    def run():
        restore()
        return step()
    run.restore, run.step, run.loss_fn, run.optimizer = restore, step, loss_fn, optimizer  # for timing its parts
    return run


def _pieces(w3: torch.Tensor, b3: torch.Tensor, m: int, shift_first: bool) -> list[torch.Tensor]:
    """The output layer's gradient as views [log-scale rows, shift rows] of weight and bias
    (ours are laid out [s_raw | t], nflows' [t | s_raw]): every implementation returns one order."""
    if shift_first:
        return [w3[m:], w3[:m], b3[m:], b3[:m]]
    return [w3[:m], w3[m:], b3[:m], b3[m:]]


def realnvp_step(pair: FlowPair, x: torch.Tensor, y: torch.Tensor, backend: str, dtype: torch.dtype = torch.float32):
    """Our step on a copy of ``pair`` (couplings' backend ``backend``); returns (loss, matching, nll)
    and every parameter's gradient (flow X then flow Y, per coupling W1, b1, W2, b2, then the output
    layer's log-scale and shift rows of W3 and b3)."""
    pair = copy.deepcopy(pair).to(dtype)
    for flow in (pair.flow_x, pair.flow_y):
        for c in flow.couplings:
            c.backend = backend
    x, y = x.to(dtype), y.to(dtype)

    def loss():
        out = pair.both(x, y)
        match = matching_loss(out, x, y)
        return match + RN_NLL * out.nll, match, out.nll

    def grads():
        out = []
        for flow in (pair.flow_x, pair.flow_y):
            for c in flow.couplings:
                n = c.net
                out += [n[0].weight.grad, n[0].bias.grad, n[2].weight.grad, n[2].bias.grad,
                        *_pieces(n[4].weight.grad, n[4].bias.grad, c.d_m, False)]
        return out
    return _flow_step(list(pair.parameters()), loss, grads)


def realnvp_nflows_step(pair: FlowPair, x: torch.Tensor, y: torch.Tensor):
    """The same step with both flows in nflows (``bench_coupling.nflows_peer``: the same weights):
    latents and log-dets from ``Flow._transform``, the maps through ``_transform.inverse``, the NLL
    from nflows' base distribution; the same outputs in the same order as :func:`realnvp_step`."""
    from xlt_fast.benchmarks.bench_coupling import nflows_peer

    fx, fy = nflows_peer(pair.flow_x), nflows_peer(pair.flow_y)

    def loss():
        z_x, ld_x = fx._transform(x)
        z_y, ld_y = fy._transform(y)
        y_hat, _ = fy._transform.inverse(z_x)
        x_hat, _ = fx._transform.inverse(z_y)
        nll = -0.5 * ((fx._distribution.log_prob(z_x) + ld_x).mean() + (fy._distribution.log_prob(z_y) + ld_y).mean())
        match = matching_loss(FlowPass(y_hat, x_hat, nll), x, y)
        return match + RN_NLL * nll, match, nll

    def grads():
        out = []
        for flow in (fx, fy):
            for t in flow._transform._transforms:
                n = t.transform_net.seq
                out += [n[0].weight.grad, n[0].bias.grad, n[2].weight.grad, n[2].bias.grad,
                        *_pieces(n[4].weight.grad, n[4].bias.grad, t.num_transform_features, True)]
        return out
    return _flow_step(list(fx.parameters()) + list(fy.parameters()), loss, grads)


def realnvp_agreement(pair: FlowPair, x: torch.Tensor, y: torch.Tensor, backend: str) -> dict[str, float]:
    """One step of nflows and of ours (``backend``) from the same weights and batch, checked twice;
    raises unless both hold, so a timed comparison is always of the same computation.

    fp32 (the timed precision): the loss terms within ``RN_RTOL`` (relative) and the whole gradient
    (all parameters as one vector) within ``RN_GRAD_RTOL`` in norm. Not per element: a ReLU whose
    pre-activation is within fp32 rounding of 0 (|a| ~ 4e-8 at B = 256) can fall on either side in
    two correct fp32 runs and moves one sample's share (~1/B) of a few gradient rows.
    fp64: every loss term and every gradient element within ``RN_FP64_RTOL`` of the tensor's max
    (no such ties at this precision; this is the check that the two compute the same function)."""
    def rel(u, v):
        return float((u.double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-300))

    a, b = realnvp_nflows_step(pair, x, y)(), realnvp_step(pair, x, y, backend)()
    ga, gb = (torch.cat([g.double().flatten() for g in o[3:]]) for o in (a, b))
    errs = {"fp32_loss_terms_rel": max(rel(u, v) for u, v in zip(a[:3], b[:3])),
            "fp32_grad_norm_rel": float((ga - gb).norm() / gb.norm()),
            "fp32_grad_elem_rel_max": max(rel(u, v) for u, v in zip(a[3:], b[3:]))}  # reported, not judged
    pair64, x64, y64 = copy.deepcopy(pair).double(), x.double(), y.double()
    a, b = realnvp_nflows_step(pair64, x64, y64)(), realnvp_step(pair64, x64, y64, backend, torch.float64)()
    errs["fp64_elem_rel_max"] = max(rel(u, v) for u, v in zip(a, b))
    if (errs["fp32_loss_terms_rel"] > RN_RTOL or errs["fp32_grad_norm_rel"] > RN_GRAD_RTOL
            or errs["fp64_elem_rel_max"] > RN_FP64_RTOL):
        raise AssertionError(f"realnvp step: nflows and xlt_fast {backend} differ: {errs}")
    return errs


def realnvp_impls(device: torch.device, B: int) -> dict:
    """The realnvp-step implementations at batch ``B``: the fp64 reference (our autograd path),
    nflows (when installed; checked against ours first) and our kernel backends."""
    pair, (x, y) = _realnvp_pair(), _realnvp_batch(B)
    impls = {"reference": realnvp_step(pair, x, y, "reference", torch.float64)}
    ours = {f"xlt_fast {name}": realnvp_step(pair, x, y, name) for name in kernel_backends(device, "cpu")}
    try:
        impls["nflows"] = realnvp_nflows_step(pair, x, y)
    except ImportError:  # pragma: no cover - optional peer
        pass
    else:
        for name in kernel_backends(device, "cpu"):
            realnvp_agreement(pair, x, y, name)
    impls.update(ours)
    return impls


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
    for B in (32,) if quick else (32, 256):
        impls = realnvp_impls(device, B)
        out.append(Case("realnvp step", f"B={B},d={RN_D},K={RN_K}x2,H={RN_H}", "step", impls,
                        baseline="nflows" if "nflows" in impls else "reference"))
    return out


def realnvp_timing(batches: list[int], reps: int, out: str | None = None, threads: int | None = None,
                   max_wait: float = 0.0) -> dict:
    """The realnvp step of ours and nflows timed side by side in one run: per rep each implementation
    restores its parameters (not timed) and runs one step (forward, backward, RMSprop; wall time,
    torch's default threads unless ``threads``), in turn, so that both see the same machine; each
    step's process CPU time is kept too. Another job on a 2-core machine distorts two-thread wall
    times badly, so every rep also records the CPU time other processes used during it (/proc/stat
    minus ours): a rep is "quiet" when that is under 10 % of its wall time. The two implementations
    take turns going first. With ``max_wait > 0`` reps continue (after a rep that was not quiet,
    waiting for a quiet machine and one untimed step each) until ``reps`` quiet ones or ``max_wait`` s;
    the statistics are over the quiet reps when there are any (both implementations' steps of a rep
    are kept or dropped together), else over all. Prints and returns (and writes to ``out`` as JSON)
    each one's min and median and the ratios nflows / ours (of the mins, of the medians, and the
    median over reps of the ratio of the two steps of a rep)."""
    import datetime
    import importlib.metadata
    import os
    import statistics
    import time

    from xlt_fast.benchmarks.harness import _cpu_model
    from xlt_fast.training import atomic

    if threads:
        torch.set_num_threads(threads)

    result = {"case": "realnvp step", "what": "two 8-coupling Real-NVP flows (d=384, conditioner width 512, "
                                              "scale exp, half masks), loss = matching + 1e-4 * NLL, forward + "
                                              "backward + RMSprop(lr=1e-4); parameters restored before each step "
                                              "(outside the timed region)",
              "environment": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                              "nflows": importlib.metadata.version("nflows")},
              "reps": reps, "max_wait_s": max_wait, "batches": {}}
    for B in batches:
        pair, (x, y) = _realnvp_pair(), _realnvp_batch(B)
        names = [f"xlt_fast {n}" for n in kernel_backends(torch.device("cpu"), "cpu")]
        impls = {"nflows": realnvp_nflows_step(pair, x, y), **{n: realnvp_step(pair, x, y, n[len("xlt_fast "):])
                                                               for n in names}}
        check = {n: realnvp_agreement(pair, x, y, n[len("xlt_fast "):]) for n in names}
        for fn in impls.values():  # warm-up (allocations, the optimizer's state)
            for _ in range(2):
                fn()
        def run_rep(i: int) -> dict:  # {impl: (wall ms, cpu ms)}, others' CPU ms, quiet
            rep, b0, p0 = {}, cpu_busy_s(), time.process_time()
            order = list(impls.items())
            for n, fn in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                fn.restore()
                t0, c0 = time.perf_counter(), time.process_time()
                fn.step()
                rep[n] = ((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3)
            others = (cpu_busy_s() - b0 - (time.process_time() - p0)) * 1e3  # all CPUs' busy time but ours
            wall = sum(w for w, _ in rep.values())
            return {"ms": rep, "others_cpu_ms": round(others, 1), "quiet": others < 0.1 * wall}

        log = quiet_reps(run_rep, lambda: [fn() for fn in impls.values()], reps, max_wait)
        kept = [r for r in log if r["quiet"]] or log
        row = {"agreement": check, "reps_run": len(log), "reps_quiet": sum(r["quiet"] for r in log),
               "stats_over": "quiet reps" if kept is not log else "all reps (none quiet)"}
        for n in impls:
            ts, cs = [r["ms"][n][0] for r in kept], [r["ms"][n][1] for r in kept]
            row[n] = {"min_ms": min(ts), "median_ms": statistics.median(ts), "cpu_min_ms": min(cs),
                      "cpu_median_ms": statistics.median(cs),
                      "all_reps_min_ms": min(r["ms"][n][0] for r in log),
                      "all_reps_median_ms": statistics.median(r["ms"][n][0] for r in log)}
        for n in names:
            row[f"ratio nflows/{n}"] = {k: row["nflows"][f"{k}_ms"] / row[n][f"{k}_ms"]
                                        for k in ("min", "median", "cpu_min", "cpu_median", "all_reps_min",
                                                  "all_reps_median")}
            # the two steps of one rep ran back to back: the median of their ratio is the paired statistic
            row[f"ratio nflows/{n}"]["paired_median"] = statistics.median(
                r["ms"]["nflows"][0] / r["ms"][n][0] for r in kept)
        row["reps"] = [{"wall_ms": {n: round(w, 3) for n, (w, _) in r["ms"].items()},
                        "cpu_ms": {n: round(c, 3) for n, (_, c) in r["ms"].items()},
                        "others_cpu_ms": r["others_cpu_ms"], "quiet": r["quiet"]} for r in log]
        result["batches"][str(B)] = row
        print(f"B={B} ({row['stats_over']}: {len(kept)} of {len(log)}): " + ", ".join(
            f"{n} min {row[n]['min_ms']:.1f} ms / median {row[n]['median_ms']:.1f} ms" for n in impls)
            + " | " + ", ".join(
            f"nflows/{n} {r['min']:.2f}x (min) {r['median']:.2f}x (median) {r['paired_median']:.2f}x (paired "
            f"median), CPU time {r['cpu_min']:.2f}x (min)"
            for n in names for r in [row[f"ratio nflows/{n}"]]), flush=True)
    if out:
        atomic.write_json(out, result)  # never half-written
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=realnvp_timing.__doc__)
    parser.add_argument("--batches", default="32,256", help="comma-separated B")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON path for the raw numbers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-wait", type=float, default=0.0,
                        help="seconds to keep going (waiting for a quiet machine) until --reps quiet reps")
    args = parser.parse_args()
    realnvp_timing([int(b) for b in args.batches.split(",")], args.reps, args.out, args.threads, args.max_wait)
