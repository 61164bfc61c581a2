"""Contrastive losses, forward + backward: ours against pytorch-metric-learning (SupConLoss,
NTXentLoss with ref_emb, which equal supcon / info_nce for cosine) and against eager PyTorch
(the reference) for negative_contrastive (seed 004 eq. 6) and negative_learning (eq. 1).

``CoNL step``: eq. 6 as the CoNLST trainer calls it (negatives as indices into a pool that requires
grad), against the same loss in dense PyTorch and in pytorch-metric-learning; the values of every
implementation are checked against the fp64 reference before anything is timed (:func:`conl_agreement`).
``python -m xlt_fast.benchmarks.bench_contrastive --conl-timing`` times it with interleaved reps
(:func:`conl_timing`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import xlt_fast
from xlt_fast import reference as R
from xlt_fast.benchmarks.common import cpu_busy_s, fp64_cpu, fwd_bwd, kernel_backends, quiet_reps
from xlt_fast.benchmarks.harness import Case


def _pml():
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        return None
    return losses


def _supcon(device, B, d, with_reference=True):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, d, generator=g).to(device)
    y = torch.randint(0, 10, (B,), generator=g).to(device)
    impls = {}
    if with_reference:
        f64, y64 = fp64_cpu(f, y)
        impls["reference"] = fwd_bwd(lambda x: R.supcon(x, y64, 0.1), f64)
    pml = _pml()
    if pml is not None:
        loss = pml.SupConLoss(temperature=0.1)
        impls["pml.SupConLoss"] = fwd_bwd(lambda x: loss(x, y), f)
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, b=name: xlt_fast.supcon(x, y, 0.1, backend=b), f)
    return Case("supcon", f"B={B},d={d}", "fwd+bwd", impls, baseline="pml.SupConLoss",
                reference="reference" if with_reference else None)


def _info_nce(device, B, d, with_reference=True):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    ar = torch.arange(B, device=device)
    impls = {}
    if with_reference:
        impls["reference"] = fwd_bwd(lambda x, z: R.info_nce(x, z, 0.05), *fp64_cpu(a, b))
    pml = _pml()
    if pml is not None:
        loss = pml.NTXentLoss(temperature=0.05)
        impls["pml.NTXentLoss"] = fwd_bwd(lambda x, z: loss(x, ar, ref_emb=z, ref_labels=ar.clone()), a, b)
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, z, bk=name: xlt_fast.info_nce(x, z, 0.05, backend=bk), a, b)
    return Case("info_nce", f"B={B},d={d}", "fwd+bwd", impls, baseline="pml.NTXentLoss",
                reference="reference" if with_reference else None)


def _negative_contrastive(device, B, K, d):
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    idx = torch.randint(0, B, (B, K), generator=g).to(device)
    impls = {"reference": fwd_bwd(lambda x, z: R.negative_contrastive(x, z, z[idx.cpu()], 5.0), *fp64_cpu(a, p)),
             "eager torch": fwd_bwd(lambda x, z: R.negative_contrastive(x, z, z[idx], 5.0), a, p)}
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, z, bk=name: xlt_fast.negative_contrastive(x, z, idx, 5.0, backend=bk), a, p)
    return Case("negative_contrastive", f"B={B},K={K},d={d}", "fwd+bwd", impls, baseline="eager torch")


def _negative_learning(device, B, C):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(B, C, generator=g) * 3).to(device)
    y = (torch.rand(B, C, generator=g) > 0.5).to(device)
    impls = {"reference": fwd_bwd(lambda x: R.negative_learning(x, y.cpu()), *fp64_cpu(z)),
             "eager torch": fwd_bwd(lambda x: R.negative_learning(x, y), z)}
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, bk=name: xlt_fast.negative_learning(x, y, backend=bk), z)
    return Case("negative_learning", f"B={B},C={C}", "fwd+bwd", impls, baseline="eager torch")


# -- CoNL step: the CoNLST trainer's eq. 6 call at its sizes ------------------------------------------

CONL_B, CONL_K, CONL_D, CONL_P, CONL_TAU = 64, 16, 384, 5000, 0.1
CONL_FP64_RTOL = 1e-10  # every implementation in fp64 vs the reference: the same function
CONL_PML = "pml NTXent+indices"


def conl_data(dtype: torch.dtype = torch.float32, device="cpu"):
    """Unit rows (the trainer L2-normalises theta_con's outputs) around a shared direction, as
    encoder features are: pairwise squared distances ~0.3 and second views (dropout-like noise)
    at ~0.06, so that at tau = 0.1 the loss is O(1) (~0.7), not a saturated softmax. K indices per
    anchor into a pool of P rows with about 10 % masked (fewer allowed candidates than K; the trainer
    pads those with index 0) and one anchor without any negative."""
    g = torch.Generator().manual_seed(5)

    def noise(n):
        return torch.randn(n, CONL_D, generator=g, dtype=torch.float64) / CONL_D ** 0.5

    mu = F.normalize(torch.randn(1, CONL_D, generator=g, dtype=torch.float64), dim=1)
    raw = mu + 0.45 * noise(CONL_B)
    anchor, positive = F.normalize(raw, dim=1), F.normalize(raw + 0.25 * noise(CONL_B), dim=1)
    pool = F.normalize(mu + 0.45 * noise(CONL_P), dim=1)
    idx = torch.randint(0, CONL_P, (CONL_B, CONL_K), generator=g)
    mask = torch.rand(CONL_B, CONL_K, generator=g) > 0.1
    mask[0] = False
    idx[~mask] = 0
    return [t.to(device, dtype) for t in (anchor, positive, pool)] + [idx.to(device), mask.to(device)]


def dense_conl(anchor, positive, pool, idx, mask, tau: float, metric: str) -> torch.Tensor:
    """Eq. 6 written in dense PyTorch: gather pool[idx] (B, K, d), distances, masked logsumexp."""
    neg = pool[idx]
    d_pos = (anchor - positive).square().sum(-1)
    d_neg = (anchor.unsqueeze(1) - neg).square().sum(-1)
    if metric == "euclidean":
        d_pos, d_neg = d_pos.sqrt(), d_neg.sqrt()
    logits = torch.cat([-d_pos.unsqueeze(1), (-d_neg).masked_fill(~mask, float("-inf"))], 1) / tau
    return (torch.logsumexp(logits, 1) + d_pos / tau).mean()


def pml_conl(idx, mask, tau: float, metric: str):
    """Eq. 6 in pytorch-metric-learning: NTXentLoss over LpDistance (power 2: squared Euclidean) with
    ``ref_emb = [positive; pool]`` and the per-anchor negatives as an ``indices_tuple`` of pairs
    (anchor i with its positive i; anchor i with pool row B + index for each real negative). It
    computes the whole B x (B + P) distance matrix (cdist) and picks the pairs from it."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import LpDistance

    loss = losses.NTXentLoss(temperature=tau, distance=LpDistance(normalize_embeddings=False,
                                                                  power=2 if metric == "sqeuclidean" else 1))
    B = idx.shape[0]
    ar = torch.arange(B, device=idx.device)
    pairs = (ar, ar, ar.repeat_interleave(mask.sum(1)), B + idx[mask])
    return lambda a, p, c: loss(a, indices_tuple=pairs, ref_emb=torch.cat([p, c]))


def conl_impls(device: torch.device, metric: str, dtype: torch.dtype = torch.float32) -> dict:
    """name -> fwd+bwd run (loss and the gradients w.r.t. anchor, positive and pool) in ``dtype``;
    "reference" is always the fp64 gathered form (xlt_fast.reference)."""
    anchor, positive, pool, idx, mask = conl_data(dtype, device)
    impls = {"reference": fwd_bwd(lambda a, p, c: R.negative_contrastive(a, p, c[idx.cpu()], CONL_TAU, metric,
                                                                         mask.cpu()),
                                  *fp64_cpu(anchor, positive, pool)),
             "dense torch": fwd_bwd(lambda a, p, c: dense_conl(a, p, c, idx, mask, CONL_TAU, metric),
                                    anchor, positive, pool)}
    if _pml() is not None:
        impls[CONL_PML] = fwd_bwd(pml_conl(idx, mask, CONL_TAU, metric), anchor, positive, pool)
    for name in kernel_backends(device, "cpu", "triton"):
        for checked in (False, True):  # the trainer passes check_finite=False
            impls[f"xlt_fast {name}" + (" +checks" if checked else "")] = fwd_bwd(
                lambda a, p, c, bk=name, ch=checked: xlt_fast.negative_contrastive(
                    a, p, idx, CONL_TAU, metric, pool=c, negative_mask=mask, check_finite=ch, backend=bk),
                anchor, positive, pool)
    return impls


def conl_agreement(device: torch.device, metric: str, fp32_tol: float = 1e-4) -> dict[str, dict[str, float]]:
    """Every implementation against the reference before timing; raises unless all hold. fp64: loss
    and each gradient within ``CONL_FP64_RTOL`` of the tensor's max (the same function); fp32 (the
    timed precision): within ``fp32_tol`` of the output's scale (the harness's max error)."""
    from xlt_fast.benchmarks.harness import max_error

    def rel(u, v):
        return max(float((x.double().cpu() - y).abs().max() / y.abs().max().clamp_min(1e-300)) for x, y in zip(u, v))

    ref = conl_impls(device, metric, torch.float64)["reference"]()
    errs = {}
    for dtype, name_tol in ((torch.float64, CONL_FP64_RTOL), (torch.float32, fp32_tol)):
        for name, fn in conl_impls(device, metric, dtype).items():
            if name == "reference":
                continue
            out = fn()
            err = rel(out, ref) if dtype == torch.float64 else max_error(out, ref)
            errs.setdefault(name, {})["fp64_rel" if dtype == torch.float64 else "fp32_max_err"] = err
            if not err <= name_tol:
                raise AssertionError(f"CoNL step ({metric}): {name} differs from the reference in {dtype}: {err:.2e}")
    return errs


def _conl(device: torch.device, metric: str) -> Case:
    conl_agreement(device, metric)
    return Case("CoNL step", f"{metric},B={CONL_B},K={CONL_K},d={CONL_D},P={CONL_P}", "fwd+bwd",
                conl_impls(device, metric), baseline="dense torch")


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = [_supcon(device, 512, 768), _info_nce(device, 512, 768)]
    if quick:
        return out + [_negative_contrastive(device, 512, 8, 768), _negative_learning(device, 4096, 10),
                      _conl(device, "sqeuclidean")]
    out += [_supcon(device, 2048, 768), _info_nce(device, 2048, 768),
            _negative_contrastive(device, 512, 8, 768), _negative_contrastive(device, 4096, 16, 768),
            _negative_learning(device, 4096, 10), _negative_learning(device, 65536, 20),
            _conl(device, "sqeuclidean"), _conl(device, "euclidean")]
    if device.type == "cuda":  # O(B d) memory: the dense form (B^2 logits, several copies) does not fit
        out += [_supcon(device, 65536, 768, with_reference=False), _info_nce(device, 65536, 768, with_reference=False)]
    return out


def conl_timing(metrics: list[str], reps: int, inner: int = 20, max_wait: float = 0.0, out: str | None = None,
                threads: int | None = None) -> dict:
    """The CoNL step's implementations timed side by side on the CPU, after :func:`conl_agreement`.

    A rep runs every implementation ``inner`` times in a row (fwd+bwd each, wall time per call) and
    keeps the median call; the order of the implementations rotates from rep to rep. During each rep
    the CPU time that other processes used is taken from /proc/stat (its 10 ms ticks are why a rep
    holds ``inner`` calls): a rep is quiet when that is under 10 % of the rep's wall time. With
    ``max_wait > 0`` reps go on (after a rep that was not quiet: waiting for 0.5 s of a quiet machine,
    then one untimed call each) until ``reps`` quiet ones or ``max_wait`` seconds. Statistics are
    over the quiet reps (all reps when none was): per implementation the min and the median of the
    rep medians, and for each of ours the ratios dense torch / ours and pml / ours of the mins, of the
    medians, and the median over reps of the ratio within a rep (the paired statistic)."""
    import datetime
    import importlib.metadata
    import os
    import platform
    import statistics
    import subprocess
    import sys
    import time

    from xlt_fast.benchmarks.harness import _cpu_model
    from xlt_fast.training import atomic

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_model(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "commit": commit, "command": " ".join(sys.argv),
           "loadavg_start": os.getloadavg()}
    try:
        env["pytorch_metric_learning"] = importlib.metadata.version("pytorch-metric-learning")
    except importlib.metadata.PackageNotFoundError:
        pass
    result = {"case": "CoNL step", "what": f"negative_contrastive (seed 004 eq. 6) forward + backward w.r.t. "
                                           f"anchor, positive and pool: B={CONL_B} anchors, K={CONL_K} negatives "
                                           f"each as indices into a pool of P={CONL_P} rows, d={CONL_D}, "
                                           f"tau={CONL_TAU}, ~10 % of the negatives masked, fp32",
              "reps": reps, "inner": inner, "max_wait_s": max_wait, "environment": env, "metrics": {}}

    for metric in metrics:
        agreement = conl_agreement(device, metric)
        impls = {n: fn for n, fn in conl_impls(device, metric).items() if n != "reference"}
        names = list(impls)
        ours = [n for n in names if n.startswith("xlt_fast")]
        for fn in impls.values():
            for _ in range(3):
                fn()
        def run_rep(i: int) -> dict:
            shift = i % len(names)
            rep, t_rep, b0, c0 = {}, time.perf_counter(), cpu_busy_s(), time.process_time()
            for n in names[shift:] + names[:shift]:
                calls = []
                for _ in range(inner):
                    t0 = time.perf_counter()
                    impls[n]()
                    calls.append((time.perf_counter() - t0) * 1e3)
                rep[n] = statistics.median(calls)
            wall = time.perf_counter() - t_rep
            others = cpu_busy_s() - b0 - (time.process_time() - c0)
            return {"ms": rep, "others_cpu_ms": round(others * 1e3, 1), "wall_ms": round(wall * 1e3, 1),
                    "quiet": others < 0.1 * wall}

        log = quiet_reps(run_rep, lambda: [fn() for fn in impls.values()], reps, max_wait)
        kept = [r for r in log if r["quiet"]] or log
        row = {"agreement": agreement, "reps_run": len(log), "reps_quiet": sum(r["quiet"] for r in log),
               "stats_over": "quiet reps" if kept is not log else "all reps (none quiet)"}
        for n in names:
            ts = [r["ms"][n] for r in kept]
            row[n] = {"min_ms": min(ts), "median_ms": statistics.median(ts)}
        for peer in ("dense torch", CONL_PML):
            if peer not in names:
                continue
            for n in ours:
                row[f"ratio {peer}/{n}"] = {
                    "of_min": row[peer]["min_ms"] / row[n]["min_ms"],
                    "of_median": row[peer]["median_ms"] / row[n]["median_ms"],
                    "paired_median": statistics.median(r["ms"][peer] / r["ms"][n] for r in kept)}
        row["reps"] = [{**r, "ms": {n: round(v, 4) for n, v in r["ms"].items()}} for r in log]
        result["metrics"][metric] = row
        print(f"CoNL step {metric} ({row['stats_over']}: {len(kept)} of {len(log)} reps x {inner} calls)")
        for n in names:
            print(f"  {n:<24} min {row[n]['min_ms']:8.3f} ms  median {row[n]['median_ms']:8.3f} ms")
        for key in row:
            if key.startswith("ratio "):
                r = row[key]
                print(f"  {key:<44} {r['of_min']:5.2f}x (min) {r['of_median']:5.2f}x (median) "
                      f"{r['paired_median']:5.2f}x (paired median)")
    env["loadavg_end"] = os.getloadavg()
    if out:
        atomic.write_json(out, result)  # never half-written
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=conl_timing.__doc__)
    parser.add_argument("--conl-timing", action="store_true", help="time the CoNL step (the only mode)")
    parser.add_argument("--metrics", default="sqeuclidean,euclidean", help="comma-separated metrics")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20, help="calls per implementation per rep")
    parser.add_argument("--max-wait", type=float, default=0.0,
                        help="seconds to keep going (waiting for a quiet machine) until --reps quiet reps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path for the raw numbers")
    args = parser.parse_args()
    if not args.conl_timing:
        parser.error("pass --conl-timing (xlt-fast bench runs the other cases)")
    conl_timing(args.metrics.split(","), args.reps, args.inner, args.max_wait, args.out, args.threads)
