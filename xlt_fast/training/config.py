"""Trainer configs: dataclasses read from a JSON/TOML file, overridden from the command line with
the same field names, and validated before any work starts.

A config is plain data (a dataclass of ints, floats, strings, bools, ``Literal`` choices and lists
of those). Each field is declared with :func:`arg`, which carries its help text and its range
(``ge``/``gt``/``le``/``lt``); :meth:`TrainerConfig.check` adds the cross-field rules. The command
line is built by ``transformers.HfArgumentParser`` from the type hints (``--field value``,
``--flag`` / ``--no_flag`` for bools, several values for a list, choices for a ``Literal``).

Precedence: the dataclass defaults, then the file, then the command line. Every problem (an
unknown key, a wrong type, a value out of range, a failed cross-field rule) is collected and raised
as one :class:`ConfigError` that names each field, where its value came from and what was expected.

Run-only fields (``run_only=True``: where to write, how often to log or save) do not change the
result; they are left out of :func:`config_hash`, so they may differ when a run is resumed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from transformers import HfArgumentParser

from xlt_fast.models.e5_offline import E5_NAME

_META = "xlt_fast"  # our key in a field's metadata (ranges, run_only); hidden from argparse
C = TypeVar("C", bound="TrainerConfig")


class ConfigError(ValueError):
    """One or more invalid config values; ``problems`` lists one message per problem."""

    def __init__(self, config: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {config} ({len(self.problems)} problem{'s' * (len(self.problems) > 1)}):\n{lines}")


def arg(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, run_only: bool = False) -> Any:
    """A config field: default, help text (say where a value comes from, e.g. "[paper] C.2"), range."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, _META: {"bounds": bounds, "run_only": run_only}}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainerConfig:
    """Fields every trainer has; a trainer's config subclasses this and narrows ``variant``."""

    variant: str = arg("default", "which variant of the method to train")
    source_lang: str = arg("en", "language of the labelled source data")
    target_lang: str = arg("de", "language of the unlabelled target data")
    seed: int = arg(0, "the one seed: model init, data order, dropout and every sampled quantity", ge=0)
    encoder: str = arg(E5_NAME, "Hugging Face encoder name or local path (default: the offline e5-small)")
    device: str = arg("cpu", "torch device: cpu, cuda, cuda:1, ...")
    max_steps: int = arg(0, "if > 0, cap the optimisation steps of every training phase (for short runs)", ge=0)
    output_dir: str = arg("", "run directory (config.json, metrics.jsonl, results.json, checkpoints/, plots)",
                          run_only=True)
    log_every: int = arg(50, "steps between training-loss lines in metrics.jsonl", ge=1, run_only=True)
    eval_every: int = arg(0, "steps between evaluations (0: at the end of each phase only)", ge=0, run_only=True)
    checkpoint_every: int = arg(0, "steps between checkpoints (0: at the end of each phase only)", ge=0,
                                run_only=True)
    keep_checkpoints: int = arg(2, "checkpoints kept (the newest ones); 0: none once the run is complete", ge=0,
                                run_only=True)
    save_optimizer: bool = arg(True, "store optimizer states in checkpoints (needed to resume mid-phase)",
                               run_only=True)
    progress: bool = arg(True, "tqdm progress bars (rank 0 only)", run_only=True)
    plots: bool = arg(True, "write plots/train.png and plots/eval.png at the end", run_only=True)

    def check(self) -> list[str]:
        """Cross-field rules and assets, as messages ``"field: problem"``; override and extend."""
        problems = []
        if self.device != "cpu" and not self.device.startswith("cuda"):
            problems.append(f"device: expected 'cpu' or 'cuda[:i]', got {self.device!r}")
        return problems


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _bounds(f: dataclasses.Field) -> dict[str, float]:
    return f.metadata.get(_META, {}).get("bounds", {})


def run_only_fields(cls: type) -> set[str]:
    """Names of the fields that do not change the result (excluded from the config hash)."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(_META, {}).get("run_only")}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for (ints are accepted as floats); ``TypeError`` if it is not."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, typing.get_args(hint)[0]) for v in value]
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint}")
    hint_text = " (write numbers without quotes)" if isinstance(value, str) and hint in (int, float) else ""
    raise TypeError(f"expected {_describe(hint)}, got {value!r}{hint_text}")


def _range_problem(value: Any, bounds: dict[str, float]) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for key, limit, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                               ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
            if key in bounds and not ok(v, bounds[key]):
                return f"must be {limit} {bounds[key]}, got {v}"
    return None


def validate(cfg: C, origins: dict[str, str] | None = None, problems: list[str] | None = None) -> C:
    """Check types, ranges and ``cfg.check()``; return ``cfg`` with ints made floats where a float is
    asked for, or raise one :class:`ConfigError` listing every problem (and ``problems`` given)."""
    problems = list(problems or [])
    origins = origins or {}
    hints = _type_hints(type(cfg))
    probe = copy.copy(cfg)  # the cross-field rules see the default in place of a mistyped value
    for f in dataclasses.fields(cfg):
        where = f" (from {origins[f.name]})" if f.name in origins else ""
        value = getattr(cfg, f.name)
        try:
            value = _coerce(value, hints[f.name])
        except TypeError as exc:
            problems.append(f"{f.name}{where}: {exc}")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(probe, f.name, default)
            continue
        setattr(cfg, f.name, value)
        setattr(probe, f.name, value)
        bad = _range_problem(value, _bounds(f))
        if bad:
            problems.append(f"{f.name}{where}: {bad}")
    problems += probe.check()
    if problems:
        raise ConfigError(type(cfg).__name__, problems)
    return cfg


class _Invalid:
    """A command-line value that failed its type conversion (the problem is already recorded)."""


class _Parser(HfArgumentParser):
    """HfArgumentParser that records every unreadable value instead of exiting at the first one, leaves
    unset fields out of the namespace (so file values are not overwritten by defaults) and never
    reads a ``<script>.args`` file."""

    def __init__(self, cls: type, problems: list[str], for_help: bool = False) -> None:
        self.problems = problems
        super().__init__(cls, prog=f"xlt-fast train ({cls.__name__})", allow_abbrev=False)
        for action in self._actions:
            if action.dest == "help" or for_help:
                continue
            action.default = argparse.SUPPRESS
            action.required = False
            if action.type is not None:
                action.type = self._recording(action.dest, action.type)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        stripped = copy.copy(field)
        meta = {k: v for k, v in field.metadata.items() if k != _META}
        if "help" in meta:  # argparse formats help with %
            meta["help"] = meta["help"].replace("%", "%%")
        stripped.metadata = types.MappingProxyType(meta)
        HfArgumentParser._parse_dataclass_field(parser, stripped)

    def _recording(self, name: str, convert):
        def run(text: str):
            try:
                return convert(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                self.problems.append(f"{name} (from the command line): cannot read {text!r} as "
                                     f"{getattr(convert, '__name__', 'the field type')}")
                return _Invalid()
        return run

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """Choices are checked with every other value by :func:`validate`."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError("command line", [message])


def config_help(cls: type) -> str:
    """The ``--help`` text of a config's command line (every field, its type, default and help)."""
    return _Parser(cls, [], for_help=True).format_help()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a ``.json`` or ``.toml`` file (a clear error naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", [f"{path}: no such file"])
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError("config file", [f"{path}: expected a .json or .toml file"])
    except json.JSONDecodeError as exc:
        raise ConfigError("config file", [f"{path}, line {exc.lineno}, column {exc.colno}: {exc.msg}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config file", [f"{path}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError("config file", [f"{path}: the top level must be a table of field = value"])
    return data


def _unknown(key: str, names: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f"{key} ({where}): unknown field" + (f"; did you mean {close[0]!r}?" if close else "")


def load_config(cls: type[C], file: str | Path | None = None, args: Sequence[str] = ()) -> C:
    """The config ``cls`` from its defaults, then ``file`` (JSON/TOML), then ``args`` (``--field value``).

    Raises one :class:`ConfigError` listing every problem, before any work starts.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    problems: list[str] = []
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if file is not None:
        for key, value in read_config_file(file).items():
            if key in names:
                values[key], origins[key] = value, str(file)
            else:
                problems.append(_unknown(key, names, str(file)))
    parser = _Parser(cls, problems)
    namespace, rest = parser.parse_known_args(list(args))
    after_unknown = False
    for token in rest:
        if token.startswith("--"):
            problems.append(_unknown(token[2:].split("=")[0].replace("-", "_"), names, "the command line"))
            after_unknown = True
        elif not after_unknown:  # values of an unknown field are not reported again
            problems.append(f"unexpected command-line value {token!r} (values follow a --field)")
    for key, value in vars(namespace).items():
        if not isinstance(value, _Invalid) and not (isinstance(value, list) and any(isinstance(v, _Invalid) for v in value)):
            values[key], origins[key] = value, "the command line"
        else:
            values.pop(key, None)
    cfg = cls(**values)
    return validate(cfg, origins, problems)


def to_dict(cfg: TrainerConfig) -> dict[str, Any]:
    """Every field, JSON-ready."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: TrainerConfig) -> str:
    """Hash of the fields that change the result (run-only fields excluded): 16 hex digits."""
    skip = run_only_fields(type(cfg))
    data = {k: v for k, v in to_dict(cfg).items() if k not in skip}
    data["__class__"] = type(cfg).__name__
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def replace(cfg: C, **changes: Any) -> C:
    """A validated copy of ``cfg`` with ``changes``."""
    return validate(dataclasses.replace(cfg, **changes))
