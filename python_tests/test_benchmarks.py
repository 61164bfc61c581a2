"""The benchmark harness: floor rows and % of floor, targets met or missed, interleaved timing,
the printed table, the JSON and the plot (our backends only, one group per case)."""
import json

import pytest
import torch

import xlt_fast
from xlt_fast.benchmarks import floors, harness
from xlt_fast.benchmarks.harness import Case

CPU = torch.device("cpu")


def _spin(ms: float):
    """A callable that returns a fixed tensor and is timed at ``ms`` (see the ``fake_clock`` fixture:
    wall-clock times on a loaded shared machine would make these tests flaky)."""
    def run():
        return torch.ones(3)

    run.ms = ms
    return run


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    """One timed call of ``fn`` takes ``fn.ms`` (the harness's only clock for timed impls)."""
    monkeypatch.setattr(harness, "_time_one", lambda fn, device: fn.ms)


def _case(target=None, floor_ms=2.0, **kw):
    impls = {"reference": lambda: torch.ones(3, dtype=torch.float64), "peer": _spin(12.0), "cpu": _spin(4.0)}
    return Case("toy_op", "B=4,d=8", "fwd", impls, baseline="peer", target=target,
                floor=_spin(floor_ms) if floor_ms else None, **kw)


def test_floor_row_pct_and_target():
    rows = harness.run_case(_case(target=2.0), CPU, quick=True)
    by = {r.impl: r for r in rows}
    assert [r.kind for r in rows] == ["reference", "baseline", "ours", "floor"]
    floor, ours = by["floor (GEMMs only)"], by["cpu"]
    assert floor.ratio > ours.ratio > 2.0 and ours.met is True and ours.target == 2.0
    assert ours.pct_of_floor == pytest.approx(50.0) and ours.ratio == pytest.approx(3.0)
    assert by["peer"].pct_of_floor is None and by["peer"].met is None
    assert ours.max_err == 0.0 and floor.max_err is None


def test_missed_target_and_no_floor():
    rows = harness.run_case(_case(target=10.0, floor_ms=0), CPU, quick=True)
    ours = next(r for r in rows if r.impl == "cpu")
    assert ours.met is False and ours.pct_of_floor is None
    assert not any(r.kind == "floor" for r in rows)
    assert "MISSED" in harness.table(rows)


def test_floor_label_and_broken_floor_reported():
    rows = harness.run_case(_case(floor_label="floor (exp/log only)"), CPU, quick=True)
    assert any(r.impl == "floor (exp/log only)" for r in rows)

    def broken():
        raise RuntimeError("no floor here")

    broken.ms = 1.0
    case = _case(floor_ms=0)
    case.floor = broken
    rows = harness.run_case(case, CPU, quick=True)
    floor = next(r for r in rows if r.kind == "floor")
    assert floor.median_ms is None and "RuntimeError" in floor.note


def test_registry_and_case_floor_precedence():
    @floors.register("toy_op")
    def factory(case, device):
        return lambda: "registered"

    try:
        case = _case(floor_ms=0)
        assert floors.floor_for(case, CPU)() == "registered"
        case.floor = lambda: "own"
        assert floors.floor_for(case, CPU)() == "own"
    finally:
        del floors.FLOORS["toy_op"]
    assert floors.floor_for(_case(floor_ms=0), CPU) is None


def test_shape_ints():
    assert floors.shape_ints("sqeuclidean,B=64,K=16,d=384,P=5000") == {"B": 64, "K": 16, "d": 384, "P": 5000}
    assert floors.shape_ints("B=32,n,m~U[10,64],d=768") == {"B": 32, "d": 768}


@pytest.mark.parametrize("op,shape", [("pairwise_distance", "B=2,n=5,m=3,d=7"), ("supcon", "B=6,d=4"),
                                      ("info_nce", "B=6,d=4"), ("negative_contrastive", "B=6,K=3,d=4"),
                                      ("CoNL step", "sqeuclidean,B=6,K=3,d=4,P=20")])
def test_registered_floors_run(op, shape):
    fn = floors.floor_for(Case(op, shape, "fwd", {}, baseline="x"), CPU)
    out = fn()
    assert all(t.isfinite().all() for t in (out if isinstance(out, tuple) else (out,)))


def test_targets_from_table():
    def t(op, shape, mode="fwd+bwd"):
        return harness.target_of(Case(op, shape, mode, {}, baseline="x"))

    assert t("critic_gp", "B=256,D=768,H=2048") == pytest.approx(1.2375)
    assert t("critic_gp", "B=16,D=768,H=2048") is None
    assert t("sinkhorn_divergence", "B=32,n,m~U[10,64],d=768") == 3.0
    assert t("sinkhorn_divergence", "B=8,n,m~U[10,64],d=768") is None
    assert t("pairwise_distance", "B=8,n=128,m=128,d=768", "fwd") == 1.0
    assert harness.target_of(Case("pairwise_distance", "B=1", "fwd", {}, baseline="x", target=3.0)) == 3.0


def test_is_ours():
    assert all(harness.is_ours(n) for n in ("cpu", "triton", "cuda", "xlt_fast[cpu]", "xlt_fast cpu +checks"))
    assert not any(harness.is_ours(n) for n in ("reference", "eager torch", "torch.cdist^2", "POT solve_batch"))


def test_time_interleaved_keys():
    times = harness.time_interleaved({"a": _spin(0.5), "b": _spin(1.5)}, CPU, min_time=0.0, max_reps=3)
    assert set(times) == {"a", "b"} and times["b"] > times["a"]


def test_json_and_plot(tmp_path):
    rows = harness.run_case(_case(target=2.0), CPU, quick=True) + harness.run_case(
        Case("other", "n=3", "fwd", {"peer": _spin(1.0), "xlt_fast[cpu]": _spin(3.0)}, baseline="peer",
             reference=None), CPU, quick=True)
    env = harness.environment(CPU)
    path, png = harness.write_results(rows, env, str(tmp_path), "cpu-test")
    data = json.load(open(path))
    floor = [r for r in data["rows"] if r["kind"] == "floor"]
    assert len(floor) == 1 and floor[0]["impl"] == "floor (GEMMs only)"
    ours = {r["impl"]: r for r in data["rows"] if r["kind"] == "ours"}
    assert set(ours) == {"cpu", "xlt_fast[cpu]"} and ours["xlt_fast[cpu]"]["met"] is None
    assert ours["cpu"]["pct_of_floor"] is not None and ours["cpu"]["target"] == 2.0
    assert png and (tmp_path / "cpu-test.png").stat().st_size > 10_000
    groups = harness._groups(rows)
    assert [(g[0].op, len(g)) for g in groups] == [("toy_op", 4), ("other", 2)]


def test_plot_draws_only_our_backends(tmp_path, monkeypatch):
    """The bars are our backends' ratios (one per case here); the peer and the reference are not bars."""
    import matplotlib.pyplot as plt  # a dev requirement: CI must draw the plot, never skip it
    drawn = []
    real_barh = plt.Axes.barh

    def spy(self, y, width, *a, **kw):
        drawn.append((y, width + kw.get("left", 0)))
        return real_barh(self, y, width, *a, **kw)

    monkeypatch.setattr(plt.Axes, "barh", spy)
    rows = harness.run_case(_case(target=10.0), CPU, quick=True)
    assert harness.plot(rows, str(tmp_path / "p.png"), harness.environment(CPU))
    ours = next(r for r in rows if r.kind == "ours")
    assert len(drawn) == 1 and drawn[0][1] == pytest.approx(ours.ratio)
    assert harness.plot([r for r in rows if r.kind != "ours"], str(tmp_path / "q.png"), {"device": "cpu",
                                                                                       "torch": "x"}) is None


def test_sinkhorn_floor_counts_our_updates(monkeypatch):
    """The Sinkhorn floor runs the GEMMs of each problem's real block and the exps of the updates our
    solver ran: 2 n m per update (+ n^2 + m^2 with debias), the backward's four plans, the plans."""
    from xlt_fast.benchmarks import bench_sinkhorn as bs

    calls = {"mm": [], "exp": 0}
    real_mm, real_exp = torch.mm, torch.exp
    monkeypatch.setattr(bs, "EXP_CHUNK", 1000)

    def run(sizes, **kw):
        calls["mm"].clear()
        calls["exp"] = 0
        monkeypatch.setattr(torch, "mm", lambda u, v, out: calls["mm"].append((tuple(u.shape), tuple(v.shape)))
                            or real_mm(u, v, out=out))
        monkeypatch.setattr(torch, "exp", lambda t, out: calls.__setitem__("exp", calls["exp"] + t.numel())
                            or real_exp(t, out=out))
        bs.floor_impl(sizes, 4, **kw)()
        monkeypatch.setattr(torch, "mm", real_mm)
        monkeypatch.setattr(torch, "exp", real_exp)
        return list(calls["mm"]), calls["exp"]

    mm, n_exp = run([(3, 5, 7)], debias=False, backward=False)
    assert mm == [((3, 4), (4, 5))] and n_exp == 7 * 2 * 15
    mm, n_exp = run([(3, 5, 7), (2, 2, 1)], debias=True, backward=True)
    assert len(mm) == 2 * 7 and ((3, 5), (5, 4)) in mm and ((5, 3), (3, 4)) in mm
    assert n_exp == (7 + 1) * (2 * 15 + 9 + 25) + (1 + 1) * (2 * 4 + 4 + 4)
    assert run([(3, 5, 2)], debias=False, backward=False, plans=True)[1] == 2 * 30 + 15

    x = torch.randn(2, 6, 4)
    y = torch.randn(2, 5, 4)
    xm = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    ym = torch.ones(2, 5, dtype=torch.bool)
    sizes = bs._our_updates(x, y, xm, ym, eps=0.5, n_iters=50, tol=1e-4)
    its = xlt_fast.sinkhorn(x, y, x_mask=xm, y_mask=ym, eps=0.5, n_iters=50, tol=1e-4, backend="cpu").n_iters
    assert sizes == [(6, 5, int(its[0])), (3, 5, int(its[1]))]
