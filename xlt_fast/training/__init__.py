"""The training layer every trainer shares (ARCHITECTURE.md section 5): configs, the run directory,
phases and steps, checkpoints and resume, seeding, progress, ``torch.distributed``, feature caches.

A trainer is a module with ``Config``, ``build``, ``phases``, ``evaluate`` and ``summary``
(:class:`Trainer`); :func:`train` runs it.
"""
from xlt_fast.training.config import (ConfigError, TrainerConfig, arg, config_hash, load_config,
                                      read_config_file, replace, validate)
from xlt_fast.training.dist import Dist
from xlt_fast.training.features import FeatureCache, default_cache, model_fingerprint
from xlt_fast.training.run import (Context, Phase, Result, State, Stream, Trainer, derive_seed,
                                   generator, read_result, train, warmup_linear)

__all__ = ["ConfigError", "Context", "Dist", "FeatureCache", "Phase", "Result", "State", "Stream",
           "Trainer", "TrainerConfig", "arg", "config_hash", "default_cache", "derive_seed",
           "generator", "load_config", "model_fingerprint", "read_config_file", "read_result",
           "replace", "train", "validate", "warmup_linear"]
