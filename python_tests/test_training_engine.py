"""The training engine on a small synthetic trainer (python_tests/toy_trainer.py): outcomes, the run
directory, resume equals uninterrupted (in process, twice within an epoch, and after a real SIGKILL),
half-written checkpoints, clear failures, seeded streams and 2-process DDP on gloo."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import toy_trainer as toy
from xlt_fast.training import Stream, checkpoint, replace
from xlt_fast.training.config import ConfigError

HERE = Path(__file__).parent


def _cfg(tmp_path, name="run", **kw):
    return replace(toy.ToyConfig(), output_dir=str(tmp_path / name), progress=False, **kw)


def _state(run_dir):
    """The model weights of the last checkpoint of a run."""
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    return torch.load(path / "state.pt", weights_only=True)["modules"]["model"]


def _rows(run_dir):
    """metrics.jsonl without wall times."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(a) == _rows(b)
    ra, rb = (json.loads((Path(d) / "results.json").read_text()) for d in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["steps"] == rb["steps"]


def test_trains_and_writes_run_directory(tmp_path):
    cfg = _cfg(tmp_path, steps_a=60, steps_b=20, log_every=10)
    result = toy.train(cfg)
    run = Path(cfg.output_dir)
    rows = _rows(run)
    losses = [r["loss"] for r in rows if r["split"] == "train" and r["phase"] == "a"]
    assert losses[-1] < 0.7 * losses[0]  # the loss falls
    assert result.metrics["eval"]["accuracy"] > 0.8
    assert result.steps == 80
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["steps_a"] == 60 and "torch" in saved["versions"] and saved["world_size"] == 1
    assert json.loads((run / "results.json").read_text())["steps"] == 80
    assert [r["split"] for r in rows if r["step"] == 60] == ["train", "eval", "enter"]
    assert {p.name for p in (run / "plots").iterdir()} == {"train.png", "eval.png"}
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step-000060", "step-000080"]
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("stops", [(37,), (5, 11), (30,)])
def test_resume_equals_uninterrupted(tmp_path, stops):
    """Stop after N steps (mid-epoch; twice in one epoch; exactly at a phase end), resume, compare
    with a run never interrupted: the same weights bit for bit, the same metrics.jsonl."""
    full = _cfg(tmp_path, "full", checkpoint_every=3, dropout=0.3)
    toy.train(full)
    part = _cfg(tmp_path, "part", checkpoint_every=3, dropout=0.3)
    for i, stop in enumerate(stops):
        assert toy.train(part, resume=i > 0, stop_after=stop) is None
    toy.train(part, resume=True)
    _assert_same_run(full.output_dir, part.output_dir)


def test_resume_after_sigkill(tmp_path):
    """A real kill -9 at an arbitrary moment (after a checkpoint exists), then --resume."""
    args = ["--steps_a", "400", "--steps_b", "400", "--checkpoint_every", "7", "--no_progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = dict(os.environ, PYTHONPATH=f"{HERE}:{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, str(HERE / "toy_trainer.py"), "--output_dir", str(full), *args], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(HERE / "toy_trainer.py"), "--output_dir", str(part), *args], env=env)
    deadline = time.time() + 120
    while checkpoint.latest(part / "checkpoints") is None or len(checkpoint.complete_checkpoints(
            part / "checkpoints")) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "results.json").exists()
    subprocess.run([sys.executable, str(HERE / "toy_trainer.py"), "--output_dir", str(part), "--resume", *args],
                   check=True, env=env)
    _assert_same_run(full, part)


def test_half_written_checkpoint_is_skipped(tmp_path):
    cfg = _cfg(tmp_path, checkpoint_every=5)
    toy.train(cfg, stop_after=20)
    root = Path(cfg.output_dir) / "checkpoints"
    good = checkpoint.latest(root)
    (root / "step-000025.tmp").mkdir()                       # interrupted while filling
    (root / "step-000030").mkdir()                           # renamed but no progress.json (impossible
    torch.save({}, root / "step-000030" / "state.pt")        # by construction, still never used)
    assert checkpoint.latest(root) == good
    toy.train(cfg, resume=True)
    full = _cfg(tmp_path, "full", checkpoint_every=5)
    toy.train(full)
    _assert_same_run(full.output_dir, cfg.output_dir)


def test_resume_refuses_another_config_but_not_run_only_fields(tmp_path):
    cfg = _cfg(tmp_path, checkpoint_every=5)
    toy.train(cfg, stop_after=10)
    with pytest.raises(ValueError, match="another config"):
        toy.train(replace(cfg, lr=0.5), resume=True)
    toy.train(replace(cfg, log_every=7, checkpoint_every=11), resume=True)  # run-only: allowed
    with pytest.raises(FileExistsError, match="complete run"):
        toy.train(cfg)
    assert toy.train(cfg, resume=True).steps == 60  # a complete run resumes to its result


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, checkpoint_every=5)
    toy.train(cfg, stop_after=10)
    with pytest.raises(FileExistsError, match="--resume"):
        toy.train(cfg)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    cfg = _cfg(tmp_path, checkpoint_every=5, nan_at=13)
    with pytest.raises(FloatingPointError, match="a step 13: the loss is not finite"):
        toy.train(cfg)
    saved = _state(cfg.output_dir)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert checkpoint.latest(Path(cfg.output_dir) / "checkpoints").name == "step-000010"


def test_config_is_validated_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="steps_a"):
        toy.train(_cfg(tmp_path, steps_a=0, steps_b=0))
    assert not (tmp_path / "run").exists()


def test_keep_checkpoints_zero_removes_them_at_the_end(tmp_path):
    cfg = _cfg(tmp_path, keep_checkpoints=0, checkpoint_every=4)
    toy.train(cfg)
    assert not checkpoint.complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
    assert (Path(cfg.output_dir) / "results.json").is_file()


def test_stream_is_a_function_of_seed_epoch_and_position():
    a, b = Stream("s", 10, 4, seed=3), Stream("s", 10, 4, seed=3)
    first = [a.next() for _ in range(5)]  # 2 batches per epoch: epochs 0, 0, 1, 1, 2
    assert all(len(x) == 4 for x in first)
    assert torch.equal(torch.cat(first[:2]).unique(), torch.cat(first[:2]).sort().values)  # no repeat in an epoch
    assert not torch.equal(first[0], first[2])  # each epoch has its own order
    b.position = 3
    assert torch.equal(b.next(), first[3])  # resumes from the position alone
    assert not torch.equal(Stream("t", 10, 4, seed=3).next(), first[0])  # streams differ by name
    shares = [Stream("s", 10, 4, seed=3, rank=r, world_size=2).next() for r in (0, 1)]
    assert torch.equal(torch.cat(shares), first[0])  # ranks split the global batch
    with pytest.raises(ValueError, match="divisible"):
        Stream("s", 10, 3, seed=0, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Stream("s", 3, 4, seed=0)


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) at the same global batch equals 1 process within fp32
    rounding of the all-reduce (summation order; observed ~1e-7, tolerance 1e-5). Dropout is off:
    each process draws its own masks, so masks cannot match a 1-process run. Only rank 0 writes."""
    args = ["--steps_a", "20", "--steps_b", "20", "--dropout", "0", "--checkpoint_every", "10", "--no_progress"]
    env = dict(os.environ, PYTHONPATH=f"{HERE}:{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               TOY_WRITES_LOG=str(tmp_path / "writes"))
    script = str(HERE / "toy_trainer.py")
    subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "one"), *args], check=True, env=env)
    shutil.move(tmp_path / "writes.rank0", tmp_path / "writes.single")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    script, "--output_dir", str(tmp_path / "two"), *args], check=True, env=env, timeout=300)
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5)
    m1, m2 = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "two"))
    assert m2["eval"]["loss"] == pytest.approx(m1["eval"]["loss"], abs=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "writes.rank1").read_text()) == []  # rank 1 wrote nothing
    written0 = json.loads((tmp_path / "writes.rank0").read_text())
    assert written0 and all(str(tmp_path / "two") in p for p in written0)
