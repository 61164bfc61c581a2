"""The IWDA trainer on tiny configs of the real task (frozen e5-small features of Bible verses):
every variant trains, the weights follow the variant, init_from equals one run of all phases,
resume equals uninterrupted, 2 processes equal 1, the usual double-backward step gives the same
losses and gradients, the fine-tuning path trains only the top layers, bad configs fail early."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_encoder import make_tiny_encoder
from xlt_fast.data import GENRES, load_genre_task
from xlt_fast.trainers import iwda
from xlt_fast.training import ConfigError, checkpoint, load_config, replace

TINY = dict(n_source=320, n_target=160, n_test=64, n_dev=64, n_source_eval=64, batch_size=16, zs_epochs=1.0,
            epochs=1.0, st_epochs=1.0, critic_hidden=64, progress=False, plots=False, target_lang="ko",
            target_priors=["peaked:law:0.5"], lambda_da=0.5, critic_scale="one", log_every=5)


def _cfg(tmp_path, name, **kw):
    return replace(iwda.IWDAConfig(), **{**TINY, "output_dir": str(tmp_path / name), **kw})


def _model(run_dir, module="model"):
    return torch.load(checkpoint.latest(Path(run_dir) / "checkpoints") / "state.pt",
                      weights_only=True)["modules"][module]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", ["zero_shot", "iwda", "iwda_oracle", "unweighted", "self_training",
                                     "iwda_self_training"])
def test_variants_train(tmp_path, variant):
    cfg = _cfg(tmp_path, variant, variant=variant)
    result = iwda.train(cfg)
    phases = {"zero_shot": 1, "iwda": 2, "iwda_oracle": 2, "unweighted": 2, "self_training": 2,
              "iwda_self_training": 3}[variant]
    assert result.steps == 20 * phases
    test = result.metrics["target_test"]
    assert 0 <= test["macro_f1"] <= 1 and test["tv_shift"] == pytest.approx(0.405, abs=0.01)
    assert test["feature_shift"] > 0
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
    if variant in iwda.ALIGNED:
        w = np.array(result.info["w"])
        prior = np.array(result.info["source_prior"])
        assert (w >= 0).all() and prior @ w == pytest.approx(1)
        if variant == "unweighted":
            np.testing.assert_allclose(w, 1)
        if variant == "iwda_oracle":
            np.testing.assert_allclose(w, np.array(result.info["target_prior"]) / prior)
            # the pool holds the target prior rounded to counts out of 160: nearly all of the shift corrected
            assert result.metrics["iw"]["correction_pct"] == pytest.approx(100, abs=5)
        if variant.startswith("iwda") and variant != "iwda_oracle":
            enter = next(r for r in rows if r["split"] == "enter")
            assert len(enter["w_qp"]) == len(GENRES) and enter["w0"] != enter["w_qp"]
            assert not np.allclose(w, enter["w0"])  # the weights were updated


def test_alternating_critic_steps(tmp_path):
    """n_critic = 2 (App. A.2): two critic-only steps on fresh batches per feature step."""
    result = iwda.train(_cfg(tmp_path, "alt", variant="iwda", n_critic=2, checkpoint_every=20))
    progress = json.loads((checkpoint.latest(Path(result.run_dir) / "checkpoints") / "progress.json").read_text())
    assert result.steps == 40 and progress["streams"]["iwda/source"] == 3 * 20
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all("critic_steps_w1" in r for r in rows if r["split"] == "train" and r["phase"] == "iwda")


def test_zero_shot_learns(tmp_path):
    result = iwda.train(_cfg(tmp_path, "zs", variant="zero_shot", zs_epochs=6.0, n_source_eval=400))
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    assert result.metrics["source_dev"]["accuracy"] > 0.35  # the largest class holds 24% of the dev verses


def test_init_from_equals_one_run(tmp_path):
    """zero_shot run + iwda(init_from) == iwda in one run, bit for bit (phases draw their own streams
    and reseed on entry); zero_shot(init_from) only evaluates the loaded model."""
    one = iwda.train(_cfg(tmp_path, "one", variant="iwda"))
    zs = iwda.train(_cfg(tmp_path, "zs", variant="zero_shot"))
    two = iwda.train(_cfg(tmp_path, "two", variant="iwda", init_from=zs.run_dir))
    assert two.steps == 20
    for module in ("model", "critic", "iw"):
        _same(_model(one.run_dir, module), _model(two.run_dir, module))
    assert one.metrics == two.metrics
    again = iwda.train(_cfg(tmp_path, "eval", variant="zero_shot", init_from=zs.run_dir, keep_checkpoints=1))
    assert again.steps == 0 and again.metrics["target_test"] == zs.metrics["target_test"]
    with pytest.raises(ConfigError, match="differing fields: \\['zs_lr'\\]"):
        iwda.train(_cfg(tmp_path, "bad", variant="iwda", init_from=zs.run_dir, zs_lr=0.5))


def test_resume_inside_the_iwda_phase(tmp_path):
    full = iwda.train(_cfg(tmp_path, "full", variant="iwda_self_training", checkpoint_every=3))
    part = _cfg(tmp_path, "part", variant="iwda_self_training", checkpoint_every=3)
    assert iwda.train(part, stop_after=27) is None  # inside the IWDA phase (steps 21-40)
    assert iwda.train(part, resume=True, stop_after=47) is None  # inside self-training
    resumed = iwda.train(part, resume=True)
    for module in ("model", "critic", "iw", "pseudo"):
        _same(_model(full.run_dir, module), _model(resumed.run_dir, module))
    assert full.metrics == resumed.metrics


@pytest.mark.parametrize("normalize", ["n", "sum_w"])
def test_two_processes_match_one(tmp_path, normalize):
    """torchrun, 2 CPU processes on gloo, the same global batch: equal to 1 process within fp32
    all-reduce rounding (tolerance 1e-4 after 40 steps of Adam); the EMA statistics of the weights
    are summed over the processes before each update, so w matches too, and the sum_w normalisation
    of the critic's source term divides by the global sum. Dropout off (per-process masks).

    With sum_w the source coefficients sum to exactly 1, so the critic's biases get a gradient that
    is zero up to rounding, and Adam turns that rounding into steps of its lr: there the critic is
    compared at Adam's scale (1e-3 over 20 steps of lr 5e-4), everything else at 1e-4."""
    args = ["train", "iwda"] + [f"--{k}={v}" if not isinstance(v, list) else f"--{k}={v[0]}" for k, v in TINY.items()
                                if not isinstance(v, bool)] + ["--no_progress", "--no_plots", "--dropout", "0",
                                                               "--critic_normalize", normalize]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "xlt_fast.cli"]
    subprocess.run(cli + args + ["--output_dir", str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "xlt_fast.cli"] + args + ["--output_dir", str(tmp_path / "two")], check=True, env=env, timeout=300)
    for module in ("model", "critic", "iw"):
        a, b = _model(tmp_path / "one", module), _model(tmp_path / "two", module)
        for k in a:
            if normalize == "sum_w" and module == "critic":
                if k.startswith("bias"):
                    continue
                tol = 1e-3
            else:
                tol = 1e-4
            torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=f"{module}.{k}")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["metrics"]["target_test"]["macro_f1"] == pytest.approx(r1["metrics"]["target_test"]["macro_f1"], abs=0.02)
    np.testing.assert_allclose(r2["info"]["w"], r1["info"]["w"], atol=1e-4)


def test_lambda_zero_is_a_source_only_control(tmp_path):
    """lambda_da = 0 trains no critic (it could not change the model) but the stage's source training."""
    result = iwda.train(_cfg(tmp_path, "control", variant="unweighted", lambda_da=0.0))
    zs = iwda.train(_cfg(tmp_path, "zs", variant="zero_shot"))
    before, after = _model(zs.run_dir), _model(result.run_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the model kept training
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all("w1" not in r for r in rows if r["split"] == "train" and r["phase"] == "iwda")
    saved = torch.load(checkpoint.latest(Path(result.run_dir) / "checkpoints") / "state.pt", weights_only=True)
    assert saved["optimizers"]["critic"]["state"] == {}  # the critic never stepped


def test_pooler_only_trained_when_used(tmp_path):
    from xlt_fast.models import EncoderClassifier, load_encoder

    d = make_tiny_encoder(tmp_path / "tiny", ["a b c"], pooler=True)
    mean = EncoderClassifier(load_encoder(str(d), progress=False), 8, "mean", trainable_layers=1)
    assert mean.training and mean.encoder.training  # dropout on from the start
    assert not any(p.requires_grad for p in mean.encoder.pooler.parameters())
    pooled = EncoderClassifier(load_encoder(str(d), progress=False), 8, "pooler", trainable_layers=1)
    assert all(p.requires_grad for p in pooled.encoder.pooler.parameters())
    z, _ = pooled(pooled.collate([(["a b", "c"], torch.arange(2))]))
    assert z.shape == (2, 32) and (z.abs() <= 1).all()  # tanh pooler output
    from transformers import BertModel

    from xlt_fast.models import Encoder

    enc = load_encoder(str(d), progress=False)
    bare = Encoder(BertModel(enc.model.config, add_pooling_layer=False), enc.tokenizer, "bare")
    with pytest.raises(ValueError, match="has no pooler"):
        EncoderClassifier(bare, 8, "pooler", 1)


def test_step_matches_the_double_backward_step():
    """One IWDA step through critic_gp's kernel vs the usual implementation (materialised CDAN input,
    autograd double backward): the same losses and gradients to fp32 rounding (1e-6 relative)."""
    from xlt_fast.benchmarks.bench_trainers import iwda_step

    ours, usual = iwda_step(64, "cpu")(), iwda_step(64, "reference")()
    for a, b in zip(ours, usual):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_finetune_mode_trains_top_layers_only(tmp_path):
    texts = load_genre_task("en", "dev").texts[:200]
    model_dir = make_tiny_encoder(tmp_path / "tiny", texts, layers=3)
    cfg = _cfg(tmp_path, "ft", variant="unweighted", mode="finetune", encoder=str(model_dir), trainable_layers=1,
               n_source=64, n_target=32, n_test=16, n_dev=16, n_source_eval=16, batch_size=8, lr=1e-3, zs_lr=1e-3)
    iwda.train(cfg)
    from safetensors.torch import load_file

    before = load_file(model_dir / "model.safetensors")
    after = _model(cfg.output_dir)
    changed = {k for k in before if not torch.equal(before[k], after[f"encoder.{k}"])}
    assert changed and all(k.startswith("encoder.layer.2.") for k in changed)
    assert not torch.equal(after["h.weight"], torch.zeros_like(after["h.weight"]))


@pytest.mark.parametrize("args,message", [
    (["--target_lang", "xx"], "target_lang: no Bible translation for 'xx'"),
    (["--target_priors", "peaked:nope:0.5"], "target_priors: unknown class 'nope'"),
    (["--source_split", "train_b"], "target_split: must differ from source_split"),
    (["--n_critic", "0", "--lambda_gp", "-1"], "n_critic"),
    (["--n_target", "16", "--batch_size", "32"], "n_target: must be >= batch_size"),
    (["--pooling", "pooler"], "pooling: 'pooler' needs mode='finetune'"),
])
def test_bad_configs_fail_before_work(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(iwda.IWDAConfig, None, args)


def test_infeasible_prior_names_the_fields(tmp_path):
    cfg = _cfg(tmp_path, "big", target_priors=["peaked:apocalyptic:0.9"], n_target=2000)
    with pytest.raises(ConfigError, match="n_target/target_priors: class\\(es\\) \\['apocalyptic'\\]"):
        iwda.train(cfg)
