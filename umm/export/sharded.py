"""A checkpoint's consolidated weights built from its ranks' shards, one tensor at a time.

Checkpoints between a run's exports hold no model.safetensors/ema.safetensors (train.export_every),
only each rank's rows of the trained tensors (umm/train/sharded_state.py). The same file, upstream
key names and all, is assembled here: a trained tensor from the rows of every rank's shard file, a
frozen one from the weights the run started from (the model dir, or its ``method.init_from``), which
it never changed. Only the tensor being read is in memory.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from umm.errors import UmmError
from umm.model.io import read_model_dims
from umm.train.build import base_weight_files
from umm.train.checkpoint import read_meta
from umm.train.sharded_state import open_checkpoint
from umm.train.state_dict import is_adapter_key, upstream_key


class ShardedWeightsError(UmmError, ValueError):
    """The checkpoint's shards cannot give the weights asked for."""


class ShardedWeights:
    """The ``model`` (raw) or ``ema`` weights of a checkpoint of only shards, as a file would hold them."""

    def __init__(self, ckpt: Path, cfg, model_dir: Path, num_layers, group: str):
        meta = read_meta(ckpt)
        if group == "ema" and not meta.get("ema", True):
            raise ShardedWeightsError(f"{ckpt}: its run kept no EMA (train.ema_decay=null); pass --weights raw")
        self.ckpt, self.group = Path(ckpt), group
        self.trained = {upstream_key(n): n for n in meta.get("trainable", []) if not is_adapter_key(n)}
        layers = read_model_dims(model_dir, num_layers).llm.num_hidden_layers
        self.base = base_weight_files(cfg, layers, model_dir)

    @contextlib.contextmanager
    def _sources(self) -> Iterator[Dict[str, Tuple[object, str]]]:
        """Upstream key -> (reader, its key there), in the base file's order."""
        with contextlib.ExitStack() as stack:
            shards = stack.enter_context(open_checkpoint(self.ckpt))
            plan: Dict[str, Tuple[object, str]] = {}
            for wf in self.base:
                f = stack.enter_context(wf.open(wf.path))
                for k in f.keys():
                    if wf.keep(k) and k not in plan:
                        name = self.trained.get(k)
                        plan[k] = (shards, f"{self.group}/{name}") if name is not None else (f, k)
            missing = [rk for r, rk in plan.values() if r is shards and rk not in shards.shapes]
            if missing:
                raise ShardedWeightsError(f"{self.ckpt / 'state'} holds no {missing[0]} ({len(missing)} trained "
                                          f"tensors missing); the checkpoint is not this run's")
            yield plan

    def layout(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        with self._sources() as plan:
            return {k: (r.dtype(rk), tuple(r.shape(rk))) for k, (r, rk) in plan.items()}

    def tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        with self._sources() as plan:
            for k, (r, rk) in plan.items():
                shape = r.shape(rk)
                yield k, r.rows(rk, 0, shape[0] if shape else 1)
