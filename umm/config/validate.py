"""Strict check of a composed config against the schema, before anything runs.

Hydra's structured configs reject ``lrr=1`` but accept ``+lrr=1`` and ``+torchrun.foo=1`` silently
(reference/ecosystem.md E6), and they cannot say which strings a field accepts. This module:

- ``check_overrides(argv)``: command-line keys against the schema, so a misspelled ``key=value``
  gets a "did you mean" instead of Hydra's advice to add ``+``;
- ``validate(cfg) -> RootConfig``: walks the composed config against the dataclasses (unknown keys,
  ``+key=`` outside the free-form ``Dict`` fields), converts it (types, missing values), checks
  choice-like fields and cross-field rules. Every problem is one ``ConfigError`` naming the full
  key path, the offending value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Dict, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from umm.config.names import PIPELINE_NAMES, RECIPE_NAMES
from umm.config import recompute
from umm.config.ranges import AT_MOST, BOUNDS
from umm.config.schema import MethodConfig, RootConfig
from umm.config.userdata import DataFileError, apply_user_data
from umm.errors import UmmError


class ConfigError(UmmError, ValueError):
    """A config the toolkit will not run; the message says what to change."""


# Choice-like string fields: full key path (``*`` = any key of a free-form map) -> allowed values.
CHOICES: Dict[str, tuple] = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("bf16", "fp32"),
    "train.master_weights": ("auto", "params", "optimizer"),
    "train.attn_backend": ("auto", "sdpa", "flex"),
    "optim.schedule": ("constant", "cosine"),
    "data.on_error": ("raise", "skip"),
    "data.datasets.*.kind": ("t2i", "images", "edit", "interleaved", "vlm", "irg", "unicot", "mdp_t2i", "mdp_edit",
                             "mdp_geo"),
    "launcher.name": ("local", "slurm", "external"),
    "launcher.entrypoint": ("torchrun", "python", "bash"),
    "model.weights": ("ema", "model"),
    "method.recipe": RECIPE_NAMES,
    "torchrun.rdzv_backend": ("c10d", "static", "etcd", "etcd-v2"),
}

# Method keys only some recipes read (key under method -> those recipes): set away from its default
# elsewhere, a key would be silently ignored, so it is an error instead.
RECIPE_KEYS: Dict[str, tuple] = {
    "template_prompt": ("reca",),
    "templates_file": ("reca",),
    "think_drop": ("unicot",),
    "chain_text_loss": ("unicot",),
    "lora.enabled": ("unicot",),
}

# Config groups: `group=option` on the command line picks a file (Hydra checks the option exists).
GROUPS = ("pipeline", "method", "model", "data", "optim", "train", "torchrun", "launcher", "logger")


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp) -> Optional[type]:
    """The dataclass behind a field type (``Optional[X]`` included), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _dict_value_type(tp) -> Optional[Any]:
    """For ``Dict[str, X]`` the X, else None (such fields are the free-form nodes)."""
    if typing.get_origin(tp) in (dict, Dict):
        return typing.get_args(tp)[1]
    return None


def _unknown(path: str, key: str, value: Any, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    where = f"'{path}'" if path else "the root config"
    return ConfigError(
        f"unknown key '{full}' (value: {value!r}).{hint} Valid keys of {where}: {', '.join(valid)}. "
        f"New keys (also with +) are accepted only in free-form maps: {', '.join(free_form_paths())}."
    )


def free_form_paths(cls=RootConfig, prefix: str = "") -> List[str]:
    """Key paths of the ``Dict[str, ...]`` fields, where ``+key=`` may add entries."""
    out = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        if _dict_value_type(tp) is not None:
            out.append(path)
        elif _dataclass_of(tp):
            out.extend(free_form_paths(_dataclass_of(tp), path + "."))
    return out


def _walk(node: DictConfig, cls, path: str) -> None:
    hints = _hints(cls)
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key not in hints:
            raise _unknown(path, key, _raw(node, key), hints)
        sub = node._get_node(key)
        tp = hints[key]
        inner = _dataclass_of(tp)
        if inner is not None and isinstance(sub, DictConfig) and not sub._is_none():
            _walk(sub, inner, full)
            continue
        value_tp = _dict_value_type(tp)
        if value_tp is not None and _dataclass_of(value_tp) and isinstance(sub, DictConfig):
            for k in sub.keys():
                entry = sub._get_node(k)
                if isinstance(entry, DictConfig):
                    _walk(entry, _dataclass_of(value_tp), f"{full}.{k}")


def _raw(node: DictConfig, key: str) -> Any:
    value = node._get_node(key)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value._value()


def _check_choices(obj: RootConfig) -> None:
    for path, allowed in CHOICES.items():
        for full, value in _values_at(obj, path.split(".")):
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{full} = {value!r} is not a valid choice.{hint} Choose one of: {', '.join(allowed)}.")


def _check_ranges(obj: RootConfig) -> None:
    """Numbers a run cannot work with (umm/config/ranges.py)."""
    for path, bound in BOUNDS.items():
        for full, value in _values_at(obj, path.split(".")):
            problem = None if value is None else bound.problem(value)  # null: the feature is off
            if problem:
                raise ConfigError(f"{full} = {value!r} {problem}.")
    for small, large in AT_MOST:
        (_, lo), (_, hi) = next(_values_at(obj, small.split("."))), next(_values_at(obj, large.split(".")))
        if lo > hi:
            raise ConfigError(f"{small} = {lo} is more than {large} = {hi}, the most tokens a batch holds: "
                              f"raise {large} or lower {small}.")


def _values_at(obj: Any, parts: List[str], prefix: str = ""):
    if not parts:
        yield prefix.rstrip("."), obj
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        for k, v in obj.items():
            yield from _values_at(v, rest, f"{prefix}{k}.")
    else:
        yield from _values_at(getattr(obj, head), rest, f"{prefix}{head}.")


def _check_rules(cfg: RootConfig) -> None:
    """Cross-field rules a run would otherwise trip over late (or in a child process)."""
    t = cfg.torchrun
    for name in ("nnodes", "nproc_per_node"):
        if getattr(t, name) < 1:
            raise ConfigError(f"torchrun.{name} = {getattr(t, name)} must be at least 1.")
    if not 0 <= t.node_rank < t.nnodes:
        raise ConfigError(f"torchrun.node_rank = {t.node_rank} must be in [0, torchrun.nnodes={t.nnodes}).")
    if t.nnodes > 1 and t.standalone:
        raise ConfigError(
            f"torchrun.standalone = true only works on one node, but torchrun.nnodes = {t.nnodes}: "
            f"use torchrun=multinode (or torchrun.standalone=false with torchrun.rdzv_endpoint=<node0>:29500)."
        )
    if t.nnodes > 1 and not t.rdzv_endpoint and cfg.launcher.name != "slurm":
        raise ConfigError(
            f"torchrun.rdzv_endpoint = None but torchrun.nnodes = {t.nnodes}: every node must meet at "
            f"one host:port, e.g. torchrun.rdzv_endpoint=<node0 hostname>:29500 (launcher=slurm fills it in)."
        )
    default = MethodConfig(name="", recipe="")
    for key, recipes in RECIPE_KEYS.items():
        value = _values_at(cfg.method, key.split("."))
        value, unset = next(value)[1], next(_values_at(default, key.split(".")))[1]
        if cfg.method.recipe not in recipes and value != unset:
            raise ConfigError(
                f"method.{key} = {value!r} has no effect with method.recipe={cfg.method.recipe} (only "
                f"{', '.join(recipes)} reads it): remove it, or pick a method of that recipe."
            )
    tr = cfg.train
    if tr.master_weights == "optimizer" and not tr.masters_fit_optimizer():
        raise ConfigError(
            f"train.master_weights = 'optimizer' (bf16 parameters, fp32 masters in the optimizer) needs "
            f"train.precision=bf16 and train.grad_accum=1, here {tr.precision} and {tr.grad_accum}. Use "
            f"train.master_weights=auto, which keeps them in the parameters then."
        )
    ac = tr.activation_checkpointing
    try:
        if ac != "auto":
            recompute.fraction(ac)
    except ValueError:
        raise ConfigError(f"train.activation_checkpointing = {ac!r} is not a valid choice. "
                          f"Choose one of: true or full (recompute every block), every2 (every other LLM block: about "
                          f"half the activation memory of false, half the recompute of true), false or none, a share "
                          f"of the LLM's blocks between 0 and 1 (0.75: three in four; the ViT's all recompute once any "
                          f"do), auto (the fewest the memory plan fits in the GPU).")
    if tr.compile != "auto" and not isinstance(tr.compile, bool):
        raise ConfigError(f"train.compile = {tr.compile!r} is not a valid choice. Choose one of: auto (compile on "
                          f"CUDA, not on CPU), true, false.")
    for name in ("sample_every", "num_sample_prompts"):
        if getattr(tr, name) < 0:
            raise ConfigError(f"train.{name} = {getattr(tr, name)} must be at least 0 (train.num_sample_prompts=0 "
                              f"turns sampling off).")
    if tr.profile_at is not None and tr.profile_at + tr.profile_steps - 1 > tr.max_steps:
        raise ConfigError(f"train.profile_at = {tr.profile_at} with train.profile_steps = {tr.profile_steps} records "
                          f"steps up to {tr.profile_at + tr.profile_steps - 1}, past train.max_steps = {tr.max_steps}: "
                          f"choose an earlier train.profile_at.")
    if tr.sample_prompts is not None and not isinstance(tr.sample_prompts, (str, list)):
        raise ConfigError(f"train.sample_prompts = {tr.sample_prompts!r} must be null (rows of the run's data), a list "
                          f"of prompts, or the path of a .jsonl/.yaml file of them.")
    if cfg.launcher.name == "external" and not cfg.launcher.script:
        raise ConfigError("launcher.script = None but launcher=external runs a script: set launcher.script=<path>.")
    if cfg.pipeline.name not in PIPELINE_NAMES:
        raise ConfigError(f"pipeline.name = {cfg.pipeline.name!r} has no launcher; choose one of: {', '.join(PIPELINE_NAMES)}.")
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"run_name = {cfg.run_name!r} must be a non-empty name without '/' (and not '.' or '..'): "
                          f"the run dir is <output_root>/<run_name>.")


def validate(cfg: DictConfig, overrides: Iterable[str] = ()) -> RootConfig:
    """The composed config (without its ``hydra`` node) as a checked ``RootConfig``; ``overrides`` are
    the command line's (its ``data.*`` keys win over a ``data.file``)."""
    try:
        apply_user_data(cfg, overrides)
    except DataFileError as err:
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"data.file={cfg.data.file}: {str(err).splitlines()[0]}") from None
    _walk(cfg, RootConfig, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).split("\n")[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    _check_choices(obj)
    _check_ranges(obj)
    _check_rules(obj)
    return obj


_OVERRIDE = re.compile(r"^(~|\+\+|\+)?([A-Za-z_][\w.\-]*)=(.*)$", re.S)


def check_overrides(args: Iterable[str]) -> None:
    """Command-line ``key=value`` keys against the schema (groups and ``hydra.*`` are Hydra's)."""
    for arg in args:
        m = _OVERRIDE.match(arg)
        if not m:
            continue  # flags (-m, --cfg), group/path@package forms: Hydra parses those
        key, value = m.group(2), m.group(3)
        parts = key.split(".")
        if parts[0] == "hydra" or (len(parts) == 1 and parts[0] in GROUPS):
            continue
        cls, path = RootConfig, ""
        for part in parts:
            hints = _hints(cls)
            if part not in hints:
                raise _unknown(path, part, value, hints)
            path = f"{path}.{part}" if path else part
            tp = hints[part]
            if _dict_value_type(tp) is not None:
                break  # free-form map: any key below is fine
            cls = _dataclass_of(tp)
            if cls is None:
                break  # a leaf; Hydra reports keys below it
