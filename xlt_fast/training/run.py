"""The training engine every trainer shares: run directory, phases and steps, data streams,
updates, logging, evaluation, checkpoints and resume, seeding, progress bars, distribution.

A trainer module provides three functions and the engine does the rest:

* ``build(cfg, ctx) -> State``: models, optimizers, schedulers, generators and data;
* ``phases(cfg, state) -> list[Phase]``: each phase a number of steps and a ``step(state, ctx)``
  that computes losses and calls ``ctx.update(loss, optimizer_names)``; an optional ``enter``
  runs once when the phase starts (not again when a run resumes inside it);
* ``evaluate(state, ctx) -> {split: {metric: value}}``.

Randomness is a function of ``cfg.seed``: the model is built after seeding the global RNG with
``derive_seed(seed, "build")``; each phase reseeds it with ``derive_seed(seed, "phase", name,
rank)`` when it starts (dropout), so a phase's randomness does not depend on what ran before it;
data order comes from :class:`Stream` (a permutation per epoch seeded by (seed, stream, epoch));
anything else sampled draws from a ``torch.Generator`` held in ``state.generators``. Hence a run
resumed from a checkpoint reaches the same result as one never interrupted.

Run directory (written by rank 0 only, every file atomically): ``config.json``, ``metrics.jsonl``,
``results.json`` (written last: its presence means the run is complete), ``checkpoints/``,
``plots/``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from xlt_fast.training import atomic, checkpoint, plots
from xlt_fast.training.config import TrainerConfig, config_hash, to_dict, validate
from xlt_fast.training.dist import Dist

Metrics = dict[str, dict[str, Any]]


def derive_seed(seed: int, *names: Any) -> int:
    """A 63-bit seed derived from ``seed`` and the names of what it seeds."""
    text = "/".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *names: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *names))


def warmup_linear(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor ``t / w`` for the first ``w = warmup_ratio * steps`` steps, then linear decay to 0 at
    ``steps`` (the schedule of seed 000 C.2; ``warmup_ratio = 0``: linear decay from the start).
    A pure function of the step count, so it resumes from the scheduler's state alone."""
    warmup = int(warmup_ratio * steps)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return max(0.0, (steps - t) / max(1, steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Stream:
    """Batches of indices into ``size`` items: epoch ``e`` is the permutation seeded by
    ``(seed, name, e)``, cut into ``size // batch_size`` batches (the rest of the epoch is dropped),
    and the stream cycles through epochs forever. Batch ``b`` is a pure function of ``b``, so a
    stream resumes from its ``position`` alone. In a multi-process job every rank computes the same
    global batch and takes its contiguous share."""

    def __init__(self, name: str, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or size < batch_size:
            raise ValueError(f"stream {name!r}: batch_size must be in 1..{size} (the number of items), got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"stream {name!r}: batch_size {batch_size} must be divisible by the number of "
                             f"processes ({world_size})")
        self.name, self.size, self.batch_size, self.seed = name, size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def global_batch(self, b: int) -> torch.Tensor:
        epoch, i = divmod(b, self.batches_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.size, generator=generator(self.seed, "stream", self.name, epoch))
            self._epoch = epoch
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def next(self) -> torch.Tensor:
        """This rank's share of the next batch."""
        batch = self.global_batch(self.position)
        self.position += 1
        share = self.batch_size // self.world_size
        return batch[self.rank * share:(self.rank + 1) * share]

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch


@dataclasses.dataclass
class Phase:
    """``steps`` calls of ``step(state, ctx) -> {name: float}`` (logged, averaged over log windows)."""

    name: str
    steps: int
    step: Callable[["State", "Context"], dict[str, float]]
    enter: Callable[["State", "Context"], dict[str, Any] | None] | None = None


@dataclasses.dataclass
class State:
    """Everything a run needs. ``modules``, ``optimizers``, ``schedulers``, ``generators`` and the
    streams' positions are saved in checkpoints; ``data`` (datasets, features) is rebuilt by
    ``build`` and never saved, so it must not change during training; ``parallel`` holds the
    modules as the forward pass calls them (``ctx.wrap``: ``DistributedDataParallel`` across
    processes), sharing parameters with ``modules``."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    schedulers: dict[str, Any] = dataclasses.field(default_factory=dict)
    generators: dict[str, torch.Generator] = dataclasses.field(default_factory=dict)
    streams: dict[str, Stream] = dataclasses.field(default_factory=dict)
    data: Any = None
    parallel: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # modules as the forward calls them
    step: int = 0              # optimisation steps done, all phases together
    phase: str = ""
    phase_step: int = 0        # steps done in the current phase
    window: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # values since the last log line

    def payload(self, with_optimizers: bool) -> dict[str, Any]:
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()} if with_optimizers else {},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "generators": {k: g.get_state() for k, g in self.generators.items()}}

    def load_payload(self, payload: dict[str, Any], with_optimizers: bool) -> None:
        _same_keys("modules", self.modules, payload["modules"])
        for k, m in self.modules.items():
            m.load_state_dict(payload["modules"][k])
        if with_optimizers:
            _same_keys("optimizers", self.optimizers, payload["optimizers"])
            for k, o in self.optimizers.items():
                o.load_state_dict(payload["optimizers"][k])
        _same_keys("schedulers", self.schedulers, payload["schedulers"])
        for k, s in self.schedulers.items():
            s.load_state_dict(payload["schedulers"][k])
        _same_keys("generators", self.generators, payload["generators"])
        for k, g in self.generators.items():
            g.set_state(payload["generators"][k])


def _same_keys(what: str, have: dict, saved: dict) -> None:
    if set(have) != set(saved):
        raise RuntimeError(f"checkpoint {what} {sorted(saved)} do not match this run's {sorted(have)}")


class Context:
    """What a trainer may use from the engine: the config, the device, the processes, updates,
    streams, sharded prediction, logging of extra metrics, the run directory."""

    def __init__(self, cfg: TrainerConfig, dist: Dist, run_dir: Path) -> None:
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.device = dist.device
        self.state: State | None = None
        self.streams: dict[str, Stream] = {}

    def attach(self, state: "State") -> "State":
        """Make ``state`` this context's state, with the streams :meth:`stream` made while building it."""
        state.streams.update(self.streams)
        self.state = state
        return state

    def stream(self, name: str, size: int, batch_size: int) -> Stream:
        """A seeded data stream; the engine saves its position in checkpoints."""
        s = Stream(name, size, batch_size, self.cfg.seed, self.dist.rank, self.dist.world_size)
        self.streams[name] = s
        return s

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the rows of a global batch (everything random is drawn
        for the global batch on every process, then shared out, so 1 and N processes see the same)."""
        if batch.shape[0] % self.dist.world_size:
            raise ValueError(f"a global batch of {batch.shape[0]} rows cannot be split over {self.dist.world_size} "
                             f"processes")
        n = batch.shape[0] // self.dist.world_size
        return batch[self.dist.rank * n:(self.dist.rank + 1) * n]

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module as the forward pass should call it (``DistributedDataParallel`` across processes)."""
        return self.dist.wrap(module)

    def update(self, loss: torch.Tensor, optimizers: Sequence[str], parts: dict[str, float] | None = None) -> None:
        """One optimisation step: backward of ``loss``, then step the named optimizers and their
        schedulers. A non-finite loss stops the run with an error (the last checkpoint stays intact)."""
        self.zero_grad(optimizers)
        self.backward(loss, parts)
        self.step(optimizers)

    def zero_grad(self, optimizers: Sequence[str]) -> None:
        for name in optimizers:
            self.state.optimizers[name].zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, parts: dict[str, float] | None = None) -> None:
        """Accumulate the gradients of ``loss`` (gradient accumulation: :meth:`zero_grad`, several
        ``backward`` calls, one :meth:`step`). A non-finite loss stops the run before any update."""
        if self.dist.any(not bool(torch.isfinite(loss.detach()))):
            detail = ", ".join(f"{k}={v:.4g}" for k, v in (parts or {}).items())
            raise FloatingPointError(f"{self.state.phase} step {self.state.phase_step + 1}: the loss is not finite "
                                     f"({float(loss.detach()):.4g}{'; ' + detail if detail else ''}); stopping before the "
                                     f"model is updated. Lower the learning rates or check the inputs.")
        loss.backward()

    def step(self, optimizers: Sequence[str]) -> None:
        """Step the named optimizers on the accumulated gradients, then their schedulers."""
        for name in optimizers:
            self.state.optimizers[name].step()
            if name in self.state.schedulers:
                self.state.schedulers[name].step()

    @torch.no_grad()
    def predict(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int = 512) -> torch.Tensor:
        """``fn(indices)`` over ``0..n-1`` in batches, each process its shard, gathered: the rows of
        all ``n`` items, identical on every rank."""
        start, stop = self.dist.shard(n)
        parts = [fn(torch.arange(a, min(a + batch_size, stop))) for a in range(start, stop, batch_size)]
        if not parts:
            parts = [fn(torch.arange(0, 1))[:0]]
        return self.dist.gather_rows(torch.cat(parts), n)


class Trainer(Protocol):
    """A trainer module (``xlt_fast.trainers.<method>``)."""

    Config: type[TrainerConfig]

    def build(self, cfg: TrainerConfig, ctx: Context) -> State: ...

    def phases(self, cfg: TrainerConfig, state: State) -> list[Phase]: ...

    def evaluate(self, state: State, ctx: Context) -> Metrics: ...

    def summary(self, state: State, ctx: Context) -> dict[str, Any]:
        """What ``results.json`` keeps besides the final metrics (e.g. learned weights)."""


@dataclasses.dataclass
class Result:
    """What ``results.json`` holds."""

    run_dir: str
    config_hash: str
    steps: int
    metrics: Metrics
    info: dict[str, Any]
    run_time_s: float


def versions() -> dict[str, str]:
    import numpy
    import transformers

    import xlt_fast

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "transformers": transformers.__version__, "xlt_fast": xlt_fast.__version__}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            out["commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def read_result(run_dir: str | Path) -> Result | None:
    """The result of a complete run (its ``results.json``), or None."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    return Result(**json.loads(path.read_text()))


class _Log:
    """``metrics.jsonl`` kept in memory and rewritten atomically (rank 0)."""

    def __init__(self, path: Path, main: bool, t0: float) -> None:
        self.path, self.main, self.t0 = path, main, t0
        self.rows: list[dict[str, Any]] = []

    def add(self, state: State, split: str, values: dict[str, Any]) -> None:
        self.rows.append({"step": state.step, "phase": state.phase, "phase_step": state.phase_step,
                          "split": split, "time_s": round(time.perf_counter() - self.t0, 3), **values})
        if self.main:
            atomic.write_jsonl(self.path, self.rows)

    def restore(self, n_rows: int) -> None:
        if self.path.is_file():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = lines[:n_rows]
        if self.main:
            atomic.write_jsonl(self.path, self.rows)


def _prepare_dir(run_dir: Path, cfg: TrainerConfig, resume: bool) -> None:
    if (run_dir / "results.json").is_file() and not resume:
        raise FileExistsError(f"{run_dir} holds a complete run (results.json); pass --resume to reuse it or choose "
                              f"another output_dir")
    if checkpoint.latest(run_dir / "checkpoints") is not None and not resume:
        raise FileExistsError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it or "
                              f"choose another output_dir")
    saved = run_dir / "config.json"
    if resume and saved.is_file():
        old = json.loads(saved.read_text()).get("config_hash")
        if old != config_hash(cfg):
            raise ValueError(f"--resume: {run_dir} was started with another config (hash {old}, this one "
                             f"{config_hash(cfg)}); only run-only fields (output_dir, log_every, ...) may change")


def train(trainer: Trainer, cfg: TrainerConfig, *, resume: bool = False, stop_after: int | None = None) -> Result:
    """Run ``trainer`` on ``cfg`` in ``cfg.output_dir`` (resuming from its latest checkpoint if
    ``resume``) and return its :class:`Result`. ``stop_after`` ends the process's work after that
    many total steps, as if it were killed just after a checkpoint there (for tests)."""
    validate(cfg)
    if not cfg.output_dir:
        raise ValueError(f"{type(cfg).__name__}.output_dir: a run directory is required")
    run_dir = Path(cfg.output_dir)
    if resume and (done := read_result(run_dir)) is not None:
        if done.config_hash != config_hash(cfg):
            raise ValueError(f"--resume: {run_dir} holds a complete run of another config (hash {done.config_hash})")
        return done
    dist = Dist(cfg.device)
    try:
        return _train(trainer, cfg, dist, run_dir, resume, stop_after)
    finally:
        dist.close()


def _train(trainer: Trainer, cfg: TrainerConfig, dist: Dist, run_dir: Path, resume: bool,
           stop_after: int | None) -> Result:
    t0 = time.perf_counter()
    _prepare_dir(run_dir, cfg, resume)
    dist.barrier()
    if dist.is_main:
        atomic.write_json(run_dir / "config.json", {"config": to_dict(cfg), "config_hash": config_hash(cfg),
                                                    "trainer": type(cfg).__name__, "world_size": dist.world_size,
                                                    "versions": versions()})
    ctx = Context(cfg, dist, run_dir)
    torch.manual_seed(derive_seed(cfg.seed, "build"))
    state = ctx.attach(trainer.build(cfg, ctx))
    phases = trainer.phases(cfg, state)
    log = _Log(run_dir / "metrics.jsonl", dist.is_main, t0)
    ckpt_root = run_dir / "checkpoints"
    start_phase, elapsed = 0, 0.0
    found = checkpoint.latest(ckpt_root) if resume else None
    if found is not None:
        start_phase, elapsed = _restore(state, phases, found, cfg, dist, log)
    t0 -= elapsed
    log.t0 = t0
    for index in range(start_phase, len(phases)):
        phase = phases[index]
        if state.phase != phase.name:  # a fresh start of this phase (not a resume inside it)
            state.phase, state.phase_step = phase.name, 0
            torch.manual_seed(derive_seed(cfg.seed, "phase", phase.name, dist.rank))
            if phase.enter is not None:
                info = phase.enter(state, ctx)
                if info:
                    log.add(state, "enter", info)
        if _run_phase(trainer, phase, state, ctx, log, index, stop_after, t0):
            return None  # stopped on purpose (tests): the checkpoint is the result
    if not phases:  # nothing to train (e.g. a model loaded with init_from): evaluate it
        for split, values in trainer.evaluate(state, ctx).items():
            log.add(state, split, values)
    result = Result(str(run_dir), config_hash(cfg), state.step, _last_eval(log), trainer.summary(state, ctx),
                    round(time.perf_counter() - t0, 3))
    if dist.is_main and cfg.plots:
        plots.plot_run(log.rows, run_dir / "plots", title=f"{type(cfg).__name__} {cfg.variant} seed {cfg.seed}")
    if dist.is_main:
        atomic.write_json(run_dir / "results.json", dataclasses.asdict(result))
        if cfg.keep_checkpoints == 0:
            checkpoint.prune(ckpt_root, 0)
    dist.barrier()
    return result


def _last_eval(log: _Log) -> Metrics:
    """The metrics of the last evaluation (the one at the end of the last phase)."""
    last_step = max(r["step"] for r in log.rows if r["split"] not in ("train", "enter"))
    return {r["split"]: {k: v for k, v in r.items() if k not in ("step", "phase", "phase_step", "split", "time_s")}
            for r in log.rows if r["step"] == last_step and r["split"] not in ("train", "enter")}


def _run_phase(trainer: Trainer, phase: Phase, state: State, ctx: Context, log: _Log, index: int,
               stop_after: int | None, t0: float) -> bool:
    cfg, dist = ctx.cfg, ctx.dist
    bar = None
    if cfg.progress and dist.is_main and phase.steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=phase.steps, initial=state.phase_step, desc=f"{cfg.variant}:{phase.name}", leave=False,
                   dynamic_ncols=True)
    window = state.window
    try:
        while state.phase_step < phase.steps:
            values = ctx.dist.mean_values(phase.step(state, ctx))
            state.step += 1
            state.phase_step += 1
            for k, v in values.items():
                window.setdefault(k, []).append(float(v))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]}, refresh=False)
            last = state.phase_step == phase.steps
            if state.phase_step % cfg.log_every == 0 or last:
                log.add(state, "train", {"epoch": _epochs(state), **{k: sum(v) / len(v) for k, v in window.items()}})
                window.clear()
            if last or (cfg.eval_every and state.phase_step % cfg.eval_every == 0):
                for split, values_ in trainer.evaluate(state, ctx).items():
                    log.add(state, split, values_)
            if last or (cfg.checkpoint_every and state.phase_step % cfg.checkpoint_every == 0):
                _save(state, ctx, log, index, t0, last)
            if stop_after is not None and state.step >= stop_after:
                return True
    finally:
        if bar is not None:
            bar.close()
    return False


def _epochs(state: State) -> dict[str, float]:
    return {name: round(s.epoch, 4) for name, s in state.streams.items()}


def _save(state: State, ctx: Context, log: _Log, index: int, t0: float, phase_done: bool) -> None:
    cfg, dist = ctx.cfg, ctx.dist
    rng = dist.gather_objects(checkpoint.rng_state())
    if dist.is_main:
        progress = {"step": state.step, "phase": state.phase, "phase_index": index, "phase_step": state.phase_step,
                    "phase_done": phase_done, "streams": {k: s.position for k, s in state.streams.items()},
                    "metrics_rows": len(log.rows), "log_window": state.window,
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                    "seed": cfg.seed, "world_size": dist.world_size, "config_hash": config_hash(cfg),
                    "with_optimizers": cfg.save_optimizer, "versions": versions()}
        checkpoint.save(ctx.run_dir / "checkpoints", state.step, state.payload(cfg.save_optimizer), rng, progress,
                        max(1, cfg.keep_checkpoints))
    dist.barrier()


def _restore(state: State, phases: list[Phase], path: Path, cfg: TrainerConfig, dist: Dist,
             log: _Log) -> tuple[int, float]:
    """Load checkpoint ``path``; return the index of the phase to run next and the time elapsed."""
    progress = checkpoint.read_progress(path)
    problems = []
    if progress["config_hash"] != config_hash(cfg):
        problems.append(f"config hash {progress['config_hash']} (this config: {config_hash(cfg)})")
    if progress["world_size"] != dist.world_size:
        problems.append(f"world size {progress['world_size']} (this job: {dist.world_size})")
    if not progress["phase_done"] and not progress["with_optimizers"]:
        problems.append("no optimizer states (save_optimizer was false), so it cannot continue mid-phase")
    if problems:
        raise ValueError(f"--resume: checkpoint {path} cannot continue this run: " + "; ".join(problems))
    payload, rng = checkpoint.load(path, dist.rank)
    state.load_payload(payload, progress["with_optimizers"])
    checkpoint.set_rng_state(rng)
    for name, position in progress["streams"].items():
        state.streams[name].position = position
    state.step = progress["step"]
    state.window = {k: list(v) for k, v in progress["log_window"].items()}
    log.restore(progress["metrics_rows"])
    index = progress["phase_index"]
    if progress["phase_done"]:
        return index + 1, progress["elapsed_s"]
    state.phase, state.phase_step = progress["phase"], progress["phase_step"]
    return index, progress["elapsed_s"]
