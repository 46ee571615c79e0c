"""Config schema, strict validation, and reading a run's ``resolved.yaml`` back (no Hydra needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from umm.config.schema import RootConfig
from umm.config.validate import ConfigError, validate


def load_resolved(path: Union[str, Path]) -> RootConfig:
    """``<run_dir>/resolved.yaml`` as a ``RootConfig``: a plain OmegaConf merge onto the schema."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"resolved config {path} does not exist (the app writes it into the run dir before launching)")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(path)))


__all__ = ["ConfigError", "RootConfig", "load_resolved", "validate"]
