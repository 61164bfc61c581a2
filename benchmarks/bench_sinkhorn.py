"""Sinkhorn divergence on batches of variable-size sentences (BERT-like token embeddings, d = 768),
GeomLoss defaults (p = 2, blur = 0.05, scaling = 0.5, debias), against GeomLoss tensorized (zero-weight
padding, the baseline), GeomLoss called once per problem, and POT's batched log-Sinkhorn at a fixed eps.

The truth ("reference") is the float64 run of the C++ kernel on the CPU (per-problem semantics:
each problem's own diameter, as GeomLoss called per problem; GeomLoss tensorized shares one diameter
over the padded batch, and its error column shows that). The tests check that float64 run against
the pure-PyTorch reference to 1e-9 and the reference against GeomLoss per problem; the pure-PyTorch
reference itself (explicit differences, O(B n m d) memory) is too slow to time here.
In float32 at eps = blur^2 = 0.0025 with squared distances ~ 1500, a cost's rounding error
(~1e-4) moves plan entries by exp(1e-4 / eps) ~ 4%: gradients of every float32 implementation
differ from the float64 truth by ~1e-3..1e-2 of their scale, values by ~1e-6. The "fwd" rows
(values only) are the ones that measure the 1e-4 value target.

WordOT's shapes (seed 003, ``xlt_fast.trainers.wordot``; op label ``sinkhorn_divergence``, shapes
``wordot ...``): a batch of 24 parallel sentence pairs with n, m ~ U[15, 45] words per side, d = 384
(e5-small) and 768. ``wordot pool NxM`` is the trainer's default ``scope="batch"``: all words of
the 24 sentences of each side pooled into one unbatched (N, d) cloud, one divergence per language
pair (N, M ~ 720). ``wordot B=24`` is ``scope="pair"``: one problem per sentence pair, padded with
masks. The points imitate last-layer word vectors: a shared direction (anisotropy: two random words
have cosine ~0.65), a component per sentence pair shared by both sides, a word component, and each
target word near a random source word of its pair (a translation) plus the target language's own
offset; norms ~7 at d = 384 (e5-small's last-layer word vectors: 5..10) and ~16 at d = 768 (mBERT /
e5-base-like). Target: values equal to the float64 truth within 1e-4 relative (fp64 exact), and at
least 3x faster than GeomLoss tensorized (the printed ratio; not asserted).

WCA's coupling (seed 001, ``xlt_fast.nn.token_alignment``; op ``wca coupling``): per training step,
the entropic plans of 4 layers x 32 sentence pairs, n, m ~ U[20, 60] subwords (padded with masks),
cosine cost, eps = 0.05, plans returned; d = 384 and 768. Every implementation is timed from the
token states: the costs (``cosine_costs``, one batched GEMM in plain PyTorch, given to every solver
alike; GeomLoss computes its own from the points) and the 128 plans. The states are synthetic
(:func:`_wca_states`); the truth is the converged float64 run of the C++ kernel. Two rows per size:
``it=200``, a fixed number of updates and no stopping rule (the same count for every solver), and
``tol=1e-5``, each solver stopping by its own rule at that number: ours, per problem, the L1
violation of both marginals (``|P 1 - a|_1 + |P^T 1 - b|_1``, every update); POT's, for the whole
batch, the largest L2 violation of the row marginal (its columns are exact after each v update),
every 10 updates. Target: plans within 1e-5 (max abs) of the truth, and at least 3x faster than the
fastest peer (the printed ratio divides by POT's time; not asserted).
"""
from __future__ import annotations

import math

import torch

import xlt_fast
from xlt_fast.benchmarks.common import kernel_backends
from xlt_fast.benchmarks.harness import Case
from xlt_fast.nn.token_alignment import cosine_costs, layer_plans


# float32 gradients at eps = 0.0025 differ from the float64 truth by ~1e-3..1e-2 of their scale
# (module docstring); values are held to 1e-4
FP32_GRAD_TOL = 2e-2


def _batch(B: int, lo: int, hi: int, d: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=g) * 0.7  # |offset| ~ 19: BERT-like norms
    ns = torch.randint(lo, hi + 1, (B,), generator=g)
    ms = torch.randint(lo, hi + 1, (B,), generator=g)
    n, m = int(ns.max()), int(ms.max())
    xm = torch.arange(n) < ns.unsqueeze(1)
    ym = torch.arange(m) < ms.unsqueeze(1)
    x = (offset + torch.randn(B, n, d, generator=g)) * xm.unsqueeze(-1)
    y = (offset + 0.2 + torch.randn(B, m, d, generator=g)) * ym.unsqueeze(-1)
    return x.to(device), y.to(device), xm.to(device), ym.to(device), ns.tolist(), ms.tolist()


def _wordot_pairs(B: int, lo: int, hi: int, d: int, norm: float, seed: int):
    """Word clouds of ``B`` parallel sentence pairs, ``(target, source)`` lists of ``(n_k, d)`` and
    ``(m_k, d)`` tensors with n_k, m_k ~ U[lo, hi] (the counts depend on ``seed`` only, not on ``d``)."""
    g = torch.Generator().manual_seed(seed)
    ns = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    ms = torch.randint(lo, hi + 1, (B,), generator=g).tolist()

    def unit(*shape):  # random directions of norm ~1
        return torch.randn(*shape, d, generator=g) / d ** 0.5
    common, lang = unit(), unit()
    tgt, src = [], []
    for n, m in zip(ns, ms):
        sent, words = unit(), unit(m)
        link = torch.randint(0, m, (n,), generator=g)  # each target word's translation among the source words
        tw = 0.8 * words[link] + 0.6 * unit(n)
        src.append(norm * (0.8 * common + 0.3 * sent + 0.5 * words))
        tgt.append(norm * (0.8 * common + 0.15 * lang + 0.3 * sent + 0.5 * tw))
    return tgt, src


def _padded(clouds: list[torch.Tensor]):
    """``(B, n, d)`` zero-padded points and their ``(B, n)`` mask."""
    n = max(c.shape[0] for c in clouds)
    mask = torch.arange(n) < torch.tensor([c.shape[0] for c in clouds]).unsqueeze(1)
    x = torch.zeros(len(clouds), n, clouds[0].shape[1])
    x[mask] = torch.cat(clouds)
    return x, mask


def _with_grad(fn, x, y, bwd: bool):
    """Run ``fn(x, y) -> (B,)``; with ``bwd`` also return d sum / dx, dy."""
    if not bwd:
        with torch.no_grad():
            return fn(x, y)
    xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    v = fn(xr, yr)
    gx, gy = torch.autograd.grad(v.sum(), (xr, yr))
    return v.detach(), gx, gy


def _per_problem(loss_one, x, y, ns, ms):
    """(B,) from a per-problem callable on the unpadded clouds (gradients flow to the padded x, y)."""
    return torch.stack([loss_one(x[k, :ns[k]], y[k, :ms[k]]) for k in range(x.shape[0])])


FLOOR_LABEL = "floor (GEMMs+exp)"  # at the updates our solver ran (floor_impl)
EXP_CHUNK = 1 << 18  # floats per exp call of the floor: 1 MB, L2-resident; few parallel regions


def floor_impl(sizes: list[tuple[int, int, int]], d: int, *, debias: bool, backward: bool, plans: bool = False,
               device: torch.device = torch.device("cpu"), dtype=torch.float32):
    """The unavoidable work of a Sinkhorn call on real sizes, as a zero-argument callable: the floor
    of its bench case. ``sizes``: ``(n_k, m_k, updates_k)`` per problem, the updates our solver ran.

    * costs: the GEMM ``x y^T`` (n m d), with ``debias`` also ``x x^T`` and ``y y^T``; for a
      precomputed cost (``d = 0``) none;
    * the solver: one exp per cost entry per half-update of a log-domain update (softmin over the
      rows, then the columns): ``2 n m`` per update, with ``debias`` ``+ n^2 + m^2`` (the symmetric
      self problems update one potential each);
    * ``plans``: one exp per entry of the returned plan (n m);
    * ``backward``: the four plans of the gradient (``2 n m + n^2 + m^2`` exps; ``2 n m`` without
      debias) and their GEMMs with the points: ``W y``, ``W^T x`` and, with debias, ``W_xx x``,
      ``W_yy y``.

    Each problem's GEMMs run on its own real block (as ours do); the exps run as one elementwise
    ``torch.exp`` over a cache-resident buffer, in chunks of ``EXP_CHUNK``, for the total count: the
    logsumexp's max, sum and log are not counted, so the floor is below any real solver."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    gemms, n_exp = [], 0
    for n, m, updates in sizes:
        self_sq = n * n + m * m if debias else 0
        n_exp += updates * (2 * n * m + self_sq) + (n * m if plans else 0)
        if backward:
            n_exp += 2 * n * m + self_sq
        if d == 0:
            continue
        x, y = rnd(n, d), rnd(m, d)
        pairs = [(x, y.T)] + ([(x, x.T), (y, y.T)] if debias else [])
        if backward:
            w, wt = rnd(n, m), rnd(m, n)
            pairs += [(w, y), (wt, x)] + ([(rnd(n, n), x), (rnd(m, m), y)] if debias else [])
        gemms += [(u, v, torch.empty(u.shape[0], v.shape[1], device=device, dtype=dtype)) for u, v in pairs]
    buf = rnd(min(EXP_CHUNK, max(n_exp, 1)))
    out = torch.empty_like(buf)
    full, rest = divmod(n_exp, buf.numel())

    def run():
        for u, v, o in gemms:
            torch.mm(u, v, out=o)
        for _ in range(full):
            torch.exp(buf, out=out)
        if rest:
            torch.exp(buf[:rest], out=out[:rest])
        return out

    return run


def _our_updates(x, y, xm, ym, **kw) -> list[tuple[int, int, int]]:
    """``(n_k, m_k, updates_k)`` of our C++ solver on this case's problems (masks: real sizes)."""
    B, n, m = x.shape[0], x.shape[-2], y.shape[-2]
    ns = [n] * B if xm is None else xm.sum(1).tolist()
    ms = [m] * B if ym is None else ym.sum(1).tolist()
    its = xlt_fast.sinkhorn(x.cpu(), y.cpu(), x_mask=None if xm is None else xm.cpu(),
                            y_mask=None if ym is None else ym.cpu(), backend="cpu", warn=False, **kw).n_iters
    return list(zip(ns, ms, its.reshape(-1).tolist()))


def cases(device: torch.device, quick: bool) -> list[Case]:
    grid = [(8, 10, 64)] if quick else [(B, lo, hi) for B in (8, 32, 256) for lo, hi in ((10, 64), (64, 128))]
    modes = ["fwd+bwd"] if quick else ["fwd", "fwd+bwd"]
    try:
        import geomloss
    except ImportError:  # pragma: no cover - optional peer
        geomloss = None
    try:
        from ot.batch import solve_batch
    except ImportError:  # pragma: no cover - optional peer
        solve_batch = None
    out = []
    for B, lo, hi in grid:
        x, y, xm, ym, ns, ms = _batch(B, lo, hi, 768, device, seed=B + hi)
        a = xm.to(x.dtype) / xm.sum(1, keepdim=True)
        b = ym.to(x.dtype) / ym.sum(1, keepdim=True)
        for mode in modes:
            bwd = mode == "fwd+bwd"
            impls = {}

            def truth(x=x, y=y, xm=xm, ym=ym, bwd=bwd):
                out = _with_grad(lambda u, v: xlt_fast.sinkhorn_divergence(
                    u, v, x_mask=xm.cpu(), y_mask=ym.cpu(), backend="cpu"), x.double().cpu(), y.double().cpu(), bwd)
                return tuple(t.to(x.device, torch.float32) for t in out) if bwd else out.to(x.device, torch.float32)

            impls["reference"] = truth
            if geomloss is not None:
                loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True,
                                            backend="tensorized")
                impls["geomloss tensorized"] = (lambda a=a, b=b, x=x, y=y, bwd=bwd, loss=loss:
                                                _with_grad(lambda u, v: loss(a, u, b, v), x, y, bwd))
                if not quick and B <= 32:  # a loop of 256 autograd graphs takes minutes per call here
                    impls["geomloss loop"] = (lambda x=x, y=y, bwd=bwd, loss=loss, ns=ns, ms=ms: _with_grad(
                        lambda u, v: _per_problem(loss, u, v, ns, ms), x, y, bwd))
            for name in kernel_backends(device, "cpu", "triton"):
                impls[f"xlt_fast[{name}]"] = (lambda name=name, x=x, y=y, xm=xm, ym=ym, bwd=bwd: _with_grad(
                    lambda u, v: xlt_fast.sinkhorn_divergence(u, v, x_mask=xm, y_mask=ym, backend=name), x, y, bwd))
            out.append(Case("sinkhorn_divergence", f"B={B},n,m~U[{lo},{hi}],d=768", mode, impls,
                            baseline="geomloss tensorized" if geomloss is not None else "reference",
                            tolerance=FP32_GRAD_TOL if bwd else 1e-4, floor_label=FLOOR_LABEL,
                            floor=floor_impl(_our_updates(x, y, xm, ym), 768, debias=True, backward=bwd,
                                             device=device)))
    out += _wordot_cases(device, quick, geomloss)
    if solve_batch is not None:
        out += _fixed_eps_cases(device, quick, solve_batch)
    out += _wca_cases(device, quick, geomloss, solve_batch)
    return out


# Fixed-eps entropic OT against POT's batched log-Sinkhorn (POT has no eps-scaling), on equal sizes.
# Two rows per size: "tol" (each solver stops by the same test at the same tol: ours with
# update="alternate", stop="pot" is POT's test, |P 1 - a|_2 < tol after a column update, which POT
# evaluates for the batch's largest every 10 updates and ours per problem at every update, for free
# from the row pass), and "it" (a fixed number of alternate updates, no test). The mode label carries
# the iterations each solver ran (ours: per-problem min-max; POT: the batch's count). The averaged
# default (GeomLoss's update, stricter L1 test of both marginals) is timed alongside.
FIXED_EPS, FIXED_TOL, FIXED_MAX_ITERS, FIXED_ITERS = 50.0, 1e-6, 500, 200  # costs |x - y|^2 / 2 ~ 800


def pot_iterations(M, eps: float, max_iter: int, tol: float) -> int:
    """Updates POT's ``solve_batch(M, eps, method="log_sinkhorn")`` runs: its log's ``n_iter`` is the
    last loop index."""
    from ot.batch import solve_batch

    res = solve_batch(M, eps, max_iter=max_iter, tol=tol, method="log_sinkhorn", reg_type="kl", grad="detach")
    return int(res.log["n_iter"]) + 1


def _fixed_eps_cases(device: torch.device, quick: bool, solve_batch) -> list[Case]:
    eps = FIXED_EPS
    out = []
    for B, n in [(8, 32)] if quick else [(8, 32), (32, 64), (8, 128)]:
        x, y, _, _, _, _ = _batch(B, n, n, 768, device, seed=7)
        M = 0.5 * torch.cdist(x, y) ** 2
        rows = ((f"tol={FIXED_TOL:g}", FIXED_MAX_ITERS, FIXED_TOL), (f"it={FIXED_ITERS}", FIXED_ITERS, None))
        for label, n_iters, tol in rows:
            ours = dict(eps=eps, n_iters=n_iters, tol=tol, update="alternate", stop="pot" if tol else "marginals")
            averaged = dict(eps=eps, n_iters=n_iters, tol=tol)

            def pot(x=x, y=y, n_iters=n_iters, tol=tol):
                M = 0.5 * torch.cdist(x, y) ** 2
                return solve_batch(M, eps, max_iter=n_iters, tol=0.0 if tol is None else tol, method="log_sinkhorn",
                                   reg_type="kl", grad="detach").value

            impls = {"reference": lambda x=x, y=y: xlt_fast.sinkhorn(
                         x.double().cpu(), y.double().cpu(), eps=eps, n_iters=5000, tol=1e-12, update="alternate",
                         stop="pot", backend="cpu").cost.to(x.device, torch.float32),
                     "POT solve_batch": pot}
            its = {"POT": pot_iterations(M.cpu(), eps, n_iters, 0.0 if tol is None else tol)}
            for name in kernel_backends(device, "cpu", "triton"):  # Triton: the averaged update only
                if name != "triton":
                    impls[f"xlt_fast[{name}]"] = (lambda name=name, x=x, y=y, kw=ours:
                                                  xlt_fast.sinkhorn(x, y, backend=name, **kw).cost)
                impls[f"xlt_fast[{name}] averaged"] = (lambda name=name, x=x, y=y, kw=averaged:
                                                       xlt_fast.sinkhorn(x, y, backend=name, **kw).cost)
                for key, kw in (("ours", ours), ("averaged", averaged)) if name != "triton" else ():
                    k = xlt_fast.sinkhorn(x, y, backend=name, **kw).n_iters
                    its[key] = f"{int(k.min())}-{int(k.max())}"
            note = " ".join(f"{k} {v}" for k, v in its.items())
            out.append(Case("sinkhorn fixed eps", f"B={B},n=m={n},d=768,eps={eps:g}", f"{label} (it: {note})", impls,
                            baseline="POT solve_batch", floor_label=FLOOR_LABEL,
                            floor=floor_impl(_our_updates(x, y, None, None, **ours), 768, debias=False,
                                             backward=False, device=device)))
    return out


def _wordot_cases(device: torch.device, quick: bool, geomloss) -> list[Case]:
    """WordOT's stage-1 divergences (see the module docstring): pooled per language pair, and per
    sentence pair with masks; B = 24 pairs, n, m ~ U[15, 45] words."""
    B, lo, hi = 24, 15, 45
    dims = [384] if quick else [384, 768]
    modes = ["fwd+bwd"] if quick else ["fwd", "fwd+bwd"]
    out = []
    for d in dims:
        tgt, src = _wordot_pairs(B, lo, hi, d, 7.0 if d == 384 else 16.0, seed=3)
        xp, yp = torch.cat(tgt).to(device), torch.cat(src).to(device)   # scope batch: one (N, d) cloud a side
        (xb, xm), (yb, ym) = _padded(tgt), _padded(src)                 # scope pair: (B, n, d) and masks
        ns, ms = [t.shape[0] for t in tgt], [t.shape[0] for t in src]
        xb, xm, yb, ym = xb.to(device), xm.to(device), yb.to(device), ym.to(device)
        shapes = {"pool": (f"wordot pool {xp.shape[0]}x{yp.shape[0]},d={d}", xp, yp, None, None),
                  "pair": (f"wordot B={B},U[{lo},{hi}],d={d}", xb, yb, xm, ym)}
        for scope, (shape, x, y, xm_, ym_) in shapes.items():
            for mode in modes:
                bwd = mode == "fwd+bwd"

                def truth(x=x, y=y, xm=xm_, ym=ym_, bwd=bwd):
                    masks = {} if xm is None else {"x_mask": xm.cpu(), "y_mask": ym.cpu()}
                    res = _with_grad(lambda u, v: xlt_fast.sinkhorn_divergence(u, v, backend="cpu", **masks),
                                     x.double().cpu(), y.double().cpu(), bwd)
                    return tuple(t.to(x.device, torch.float32) for t in res) if bwd else res.to(x.device, torch.float32)

                impls = {"reference": truth}
                if geomloss is not None:
                    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True,
                                                backend="tensorized")
                    if xm_ is None:
                        impls["geomloss tensorized"] = (lambda x=x, y=y, bwd=bwd, loss=loss:
                                                        _with_grad(loss, x, y, bwd))
                    else:
                        a = xm_.to(x.dtype) / xm_.sum(1, keepdim=True)
                        b = ym_.to(x.dtype) / ym_.sum(1, keepdim=True)
                        impls["geomloss tensorized"] = (lambda a=a, b=b, x=x, y=y, bwd=bwd, loss=loss:
                                                        _with_grad(lambda u, v: loss(a, u, b, v), x, y, bwd))
                        if not quick:
                            impls["geomloss loop"] = (lambda x=x, y=y, bwd=bwd, loss=loss, ns=ns, ms=ms: _with_grad(
                                lambda u, v: _per_problem(loss, u, v, ns, ms), x, y, bwd))
                for name in kernel_backends(device, "cpu", "triton"):
                    impls[f"xlt_fast[{name}]"] = (lambda name=name, x=x, y=y, xm=xm_, ym=ym_, bwd=bwd: _with_grad(
                        lambda u, v: xlt_fast.sinkhorn_divergence(u, v, x_mask=xm, y_mask=ym, backend=name),
                        x, y, bwd))
                out.append(Case("sinkhorn_divergence", shape, mode, impls,
                                baseline="geomloss tensorized" if geomloss is not None else "reference",
                                tolerance=FP32_GRAD_TOL if bwd else 1e-4, floor_label=FLOOR_LABEL,
                                floor=floor_impl(_our_updates(x, y, xm_, ym_), d, debias=True, backward=bwd,
                                                 device=device)))
    return out


# WCA's coupling (module docstring). Our updates are averaged (GeomLoss's symmetric loop), POT's
# alternate: at eps = 0.05 on these costs ours need ~200 updates to come within 1e-5 of the converged
# plans, POT's ~50, so the fixed count is 200 for everyone (POT's plans are converged there too).
WCA_EPS, WCA_ITERS, WCA_TOL, WCA_MAX_ITERS = 0.05, 200, 1e-5, 1000


def _wca_states(L: int, B: int, lo: int, hi: int, d: int, seed: int):
    """Token states of ``B`` parallel sentence pairs at ``L`` layers: ``xs (L, B, n, d)``,
    ``ys (L, B, m, d)`` zero-padded, masks ``(B, n)``, ``(B, m)``, n_k, m_k ~ U[lo, hi] (the counts
    depend on ``seed`` only). Per layer a shared direction (anisotropy), one per sentence pair and
    one per source token; each target token is a noisy copy of a random real source token of its
    pair (its translation). Cosine costs of real pairs lie in ~[0.07, 0.67] (unrelated tokens
    ~0.5, a target token to its translation ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    ns = torch.randint(lo, hi + 1, (B,), generator=g)
    ms = torch.randint(lo, hi + 1, (B,), generator=g)
    n, m = int(ns.max()), int(ms.max())
    xm = torch.arange(n) < ns.unsqueeze(1)
    ym = torch.arange(m) < ms.unsqueeze(1)

    def unit(*shape):  # random directions of norm ~1
        return torch.randn(*shape, d, generator=g) / d ** 0.5
    xs, ys = [], []
    for _ in range(L):
        common, sent, words = unit(), unit(B, 1), unit(B, n)
        link = (torch.rand(B, m, generator=g) * ns.unsqueeze(1)).long()  # each target token's translation
        tw = 0.8 * words.gather(1, link.unsqueeze(-1).expand(B, m, d)) + 0.6 * unit(B, m)
        xs.append(0.6 * common + 0.4 * sent + 0.7 * words)
        ys.append(0.6 * common + 0.4 * sent + 0.7 * tw)
    return torch.stack(xs) * xm.unsqueeze(-1), torch.stack(ys) * ym.unsqueeze(-1), xm, ym


def _wca_plans(xs, ys, xm, ym, n_iters: int, tol, backend: str):
    """The trainer's coupling: cosine costs of the states, then every layer's plan in one call."""
    return layer_plans(cosine_costs(xs, ys), xm, ym, eps=WCA_EPS, n_iters=n_iters, tol=tol, backend=backend)[0]


def _wca_floor(xs, ys, xm, ym, n_iters: int, tol, device):
    """WCA's floor: the cosine costs' GEMM (one padded ``x y^T`` bmm over layers and pairs: the costs
    every implementation here is given), then the exps of our updates and of the returned plans
    (:func:`floor_impl` on the precomputed costs, real sizes)."""
    L = xs.shape[0]
    C = cosine_costs(xs, ys).reshape(L * xs.shape[1], xs.shape[2], ys.shape[2])
    res = xlt_fast.sinkhorn(x_mask=xm.repeat(L, 1).cpu(), y_mask=ym.repeat(L, 1).cpu(), cost=C.cpu(), eps=WCA_EPS,
                            n_iters=n_iters, tol=tol, warn=False, backend="cpu")
    ns, ms = xm.sum(1).repeat(L).tolist(), ym.sum(1).repeat(L).tolist()
    solver = floor_impl(list(zip(ns, ms, res.n_iters.tolist())), 0, debias=False, backward=False, plans=True,
                        device=device)
    x, y = xs.reshape(-1, xs.shape[2], xs.shape[3]), ys.reshape(-1, ys.shape[2], ys.shape[3])
    yt = y.transpose(1, 2)

    def run():
        torch.bmm(x, yt)
        return solver()

    return run


def _wca_truth(xs, ys, xm, ym):
    """The converged plans: float64 C++ kernel, until the L1 marginal violation is below 1e-10."""
    plans, err = layer_plans(cosine_costs(xs.double().cpu(), ys.double().cpu()), xm.cpu(), ym.cpu(),
                             eps=WCA_EPS, n_iters=5 * WCA_MAX_ITERS, tol=1e-10, backend="cpu")
    if not bool(err.max() < 1e-10):
        raise RuntimeError(f"WCA truth not converged (marginal violation {float(err.max()):.2g})")
    return plans.to(xs.device, torch.float32)


def _layer_weights(mask, L: int):
    """Uniform weights over the real tokens, 0 on the padding, repeated for the ``L`` layers: ``(L * B, n)``."""
    return (mask.to(torch.float32) / mask.sum(1, keepdim=True)).repeat(L, 1)


def _pot_plans(solve_batch, xs, ys, xm, ym, n_iters: int, tol):
    """POT's batched log-Sinkhorn on the same costs. It takes per-problem weights, so ragged sizes
    need no grouping by size: a zero weight gives a -inf potential and exact zeros in the plan
    (checked: no NaN). ``tol`` None: POT's check still runs every 10 updates, with tol 0 it never stops."""
    C = cosine_costs(xs, ys)
    L, B, n, m = C.shape
    res = solve_batch(C.reshape(L * B, n, m), WCA_EPS, a=_layer_weights(xm, L), b=_layer_weights(ym, L),
                      max_iter=n_iters, tol=0.0 if tol is None else tol, method="log_sinkhorn", reg_type="kl",
                      grad="detach")
    return res.plan.view(L, B, n, m)


def _geomloss_fixed_eps(geomloss, n_iters: int):
    """GeomLoss's tensorized loop (the same averaged updates as ours) for ``n_iters`` updates at eps.
    GeomLoss has no fixed-eps mode (its ``ot.solve_batch`` anneals from the cost range), so the
    schedule ``[D] + arange(log D, log blur, log scaling) + [blur]`` is pinned: D = eps (1 + 1e-7) and
    the ratio that gives n_iters - 2 steps in between, all within 1e-7 of eps. No stopping rule."""
    delta = 1e-7
    scaling = math.exp(-math.log1p(delta) / (n_iters - 2.5))
    return geomloss.SamplesLoss("sinkhorn", p=1, blur=WCA_EPS, diameter=WCA_EPS * (1 + delta), scaling=scaling,
                                cost=cosine_costs, debias=False, potentials=True, backend="tensorized")


def _geomloss_plans(loss, xs, ys, xm, ym):
    """The plans ``a_i b_j exp((f_i + g_j - C_ij) / eps)`` of GeomLoss's potentials."""
    L, B, n, d = xs.shape
    x, y = xs.reshape(L * B, n, d), ys.reshape(L * B, -1, d)
    a, b = _layer_weights(xm, L), _layer_weights(ym, L)
    f, g = loss(a, x, b, y)
    plan = a.unsqueeze(2) * b.unsqueeze(1) * torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - cosine_costs(x, y)) / WCA_EPS)
    return plan.view(L, B, n, -1)


def _wca_cases(device: torch.device, quick: bool, geomloss, solve_batch) -> list[Case]:
    """WCA's coupling (module docstring) at d = 384 (and 768 in the full grid): a fixed number of
    updates for every solver, and each solver's own stopping rule at tol = 1e-5."""
    L, B, lo, hi = 4, 32, 20, 60
    out = []
    for d in [384] if quick else [384, 768]:
        xs, ys, xm, ym = (t.to(device) for t in _wca_states(L, B, lo, hi, d, seed=1))
        for mode, n_iters, tol in ((f"it={WCA_ITERS}", WCA_ITERS, None), (f"tol={WCA_TOL:g}", WCA_MAX_ITERS, WCA_TOL)):
            impls = {"reference": lambda xs=xs, ys=ys, xm=xm, ym=ym: _wca_truth(xs, ys, xm, ym)}
            if solve_batch is not None:
                impls["POT solve_batch"] = (lambda xs=xs, ys=ys, xm=xm, ym=ym, n_iters=n_iters, tol=tol:
                                            _pot_plans(solve_batch, xs, ys, xm, ym, n_iters, tol))
            if geomloss is not None and tol is None:
                loss = _geomloss_fixed_eps(geomloss, n_iters)
                impls["geomloss tensorized"] = (lambda xs=xs, ys=ys, xm=xm, ym=ym, loss=loss:
                                                _geomloss_plans(loss, xs, ys, xm, ym))
            for name in kernel_backends(device, "cpu", "triton"):
                impls[f"xlt_fast[{name}]"] = (lambda name=name, xs=xs, ys=ys, xm=xm, ym=ym, n_iters=n_iters, tol=tol:
                                              _wca_plans(xs, ys, xm, ym, n_iters, tol, name))
            out.append(Case("wca coupling", f"wca {L}x{B},U[{lo},{hi}],d={d}", mode, impls,
                            baseline="POT solve_batch" if solve_batch is not None else "reference", tolerance=1e-5,
                            floor_label=FLOOR_LABEL, floor=_wca_floor(xs, ys, xm, ym, n_iters, tol, device)))
    return out
