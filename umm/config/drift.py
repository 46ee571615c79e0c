"""Config drift on resume: what changed between the config a checkpoint was written under and now.

A resumed run must train what it started training. ``compare(old, new)`` lists every changed key
(dotted path, old value, new value) and splits them into the harmless ones (cadence, logging,
where it runs) and those that change what is trained (anything else: optimizer, schedule, method,
trainable parts, LoRA, data mix, model, precision, world size, seed, token budget, ...). Anything
not on the allow-list below counts as a change to training, so a new config key is safe by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Tuple

ACCEPT_OVERRIDE = "train.allow_config_change=true"

# Keys whose change leaves the trained weights' path alone (fnmatch patterns over dotted paths).
HARMLESS = (
    "train.max_steps",  # except under a cosine schedule: see compare()
    "train.save_every", "train.keep_last", "train.export_every", "train.log_every", "train.sample_every", "train.num_sample_prompts",
    "train.sample_steps", "train.sample_timestep_shift", "train.cfg_text_scale", "train.grace_period_s", "train.max_bad_steps",
    "train.allow_config_change", "train.resume",
    # Memory and speed only: the same numbers are computed.
    "train.activation_checkpointing", "train.compile", "train.compile_cache_dir", "train.inductor_options*", "train.ema_on_cpu",
    "train.async_save", "train.profile_*",
    "train.gpu_memory_gib",
    # Which process reads which rows: a resume re-splits the unread rows (none twice, none skipped).
    "data.num_workers",
    "logger.*", "launcher.slurm.*",
    # Rendezvous details; the world size (nnodes x nproc_per_node) is not among them.
    "torchrun.node_rank", "torchrun.standalone", "torchrun.rdzv_*", "torchrun.max_restarts", "torchrun.extra_args",
    # A resumed run takes its weights from its own checkpoint, never from init_from.
    "method.init_from", "method.init_from_ema",
    # The run dir is the same one by construction; these only name it.
    "run_name", "output_root", "run_dir", "dry_run",
)

ABSENT = "<absent>"


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return value if value is ABSENT else repr(value) if isinstance(value, str) and not value else str(value)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> {dotted.key: leaf}; lists are leaves (compared whole)."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _harmless(key: str, old: Dict[str, Any], new: Dict[str, Any]) -> bool:
    if key == "train.max_steps" and "cosine" in (old.get("optim.schedule"), new.get("optim.schedule")):
        return False  # the cosine schedule decays to min_lr at max_steps: its lr at every step moves
    return any(fnmatchcase(key, pattern) for pattern in HARMLESS)


def compare(old_tree: Dict[str, Any], new_tree: Dict[str, Any]) -> Tuple[List[Change], List[Change]]:
    """(harmless changes, changes to what is trained) from ``old_tree`` to ``new_tree``."""
    old, new = flatten(old_tree), flatten(new_tree)
    harmless: List[Change] = []
    material: List[Change] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b:
            (harmless if _harmless(key, old, new) else material).append(Change(key, a, b))
    return harmless, material


__all__ = ["ACCEPT_OVERRIDE", "HARMLESS", "Change", "compare", "flatten"]
