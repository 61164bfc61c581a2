"""Experiments: the claim rules on constructed records (each verdict reachable), the statistics,
and the IWDA experiment end to end at a tiny size (files written, a second run reuses every run)."""
import json
import math

import numpy as np
import pytest

from xlt_fast.experiments import common
from xlt_fast.experiments import iwda as exp


def _records(delta_da, delta_iw, oracle_gain, correction, shift_drop, n=6, seed=0):
    """Records at TV 0 and 0.6 whose method - ZS differences are the given ones at TV 0.6 (and 0 at TV 0)."""
    rng = np.random.default_rng(seed)
    recs = []
    for tv in (0.0, 0.6):
        for i in range(n):
            noise = rng.normal(0, 0.002, 4)
            d_da = (delta_da + noise[0]) if tv else 0.05 + noise[0]
            d_iw = (delta_iw + noise[1]) if tv else 0.05 + noise[1]
            d_st = -0.03 + noise[2] if tv else 0.04 + noise[2]
            f1 = {"zero_shot": 0.3, "unweighted": 0.3 + d_da, "iwda": 0.3 + d_iw,
                  "iwda_oracle": 0.3 + d_iw + oracle_gain, "self_training": 0.3 + d_st}
            recs.append({"tv": tv, "pool_tv": tv, "f1": f1, "acc": dict(f1),
                         "shift": {m: 10.0 - (shift_drop if m == "iwda" else 0) for m in f1},
                         "shift_rel": {m: 1.0 - (shift_drop / 10 if m == "iwda" else 0) for m in f1},
                         "correction_pct": correction + noise[3] * 100 if tv else None,
                         "tv_est": 0.3, "tv_est_init": 0.35})
    return recs


def test_claims_reproduced_when_the_data_say_so():
    verdicts = [c.verdict for c in exp.claims(_records(-0.05, 0.02, 0.01, 40.0, 2.0))]
    assert verdicts == ["reproduced"] * 6


def test_claims_not_reproduced_when_the_data_contradict():
    claims = exp.claims(_records(0.06, -0.08, -0.02, -30.0, -2.0))  # DA-noIW gains more at TV 0.6 than at 0
    assert [c.verdict for c in claims] == ["not reproduced"] * 6
    assert all(c.paper and c.ours and c.rule for c in claims)


def test_mean_ci_and_sign_verdict():
    ci = common.mean_ci([1.0, 2.0, 3.0])  # t(0.975, 2) = 4.3027, sd 1
    assert ci.mean == 2.0 and ci.low == pytest.approx(2 - 4.302653 / math.sqrt(3), rel=1e-5)
    assert common.sign_verdict(ci, +1) == "consistent"  # the interval holds 0
    assert common.sign_verdict(common.mean_ci([1.0, 1.1, 0.9]), +1) == "reproduced"
    assert common.sign_verdict(common.mean_ci([1.0, -0.5, 0.2]), +1) == "consistent"
    assert common.sign_verdict(common.mean_ci([1.0, -0.5, 0.2]), -1) == "not reproduced"
    assert common.sign_verdict(common.mean_ci([]), +1) == "not reproduced"


TINY = exp.Settings(n_languages=1, selection_verses=40, classes=("law",), ts=(0.75,), seeds=(0, 1),
                    sweep=((0.5, "one"), (5e-3, "lambda_da")), sweep_seeds=(0,),
                    config=dict(n_source=320, n_target=200, n_test=100, n_dev=64, n_source_eval=64, batch_size=16,
                                critic_hidden=64, zs_epochs=1.0, epochs=1.0, st_epochs=1.0, st_iterations=2),
                    workers=1)


def test_iwda_experiment_end_to_end(tmp_path):
    claims = exp.run(tmp_path, progress=False, settings=TINY)
    assert len(claims) == 6 and all(c.verdict in ("reproduced", "consistent", "not reproduced") for c in claims)
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert [c["claim"][:2] for c in saved] == ["R1", "R2", "R3", "R4", "R5", "R6"]
    assert set(saved[0]) == {"claim", "paper", "ours", "verdict", "rule"}
    md = (tmp_path / "claims.md").read_text()
    assert md.count("\n| R") == 6 and "| claim | paper | ours | verdict |" in md
    details = json.loads((tmp_path / "details.json").read_text())
    assert len(details["language_selection"]) == 12 and details["targets"] == [details["language_selection"][
        int(np.argmax([r["gap"] for r in details["language_selection"]]))]["language"]]
    assert details["lambda_choice"][details["targets"][0]]["lambda_da"] in (0.5, 5e-3)
    assert len(details["records"]) == 2 * 2  # 2 priors x 2 seeds
    assert (tmp_path / "iwda_prior_shift.png").stat().st_size > 10_000
    runs = sorted(p.parent for p in tmp_path.glob("runs/**/results.json"))
    assert len(runs) == 2 + 2 + 2 * 2 * 6  # zero-shot models, sweep, grid (6 methods)
    again = exp.run(tmp_path, progress=False, settings=TINY)  # every run is reused
    assert [c.ours for c in again] == [c.ours for c in claims]
    assert json.loads((tmp_path / "details.json").read_text())["times"]["total_s"] < details["times"]["total_s"]
