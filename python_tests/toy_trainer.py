"""A small trainer on synthetic data that exercises every part of the engine (two phases, an
``enter`` hook, dropout, a generator-drawn quantity, two optimizers, a scheduler, DDP), fast enough
to run many times in the engine's tests. Also a command-line entry for subprocess tests:
``python python_tests/toy_trainer.py --output_dir DIR [--resume] [--field value ...]``."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from xlt_fast.training import Context, Phase, State, TrainerConfig, arg, generator, warmup_linear


@dataclasses.dataclass
class ToyConfig(TrainerConfig):
    variant: str = arg("toy", "the only variant")
    n: int = arg(256, "training examples", ge=8)
    batch_size: int = arg(16, "examples per step", ge=1)
    steps_a: int = arg(30, "steps of phase a", ge=0)
    steps_b: int = arg(30, "steps of phase b", ge=0)
    lr: float = arg(1e-2, "learning rate", gt=0)
    dropout: float = arg(0.2, "dropout", ge=0, lt=1)
    noise: float = arg(0.1, "std of the generator-drawn input noise in phase b", ge=0)
    nan_at: int = arg(0, "if > 0, phase a returns a NaN loss at this step", ge=0)

    def check(self) -> list[str]:
        problems = super().check()
        if self.steps_a + self.steps_b == 0:
            problems.append("steps_a: steps_a + steps_b must be > 0")
        return problems


Config = ToyConfig


def build(cfg: ToyConfig, ctx: Context) -> State:
    g = generator(cfg.seed, "data")
    x = torch.randn(cfg.n + 64, 8, generator=g)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(32, 2))
    ctx.stream("a/data", cfg.n, cfg.batch_size)
    ctx.stream("b/data", cfg.n, cfg.batch_size)
    opt_a = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    opt_b = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    return State(modules={"model": model}, optimizers={"a": opt_a, "b": opt_b},
                 schedulers={"a": warmup_linear(opt_a, max(cfg.steps_a, 1), 0.1)},
                 generators={"noise": generator(cfg.seed, "noise")},
                 data={"x": x[:cfg.n], "y": y[:cfg.n], "x_eval": x[cfg.n:], "y_eval": y[cfg.n:]},
                 parallel={"model": ctx.wrap(model)})


def _loss(state: State, ctx: Context, stream: str, noise: float) -> torch.Tensor:
    idx = state.streams[stream].next()
    x = state.data["x"][idx]
    if noise:  # drawn for the global batch, then this process's share
        x = x + noise * ctx.share(torch.randn(ctx.cfg.batch_size, 8, generator=state.generators["noise"]))
    return F.cross_entropy(state.parallel["model"](x), state.data["y"][idx])


def phases(cfg: ToyConfig, state: State) -> list[Phase]:
    def step_a(state: State, ctx: Context) -> dict[str, float]:
        loss = _loss(state, ctx, "a/data", 0.0)
        if cfg.nan_at and state.phase_step + 1 == cfg.nan_at:
            loss = loss * float("nan")
        ctx.update(loss, ["a"])
        return {"loss": loss.item()}

    def step_b(state: State, ctx: Context) -> dict[str, float]:
        loss = _loss(state, ctx, "b/data", cfg.noise)
        ctx.update(loss, ["b"])
        return {"loss": loss.item()}

    def enter_b(state: State, ctx: Context) -> dict[str, float]:
        return {"weight_norm": float(sum(p.detach().norm() for p in state.modules["model"].parameters()))}

    return [Phase("a", cfg.steps_a, step_a), Phase("b", cfg.steps_b, step_b, enter=enter_b)]


@torch.no_grad()
def evaluate(state: State, ctx: Context) -> dict[str, dict[str, float]]:
    model = state.modules["model"].eval()
    logits = model(state.data["x_eval"])
    model.train()
    return {"eval": {"loss": F.cross_entropy(logits, state.data["y_eval"]).item(),
                     "accuracy": (logits.argmax(1) == state.data["y_eval"]).float().mean().item()}}


def summary(state: State, ctx: Context) -> dict:
    return {"steps": state.step}


def train(cfg: ToyConfig, resume: bool = False, stop_after: int | None = None):
    from xlt_fast.training import train as run

    return run(sys.modules[__name__], cfg, resume=resume, stop_after=stop_after)


def main(argv: list[str]) -> None:
    """Command-line run; with ``TOY_WRITES_LOG`` set, each rank appends the files the library wrote."""
    from xlt_fast.training import atomic, load_config

    log = os.environ.get("TOY_WRITES_LOG")
    if log:
        written = []
        original = atomic._write

        def recording(path, write, mode):
            written.append(str(path))
            original(path, write, mode)
        atomic._write = recording
    resume = "--resume" in argv
    cfg = load_config(ToyConfig, None, [a for a in argv if a != "--resume"])
    train(cfg, resume=resume)
    if log:
        with open(f"{log}.rank{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(written, f)


if __name__ == "__main__":
    main(sys.argv[1:])
