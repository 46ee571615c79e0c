"""Where a run's weights are: a run dir, one of its checkpoints, or a BAGEL model dir.

Shared by ``umm export`` and ``umm sample``. A checkpoint holds only weights (or only its ranks'
shards of the trained ones: umm/export/sharded.py assembles them, tensor by tensor); the configs,
autoencoder and tokenizer come from the model dir the run trained (``model.path`` in the run's
``resolved.yaml``), or from ``--model-dir``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors import safe_open

from umm.errors import UmmError
from umm.export.lora import Adapter, read_adapter
from umm.model.io import WEIGHT_FILES, build_on_meta, check_state_dict, expected_shapes, read_model_dims
from umm.train.safetensors_file import DTYPES_BY_NAME

# ``--weights`` names -> the checkpoint's files (raw = the trained weights, ema = their average).
WEIGHTS = {"ema": "ema", "raw": "model"}


class SourceError(UmmError, ValueError):
    """The path given is not a run dir, a checkpoint or a model dir, or lacks what is asked of it."""


@dataclass
class Source:
    model_dir: Path  # configs, ae.safetensors, tokenizer
    checkpoint: Optional[Path]  # None: the model dir's own weights
    num_layers: Optional[int] = None  # the run cut the LLM to this many layers (benchmarks)
    run_cfg: object = None  # the run's RootConfig when there is one (image sizes)
    # sharded()'s answer per --weights: weight_file, shapes and tensors each ask, and each answer reads
    # the checkpoint's meta, its resolved.yaml and the model dir's configs.
    _sharded: Dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def sharded(self, weights: str):
        """A checkpoint of only shards (train.export_every): its weights assembled from them, else None."""
        if weights not in self._sharded:
            self._sharded[weights] = self._assemble(weights)
        return self._sharded[weights]

    def _assemble(self, weights: str):
        from umm.export.sharded import ShardedWeights
        from umm.train.checkpoint import read_meta

        if self.checkpoint is None or (self.checkpoint / WEIGHT_FILES[WEIGHTS[weights]]).is_file() \
                or read_meta(self.checkpoint).get("consolidated", True):
            return None
        from umm.config import load_resolved

        cfg = load_resolved(self.checkpoint / "resolved.yaml")  # the config it was written under
        return ShardedWeights(self.checkpoint, cfg, self.model_dir, self.num_layers, WEIGHTS[weights])

    def weight_file(self, weights: str) -> Path:
        """The file of these weights (a checkpoint of only shards: its state dir)."""
        path = (self.checkpoint or self.model_dir) / WEIGHT_FILES[WEIGHTS[weights]]
        if not path.is_file() and self.sharded(weights) is not None:
            return self.checkpoint / "state"
        if not path.is_file():
            other = next(k for k in WEIGHTS if k != weights)
            has_other = (path.parent / WEIGHT_FILES[WEIGHTS[other]]).is_file()
            raise SourceError(f"{path.parent} has no {path.name}"
                              + (f"; it has the {other} weights: pass --weights {other}" if has_other else ""))
        return path

    def adapter(self, weights: str) -> Optional[Adapter]:
        """The checkpoint's LoRA adapter for these weights (``adapter/`` raw, ``adapter_ema/`` EMA)."""
        from umm.train.state_dict import ADAPTER_DIRS

        if self.checkpoint is None or not (self.checkpoint / ADAPTER_DIRS["raw"]).is_dir():
            return None
        path = self.checkpoint / ADAPTER_DIRS[weights]
        if not path.is_dir():  # a LoRA run without an EMA (UniCoT's) keeps only the raw adapter
            raise SourceError(f"{self.checkpoint} has no {path.name}/ (the run kept no EMA); "
                              f"it has the raw adapter: pass --weights raw")
        return read_adapter(path)

    def shapes(self, weights: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        """Key -> (stored dtype, shape) from the file's header, checked strictly against the model
        dir's configs before any tensor is read."""
        path = self.weight_file(weights)
        sharded = self.sharded(weights)
        if sharded is not None:
            layout = sharded.layout()
        else:
            with safe_open(str(path), framework="pt") as f:
                layout = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    layout[k] = (DTYPES_BY_NAME[sl.get_dtype()], tuple(sl.get_shape()))
        model = build_on_meta(read_model_dims(self.model_dir, self.num_layers))
        check_state_dict(expected_shapes(model), {k: s for k, (_, s) in layout.items()}, str(path))
        return layout

    def tensors(self, weights: str, *, merge_lora: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, tensor) one at a time, in file order; a LoRA run's adapter folded into its base."""
        adapter = self.adapter(weights) if merge_lora else None
        path = self.weight_file(weights)
        if adapter is not None:
            adapter.check_targets(self.shapes(weights), str(path))
        sharded = self.sharded(weights)
        for k, t in sharded.tensors() if sharded is not None else _file_tensors(path):
            yield k, (adapter.merged(k, t) if adapter is not None else t)


def _file_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k)


def _run_model_dir(run_dir: Path, model_dir: Optional[Path]):
    """(model dir, num_layers, run config) from the run's resolved.yaml (``model_dir`` overrides)."""
    from umm.config import load_resolved

    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        if model_dir is None:
            raise SourceError(f"no {resolved} to read model.path from; pass --model-dir (the model the run trained)")
        return model_dir, None, None
    cfg = load_resolved(resolved)
    found = model_dir or Path(cfg.model.path)
    if not (found / "llm_config.json").is_file():
        raise SourceError(f"the run's model dir {found} (model.path in {resolved}) has no llm_config.json; "
                          f"pass --model-dir (the model the run trained)")
    return found, cfg.model.num_layers, cfg


def resolve(path, model_dir=None) -> Source:
    """A run dir (its newest complete checkpoint), a checkpoint dir, or a model dir."""
    from umm.train.checkpoint import is_complete, latest_complete

    path = Path(path)
    model_dir = Path(model_dir) if model_dir else None
    if not path.exists():
        raise SourceError(f"{path} does not exist (give a run dir, a checkpoint dir or a BAGEL model dir)")
    if (path / "llm_config.json").is_file():  # before COMPLETE: umm's own model dirs carry that marker too
        return Source(path, None)
    if is_complete(path):
        found, layers, cfg = _run_model_dir(path.parent.parent, model_dir)
        return Source(found, path, layers, cfg)
    if (path / "resolved.yaml").is_file():
        ckpt = latest_complete(path / "checkpoints")
        if ckpt is None:
            raise SourceError(f"run dir {path} has no complete checkpoint in {path / 'checkpoints'} yet")
        found, layers, cfg = _run_model_dir(path, model_dir)
        return Source(found, ckpt, layers, cfg)
    stages = sorted(p.name for p in path.iterdir() if (p / "resolved.yaml").is_file()) if path.is_dir() else []
    hint = f"; its stages are run dirs: {', '.join(str(path / s) for s in stages)}" if stages else ""
    raise SourceError(f"{path} is not a run dir (resolved.yaml), a checkpoint (COMPLETE) or a model dir "
                      f"(llm_config.json){hint}")
